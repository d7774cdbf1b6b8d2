"""The dependency direction of DESIGN.md, checked by import-linter, and a light SDK."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([exe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" in proc.stdout and "0 broken" in proc.stdout


def test_sdk_import_pulls_in_neither_torch_nor_ray():
    code = (
        "import sys, treelm, hierarchy; "
        "bad = sorted(m for m in ('torch', 'ray', 'transformers', 'sqlalchemy') if m in sys.modules); "
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the SDK imported: {proc.stdout} {proc.stderr}"


def test_every_package_declares_all():
    for pkg in ("hierarchy", "nodes", "registry", "protos", "cluster", "treelm"):
        init = REPO / pkg / "__init__.py"
        assert "__all__" in init.read_text(), f"{init} has no __all__"
