"""The generated protocol modules match proto/ (regenerate with scripts/gen_proto.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_service_shape():
    from distserve._proto import generation_pb2

    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    generate = service.methods_by_name["Generate"]
    assert generate.server_streaming and not generate.client_streaming
    assert generation_pb2.DESCRIPTOR.package == "distserve.v1"
