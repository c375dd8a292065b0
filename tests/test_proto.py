from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_the_proto() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_enums_start_with_unspecified_and_services_end_in_service() -> None:
    from sidecar._pb.fse.v1 import guard_pb2 as pb

    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
    assert pb.DESCRIPTOR.package == "fse.v1"
    assert all(name.endswith("Service") for name in pb.DESCRIPTOR.services_by_name)
