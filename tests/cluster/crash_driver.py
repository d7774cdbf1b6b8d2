"""Run one update operation and SIGKILL this process at a named step (for test_updates_crash.py).

    python -m tests.cluster.crash_driver WORLD_DIR STEP NTH submit PKG
    python -m tests.cluster.crash_driver WORLD_DIR STEP NTH approve UPDATE_ID KEY_PEM

STEP is a name passed to nodes.store.versions.checkpoint (see there and cluster.updates.coordinator);
the process kills itself the NTH time it reaches it. Exit 0 means the step was never reached.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str]) -> int:
    import cluster.updates.coordinator as coordinator_module
    import nodes.store.versions as versions_module
    from cluster.updates.coordinator import Coordinator
    from cluster.updates.keys import load_signing_key
    from cluster.updates.package import read_package
    from cluster.updates.policy import UpdatePolicy
    from hierarchy.updates.envelope import Envelope
    from registry.db import open_registry

    world, step, nth, operation, *rest = argv
    seen = {"n": 0}

    def checkpoint(name: str) -> None:
        if name == step:
            seen["n"] += 1
            if seen["n"] == int(nth):
                os.kill(os.getpid(), signal.SIGKILL)

    registry = open_registry(f"sqlite:///{Path(world) / 'registry.db'}")
    coordinator = Coordinator.open(registry, Path(world) / "tree", UpdatePolicy(min_updates=2))
    versions_module.checkpoint = checkpoint  # after open: only the operation's own steps count
    coordinator_module.checkpoint = checkpoint
    if operation == "submit":
        coordinator.submit(read_package(rest[0]))
    else:
        key = load_signing_key(rest[1])
        envelope = Envelope.from_bytes(coordinator.status(rest[0]).envelope)
        coordinator.approve(rest[0], key.keyid, key.sign(envelope.pae()))
    registry.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
