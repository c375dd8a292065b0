"""Canonical byte encoding shared by signatures and the audit chain.

Little-endian fixed-width integers, IEEE-754 float64 (every NaN written as the one
quiet NaN 0x7ff8000000000000), u32-length-prefixed UTF-8 strings and byte strings.
Normative text: proto/fse/v1/VERDICT.md, "Encoding" (vectors: proto/fse/v1/vectors.json).
"""

from __future__ import annotations

import math
import struct


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def i64(v: int) -> bytes:
    return struct.pack("<q", v)


def canonical_float(v: float) -> float:
    """``v`` with every NaN replaced by the one NaN ``struct`` packs as 0x7ff8000000000000."""
    return math.nan if v != v else v


def f64(v: float) -> bytes:
    return struct.pack("<d", canonical_float(v))


def blob(v: bytes) -> bytes:
    return struct.pack("<I", len(v)) + v


def string(v: str) -> bytes:
    return blob(v.encode("utf-8"))
