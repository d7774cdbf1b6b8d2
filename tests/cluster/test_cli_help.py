"""The CLI's help is fast: `treelm --help` and every group's and command's help import no torch,
Ray, transformers, peft, SQLAlchemy or gRPC (heavy imports live inside the commands)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "ray", "transformers", "peft", "sqlalchemy", "grpc")

# Every group, and one command of each (commands declare their options at import time too).
HELP = [
    [],
    ["tree"],
    ["tree", "build"],
    ["base"],
    ["base", "tiny"],
    ["registry"],
    ["registry", "match"],
    ["registry", "import"],
    ["registry", "tenant"],
    ["registry", "token"],
    ["export"],
    ["serve"],
    ["keys"],
    ["keys", "gen"],
    ["update"],
    ["update", "make"],
    ["update", "submit"],
    ["cluster"],
    ["cluster", "up"],
    ["cluster", "drain"],
    ["feedback"],
    ["feedback", "ls"],
    ["feedback", "retention"],
    ["node"],
    ["node", "create"],
    ["node", "add"],
    ["node", "retire"],
]

# One process runs every help in turn; the first one after which a heavy module is loaded is named.
_PROBE = """
import json, sys
from cluster.cli import main
report = []
for args in json.loads(sys.argv[1]):
    code = main([*args, "--help"])
    report.append({"args": args, "code": code, "heavy": [m for m in json.loads(sys.argv[2]) if m in sys.modules]})
print(json.dumps(report))
"""


def test_help_of_every_group_and_command_imports_nothing_heavy():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HELP), json.dumps(HEAVY)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["code"] for r in report] == [0] * len(HELP)
    for r in report:
        assert r["heavy"] == [], f"`treelm {' '.join(r['args'])} --help` imported {r['heavy']}"


def test_a_command_that_needs_a_heavy_package_still_loads_it_when_run():
    """The lazy imports are still there: running a command (not its help) imports what it needs."""
    code = (
        "import sys; from cluster.cli import main; "
        "code = main(['registry', 'ls', '--db', 'sqlite:////nonexistent/dir/registry.db']); "
        "print(code, 'sqlalchemy' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["2", "True"], proc.stdout + proc.stderr
