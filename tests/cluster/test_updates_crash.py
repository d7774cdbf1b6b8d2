"""Crash in the middle: a subprocess applying an update is SIGKILLed at every step of the apply
(half-written version files, renamed, registry committed, snapshot written, switched). Whatever
the step, the served snapshot is intact and is the old one or the new one, the registry holds the
old state or the new one (one transaction), and reopening reconciles the two: never a mix."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.updates.coordinator import Coordinator
from cluster.updates.keys import load_signing_key
from cluster.updates.package import read_package
from cluster.updates.policy import UpdatePolicy
from hierarchy.updates.envelope import Envelope
from nodes.store.versions import VersionStore
from registry.db import open_registry
from tests.cluster.update_world import REPO, World, built_tree, honest_adapter, make_world, package_of, semantic_state

ONC = "en/medical/oncology"


def _copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template / "tree", dest / "tree")
    shutil.copy2(template / "registry.db", dest / "registry.db")
    return dest


def _served(world_dir: Path) -> dict:
    store = VersionStore(world_dir / "tree")
    store.verify()  # every file of every served version is present and intact
    snapshot = store.read_snapshot()
    return {p: [(x.path, x.version, x.adapter) for x in s.chain] for p, s in snapshot.nodes.items()}


def _state(world_dir: Path) -> dict:
    with open_registry(f"sqlite:///{world_dir / 'registry.db'}") as reg:
        return semantic_state(reg)


def _pins_of(state: dict) -> dict:
    return {k.split("/", 1)[1]: chain for k, (chain, _) in state["pins"].items()}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    """Three worlds on disk: before a submit; before the last approval; and the reference outcomes."""
    built = built_tree(tmp_path_factory)
    root = tmp_path_factory.mktemp("crash")
    w: World = make_world(root / "submit", built, UpdatePolicy(min_updates=2))
    package_of(w, ONC, honest_adapter(w, ONC), out=root / "onc-v2")
    w.close()
    # The approval case: one package aggregated (m = 1), the evaluator has approved already.
    a: World = make_world(root / "approve", built)
    status = a.coordinator.submit(package_of(a, ONC, honest_adapter(a, ONC))[0])
    candidate = status.candidate_id
    envelope = Envelope.from_bytes(a.coordinator.status(candidate).envelope)
    evaluator = a.keys.evaluators["en/medical"]
    a.coordinator.approve(candidate, evaluator.keyid, evaluator.sign(envelope.pae()))
    (root / "operator.pem").write_bytes(a.keys.operator.to_pem())
    (root / "operator.pem").chmod(0o600)  # a private key others may read is refused
    a.close()
    # Reference outcomes: the same operations, uninterrupted, on copies.
    out = {}
    for name, args in (
        ("submit", ["submit", str(root / "onc-v2")]),
        ("approve", ["approve", candidate, str(root / "operator.pem")]),
    ):
        done = _copy(root / name, root / f"{name}-done")
        with open_registry(f"sqlite:///{done / 'registry.db'}") as reg:
            c = Coordinator.open(reg, done / "tree", UpdatePolicy(min_updates=2))
            if name == "submit":
                c.submit(read_package(root / "onc-v2"))
            else:
                op = load_signing_key(root / "operator.pem")
                c.approve(candidate, op.keyid, op.sign(Envelope.from_bytes(c.status(candidate).envelope).pae()))
        out[name] = (_state(root / name), _state(done), args)
    return root, out


def _run(world_dir: Path, step: str, nth: int, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tests.cluster.crash_driver", str(world_dir), step, str(nth), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


# (operation, the step it is killed at, what the registry then holds, what is served until reopened)
CASES = [
    ("submit", "version-files-partial", "before", "before"),  # one file of the new version written
    ("submit", "version-renamed", "before", "before"),  # the version dir is in place, nothing names it
    ("submit", "db-committed", "after", "before"),  # the registry moved, the snapshot not yet
    ("submit", "snapshot-written", "after", "before"),  # the new snapshot is still a temp file
    ("submit", "snapshot-switched", "after", "after"),  # everything done, killed on the way out
    ("approve", "db-committed", "after", "before"),
]


@pytest.mark.parametrize(
    ("operation", "step", "registry_holds", "serving"), CASES, ids=[f"{c[0]}@{c[1]}" for c in CASES]
)
def test_killed_during_apply_leaves_old_or_new_never_a_mix(
    templates, tmp_path, operation, step, registry_holds, serving
):
    root, outcomes = templates
    before, after, args = outcomes[operation]
    world = _copy(root / operation, tmp_path)
    served_before = _served(world)
    proc = _run(world, step, 1, args)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]

    # Right after the kill: the served snapshot is intact and entirely old or entirely new ...
    served = _served(world)
    assert served in (served_before, _pins_of(after)), "the served snapshot mixes versions"
    assert served == (served_before if serving == "before" else _pins_of(after))
    # ... and the registry is exactly the old state or the new one (one transaction).
    state = _state(world)
    assert state == (before if registry_holds == "before" else after)

    # Reopening reconciles: the snapshot follows the registry, temp files are gone, nothing mixed.
    with open_registry(f"sqlite:///{world / 'registry.db'}") as reg:
        Coordinator.open(reg, world / "tree", UpdatePolicy(min_updates=2))
    assert _state(world) == state
    assert _served(world) == _pins_of(state)
    assert not list((world / "tree").rglob(".tmp-*")) and not list((world / "tree").glob(".snapshot.json.tmp-*"))
