"""Regenerate the Python code for proto/fse/v1/*.proto into sidecar/_pb/.

Run: python scripts/gen_proto.py [--check]
--check regenerates into a temporary directory and exits 1 if the committed code differs
(the test suite runs this, so stale generated code fails CI).
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# Virtual import path: the generated modules import each other as sidecar._pb.fse.v1.*
VIRTUAL = "sidecar/_pb"
GENERATED = ROOT / VIRTUAL / "fse" / "v1"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc  # dev dependency only

    protos = sorted((PROTO_DIR / "fse" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTO_DIR}")
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{VIRTUAL}={PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
    ] + [f"{VIRTUAL}/{p.relative_to(PROTO_DIR)}" for p in protos]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    out = out_root / VIRTUAL / "fse" / "v1"
    for pkg in (out_root / VIRTUAL, out_root / VIRTUAL / "fse", out):
        (pkg / "__init__.py").touch()
    return sorted(out.iterdir())


def main(argv: list[str]) -> int:
    check = "--check" in argv
    with tempfile.TemporaryDirectory() as tmp:
        files = generate(Path(tmp))
        if check:
            stale = [
                f.name
                for f in files
                if not (GENERATED / f.name).exists() or not filecmp.cmp(f, GENERATED / f.name, shallow=False)
            ]
            if stale:
                print(f"generated code is stale: {', '.join(stale)}; run python scripts/gen_proto.py")
                return 1
            print("generated code is up to date")
            return 0
        for pkg in (ROOT / VIRTUAL, ROOT / VIRTUAL / "fse", GENERATED):
            pkg.mkdir(parents=True, exist_ok=True)
            (pkg / "__init__.py").touch()
        for f in files:
            (GENERATED / f.name).write_bytes(f.read_bytes())
            print(f"wrote {(GENERATED / f.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
