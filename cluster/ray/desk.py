"""The update protocol in a Ray cluster: one detached desk actor owns every trunk's coordinator.

    desk = ensure_desk(DeskSpec(registry_url, (("demo", "/srv/demo/build"),)), namespace)  # `cluster up`
    backend = RemoteCoordinator(namespace)     # in each ingress replica: what UpdatesServicer calls

Why one actor and not the ingress: the coordinator is the single writer of a tree's
versions (it holds the tree dir's file lock and moves ``stable`` in one registry
transaction), while there may be several ingress replicas on several machines. The desk
runs on the head, beside the tree dirs the head serves, so every submission, approval and
rollback of the cluster goes through one place, in order. The next level's aggregation round
(after an approval made a parent stable) runs in a thread of the desk after the approval has
returned; a package that does not verify is refused at once even while a round runs. When a version goes stable it
writes the tree's snapshot; each trunk replica's engine notices the new snapshot on its
next request (it checks at most once a second) and serves it from then on, without a
restart. Replicas on other machines see it only when the tree dir is a shared mount.

The desk's methods raise the coordinator's typed errors; every TreeLM error pickles with its
type and fields, so :class:`RemoteCoordinator` raises the same error again in the ingress and
the status table of cluster/service/status.py applies unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray

from cluster.errors import ClusterError, ReplicaUnavailable, UpdateStateError
from cluster.jobs.runner import JobRunner
from cluster.ray.jobs import RayLauncher
from cluster.ray.priority import yield_to_serving
from cluster.ray.rebase import RayRefitter
from cluster.ray.wire import remote_cause
from cluster.updates.coordinator import Coordinator
from cluster.updates.keys import load_signing_key
from cluster.updates.learn import FeedbackLearner
from cluster.updates.package import Package
from cluster.updates.policy import UpdatePolicy
from cluster.updates.status import RollbackResult, UpdateStatus
from hierarchy.errors import InvalidNodePath
from hierarchy.ids import NodeId
from hierarchy.updates.envelope import Envelope, Signature
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import UpdateManifest

__all__ = ["DESK_NAME", "DeskSpec", "RemoteCoordinator", "UpdateDesk", "ensure_desk", "kill_desk"]

log = logging.getLogger("treelm.updates.desk")
DESK_NAME = "treelm-update-desk"
_CALL_TIMEOUT_S = 1800.0  # a submission may train nothing but evaluates and aggregates on the head's CPU


@dataclass(frozen=True)
class DeskSpec:
    """What the desk opens: the registry and each served tree (name, directory on the head)."""

    registry_url: str
    trees: tuple[tuple[str, str], ...]
    threads: int = 1  # torch threads for gating and aggregation (replicas keep theirs)
    job_cpus: float = 1.0  # each fine-tuning job's and each rebase's Ray task asks for this many CPUs
    job_threads: int = 1  # torch threads of a job's worker


def _load_feedback_key(path: str) -> SigningKey:
    """The feedback policy's signing key; an encrypted one needs $TREELM_KEY_PASSPHRASE on the head."""
    passphrase = os.environ.get("TREELM_KEY_PASSPHRASE")
    return load_signing_key(path, passphrase.encode() if passphrase else None)


def _warm(coordinator: Coordinator) -> None:
    try:
        coordinator.bench.evaluator  # noqa: B018  (loads the base model once)
    except Exception:  # a submission will report the same problem to its caller
        log.warning("could not load the base for %s's gate", coordinator.tree.name, exc_info=True)


@ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1)  # type: ignore[call-overload]  # stubs lack actor options
class UpdateDesk:
    """One coordinator per served tree, over one registry; calls run one at a time, in order."""

    def __init__(self, spec: DeskSpec):
        import torch

        from registry.db import open_registry

        torch.set_num_threads(spec.threads)  # the replicas on this machine keep their cores
        yield_to_serving()  # gating and aggregating wait for a replica's decode steps
        self._registry = open_registry(spec.registry_url)
        # The next level's round runs after an approval returns; calls keep being answered meanwhile.
        self._rounds = ThreadPoolExecutor(1, thread_name_prefix="treelm-desk-round")
        self._coordinators: dict[str, Coordinator] = {}
        for name, tree_dir in spec.trees:
            self._coordinators[name] = Coordinator.open(
                self._registry,
                tree_dir,
                UpdatePolicy.for_tree(tree_dir),
                background=self._rounds.submit,
                # A level's rebases run as parallel Ray tasks, each asking for job_cpus (cluster/ray/rebase.py).
                refitter=RayRefitter(spec.job_cpus, spec.job_threads),
            )
        for coordinator in self._coordinators.values():  # load the gate's base now, not on the first submission
            self._rounds.submit(_warm, coordinator)
        # Time-window aggregation and the feedback policy need a clock: this timer is the cluster's
        # scheduled job for both (`treelm update tick` is the same pass, from cron, elsewhere).
        periods = [c.policy.window_s / 10 for c in self._coordinators.values() if c.policy.window_s]
        periods += [c.policy.feedback.every_s for c in self._coordinators.values() if c.policy.feedback.key]
        self._learners = {
            name: FeedbackLearner(c, _load_feedback_key)
            for name, c in self._coordinators.items()
            if c.policy.feedback.key
        }
        # Tenants' fine-tuning jobs: a runner per tree whose policy has customize.key; each job a Ray task.
        self._runners = {name: self._job_runner(c, spec) for name, c in self._coordinators.items()}
        for runner in self._runners.values():
            if runner is not None:
                runner.start()
        self._stop = threading.Event()
        if periods:
            every = min(60.0, *periods)
            threading.Thread(target=self._tick_loop, args=(every,), name="treelm-desk-tick", daemon=True).start()

    def _job_runner(self, coordinator: Coordinator, spec: DeskSpec) -> JobRunner | None:
        if not coordinator.policy.customize.enabled:
            return None
        coordinator.growth_key()  # JobError now, at `cluster up`, for a key the registry does not trust
        return JobRunner(
            self._registry,
            coordinator,
            coordinator.policy.customize,
            RayLauncher(spec.job_cpus, spec.job_threads),
            worker_name=f"ray-desk:{coordinator.tree.name}",
        )

    def wake_jobs(self) -> None:
        """A job was queued or cancelled (an ingress says so): the runners look now, not at their next poll."""
        for runner in self._runners.values():
            if runner is not None:
                runner.wake()

    def _tick_loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.tick()

    def tick(self) -> int:
        """One pass: aggregation windows, then the feedback policy; returns the decisions recorded."""
        decided = 0
        for name, coordinator in self._coordinators.items():
            try:
                coordinator.tick()
                if name in self._learners:
                    decided += len(self._learners[name].tick())
            except Exception:  # one failed round must not stop the desk; the log has it
                log.exception("update tick failed for %s", coordinator.tree.name)
        return decided

    def trees(self) -> list[str]:
        return sorted(self._coordinators)

    def max_package_bytes(self) -> int:
        return max((c.policy.max_package_bytes for c in self._coordinators.values()), default=64 << 20)

    # -- routing to the tree's coordinator -----------------------------------------------------
    def _of_tree(self, tree: str) -> Coordinator:
        if tree not in self._coordinators:
            raise UpdateStateError(
                f"tree {tree!r} is not served by this cluster; it serves "
                f"{', '.join(sorted(self._coordinators)) or 'no tree'}"
            )
        return self._coordinators[tree]

    def _of_node(self, node: str) -> Coordinator:
        try:
            return self._of_tree(NodeId.parse(node).tree)
        except InvalidNodePath as exc:
            raise UpdateStateError(str(exc)) from None

    def _of_update(self, update_id: str) -> tuple[Coordinator, str]:
        for coordinator in self._coordinators.values():  # an id prefix names an update of one tree
            full = coordinator.resolve(update_id)
            if full != update_id:
                return coordinator, full
        first = next(iter(self._coordinators.values()), None)
        if first is None:
            raise UpdateStateError("this cluster serves no tree")
        return self._of_node(first.status(update_id).node), update_id  # UpdateNotFound for an unknown id

    def submit(self, package: Package) -> UpdateStatus:
        hint = package.node_hint()  # only to choose the coordinator; it verifies everything itself
        if hint:
            return self._of_node(hint).submit(package)
        if not self._coordinators:
            raise UpdateStateError("this cluster serves no tree")
        return next(iter(self._coordinators.values())).submit(package)  # it refuses the malformed manifest

    def check_envelope(self, envelope: Envelope) -> UpdateManifest:
        hint = Package(envelope, {}).node_hint()
        if hint:
            return self._of_node(hint).check_envelope(envelope)
        if not self._coordinators:
            raise UpdateStateError("this cluster serves no tree")
        return next(iter(self._coordinators.values())).check_envelope(envelope)  # it says what is wrong

    def status(self, update_id: str) -> UpdateStatus:
        coordinator, full = self._of_update(update_id)
        return coordinator.status(full)

    def approve(self, update_id: str, keyid: str, signature: bytes) -> UpdateStatus:
        coordinator, full = self._of_update(update_id)
        return coordinator.approve(full, keyid, signature)

    def rollback(self, node: str, to_version: int, signatures: Sequence[Signature]) -> RollbackResult:
        return self._of_node(node).rollback(node, to_version, list(signatures))

    def retire_node(self, node: str, force: bool) -> list[str]:
        return list(self._of_node(node).retire_node(node, force))

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()
        for runner in getattr(self, "_runners", {}).values():
            if runner is not None:
                runner.stop(timeout=10)
        rounds = getattr(self, "_rounds", None)
        if rounds is not None:
            rounds.shutdown(wait=True)  # a round in progress finishes (its apply is atomic either way)
        registry = getattr(self, "_registry", None)
        if registry is not None:
            registry.close()


