"""The generated gRPC code is what `make protos` makes from the .proto files today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "protos" / "treelm" / "v1"
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def _generate(out: Path) -> None:
    protos = sorted(str(p.relative_to(REPO)) for p in PROTO_DIR.glob("*.proto"))
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I.",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *protos,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_generated_code_is_present_and_not_stale(tmp_path):
    _generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "protos" / "treelm" / "v1").iterdir()}
    assert set(fresh) == {f"{p.stem}{s}" for p in PROTO_DIR.glob("*.proto") for s in SUFFIXES}
    problems = []
    for name, content in sorted(fresh.items()):
        current = PROTO_DIR / name
        if not current.is_file():
            problems.append(f"{name} is missing")
        elif current.read_bytes() != content:
            problems.append(f"{name} is stale")
    orphans = sorted(p.name for p in PROTO_DIR.iterdir() if p.name.endswith(SUFFIXES) and p.name not in fresh)
    problems += [f"{name} has no .proto any more" for name in orphans]
    assert not problems, "; ".join(problems) + ": run `make protos`"


def test_generated_modules_live_under_protos_and_do_not_shadow_the_sdk():
    import treelm
    from protos.treelm.v1 import admin_pb2, inference_pb2, inference_pb2_grpc, registry_pb2, updates_pb2

    assert treelm.Client.__module__ == "treelm._client"
    assert inference_pb2.DESCRIPTOR.package == "treelm.v1"
    assert inference_pb2.DESCRIPTOR.name == "protos/treelm/v1/inference.proto"
    assert {
        m.DESCRIPTOR.services_by_name.keys().__iter__().__next__()
        for m in (inference_pb2, registry_pb2, updates_pb2, admin_pb2)
    } == {"Inference", "Registry", "Updates", "Admin"}
    assert "from protos.treelm.v1 import inference_pb2" in Path(inference_pb2_grpc.__file__).read_text()
    assert not (REPO / "treelm" / "v1").exists()