def ensure_desk(spec: DeskSpec, namespace: str, timeout_s: float = 300.0):
    """(Re)start the desk on the head for ``spec`` and wait until every coordinator is open.

    A desk left by an earlier `up` is replaced: it may hold another set of trees. It keeps no
    state of its own (the registry and the tree dirs hold everything), so nothing is lost."""
    kill_desk(namespace)
    # mypy keeps a class's own type under a class decorator: it misses that @ray.remote made an ActorClass.
    desk = UpdateDesk.options(  # type: ignore[attr-defined]
        name=DESK_NAME,
        namespace=namespace,
        lifetime="detached",
        resources={"node:__internal_head__": 0.001},
    ).remote(spec)
    try:
        ray.get(desk.trees.remote(), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
        kill_desk(namespace)
        cause = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ClusterError(
            f"the update desk could not open the trees: {cause} (set `ingress.updates: false` "
            "in the cluster file to serve without the Updates service)"
        ) from None
    return desk


def kill_desk(namespace: str, wait_s: float = 30.0) -> bool:
    """Stop the desk if it runs; waits until its name is free again (a new desk may take it)."""
    import time

    try:
        ray.kill(ray.get_actor(DESK_NAME, namespace=namespace), no_restart=True)
    except ValueError:
        return False
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        try:
            ray.get_actor(DESK_NAME, namespace=namespace)
        except ValueError:
            break
        time.sleep(0.1)
    return True


class _Policy:
    """The one policy value the servicer reads itself; asked of the desk on first use."""

    def __init__(self, remote: RemoteCoordinator):
        self._remote = remote
        self._max: int | None = None

    @property
    def max_package_bytes(self) -> int:
        if self._max is None:
            self._max = int(self._remote._call_desk(lambda d: d.max_package_bytes.remote()))
        return self._max


class RemoteCoordinator:
    """What the ingress's UpdatesServicer calls: the coordinator's methods, run by the desk.

    Blocking calls (the servicer runs them in a worker thread, as with a local coordinator)."""

    def __init__(self, namespace: str, timeout_s: float = _CALL_TIMEOUT_S):
        self._namespace = namespace
        self._timeout_s = timeout_s
        self._desk = None
        self.policy = _Policy(self)  # lazy: an ingress starts (and serves inference) even while the desk restarts

    def _handle(self):
        if self._desk is None:
            try:
                self._desk = ray.get_actor(DESK_NAME, namespace=self._namespace)
            except ValueError:
                raise ReplicaUnavailable("the update desk is not running (run `treelm cluster up` again)") from None
        return self._desk

    def _call_desk(self, send: Callable[[Any], Any]) -> Any:
        try:
            return ray.get(send(self._handle()), timeout=self._timeout_s)
        except ray.exceptions.RayTaskError as exc:  # the coordinator's typed error, as it raised it
            raise remote_cause(exc) from None
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            self._desk = None  # look it up again next time (a desk replaced by `up`)
            raise ReplicaUnavailable(f"the update desk did not answer: {type(exc).__name__}") from None

    def submit(self, package: Package) -> UpdateStatus:
        return self._call_desk(lambda d: d.submit.remote(package))

    def check_envelope(self, envelope: Envelope) -> UpdateManifest:
        return self._call_desk(lambda d: d.check_envelope.remote(envelope))

    def status(self, update_id: str) -> UpdateStatus:
        return self._call_desk(lambda d: d.status.remote(update_id))

    def approve(self, update_id: str, keyid: str, signature: bytes) -> UpdateStatus:
        return self._call_desk(lambda d: d.approve.remote(update_id, keyid, signature))

    def rollback(self, node: str, to_version: int, signatures: Sequence[Signature]) -> RollbackResult:
        return self._call_desk(lambda d: d.rollback.remote(node, to_version, list(signatures)))

    def retire_node(self, node: str, force: bool) -> list[str]:
        return self._call_desk(lambda d: d.retire_node.remote(node, force))

    def wake_jobs(self) -> None:
        """Tell the desk's job runners a job was queued or cancelled; returns at once (they also poll)."""
        try:
            self._handle().wake_jobs.remote()
        except ReplicaUnavailable:  # the desk restarts: its runners claim the job when it is back
            pass
