"""Which trunk answers a call for a node, and whether the caller may use it: shared by gRPC and HTTP.

    ref = NodeRef.parse("demo/en/medical@2", field="model")    # BadArgument naming the field
    trunk = await admission.admit(ref, caller)                   # NodeNotVisible / UnknownNode / pins
    ...generate...
    await admission.check_answer(ref, result.node_version, caller)

A node id may carry a version, ``node@N``. The engine serves one chain per node (the tree dir's
snapshot), so a pinned version is served only when it is the one served now; otherwise the call
is refused before anything is generated where the trunk knows its served version (in one
process), and in any case before anything is returned (every answer names the version that
produced it). The refusal is precise: :class:`~cluster.errors.UnknownVersion` (404) when the
node never had that version, :class:`~cluster.errors.VersionNotServed` (409) when it exists in
the registry but another version is served.

Order matters for privacy: the access check comes first and sees only the node id, so another
tenant's private node is refused exactly like an unknown one, whatever version is asked for.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from cluster.errors import BadArgument, UnknownVersion, VersionNotServed
from cluster.service.access import NodeAccess
from cluster.service.auth import Caller
from cluster.service.quota import Quotas
from cluster.service.responses import RecordingTrunk, ResponseRecorder
from cluster.service.trunk import Trunk
from hierarchy.clip import clip
from hierarchy.errors import InvalidNodePath
from hierarchy.ids import MAX_NODE_ID_BYTES, NodeId, check_node_id_size
from nodes.errors import UnknownNode

__all__ = ["Admission", "NodeRef", "TrunkRouter", "bounded_node_id"]

_VERSION = re.compile(r"^[0-9]{1,9}$")
_MAX_REF_CHARS = MAX_NODE_ID_BYTES + 10  # the id, '@' and a version of at most 9 digits

# (node id, tenant) -> the versions the registry records for that node (as the tenant sees it)
VersionLookup = Callable[[str, str | None], Sequence[int]]


def bounded_node_id(text: str, field: str = "node") -> str:
    """``text`` unchanged when it is within the node-id bounds; BadArgument naming ``field`` otherwise.

    For calls that take an id (or a prefix of one) to the registry as it is: the bound comes first.
    """
    try:
        check_node_id_size(text)
    except InvalidNodePath as exc:
        raise BadArgument(field, str(exc)) from None
    return text


@dataclass(frozen=True)
class NodeRef:
    """A node id, optionally pinned to one version: ``demo/en/medical`` or ``demo/en/medical@2``."""

    node: str  # the canonical node id
    version: int | None = None

    @classmethod
    def parse(cls, text: object, field: str = "node") -> NodeRef:
        """BadArgument naming ``field`` for anything that is not ``tree[/path][@version]``."""
        if not isinstance(text, str) or not text.strip():
            raise BadArgument(field, "must name a node, e.g. 'demo/en/medical' or 'demo/en/medical@2'")
        if len(text) > _MAX_REF_CHARS:  # before any copy, lookup, cache or log line sees it
            raise BadArgument(field, f"node id {clip(text)} is longer than {MAX_NODE_ID_BYTES} bytes")
        name, at, version = text.strip().partition("@")
        if at and not _VERSION.match(version):
            raise BadArgument(
                field, f"the version after '@' must be a whole number, got {clip(version)} in {clip(text)}"
            )
        try:
            node = str(NodeId.parse(name))
        except InvalidNodePath as exc:
            raise BadArgument(field, str(exc)) from None
        return cls(node, int(version) if at else None)

    def __str__(self) -> str:
        return self.node if self.version is None else f"{self.node}@{self.version}"


class TrunkRouter:
    """Finds the trunk serving a node (one per tree in this process)."""

    def __init__(self, trunks: Mapping[str, Trunk]):
        self.trunks = dict(trunks)

    def for_node(self, node: str) -> Trunk:
        """Call after the access check: the caller may know of the node, so saying more leaks nothing."""
        tree = NodeId.parse(node).tree  # raises InvalidNodePath -> INVALID_ARGUMENT
        trunk = self.trunks.get(tree)
        if trunk is None or not trunk.serves(node):
            served = ", ".join(sorted(self.trunks)) or "none"
            raise UnknownNode(f"node {node!r} is registered but not served here (this server serves trees: {served})")
        return trunk

    def serves(self, node: str) -> bool:
        trunk = self.trunks.get(node.partition("/")[0])
        return trunk is not None and trunk.serves(node)


class Admission:
    """The access check, the trunk and the version pin of one call (see the module docstring)."""

    def __init__(
        self,
        router: TrunkRouter,
        access: NodeAccess,
        versions: VersionLookup | None = None,
        quotas: Quotas | None = None,
        recorder: ResponseRecorder | None = None,
    ):
        self.router = router
        self._access = access
        self._versions = versions
        self.quotas = quotas or Quotas()
        self.recorder = recorder  # None: responses are not recorded (--no-feedback)

    async def admit(self, ref: NodeRef, caller: Caller) -> Trunk:
        """The trunk as ``caller`` uses it: its requests carry the tenant and its limits (quota.py), and
        each finished generation is recorded for feedback (responses.py) unless recording is off."""
        await self._access.check(ref.node, caller)  # before anything reveals the node
        trunk: Trunk = self.quotas.bind(self.router.for_node(ref.node), caller)
        if self.recorder is not None:
            trunk = RecordingTrunk(trunk, self.recorder, caller.tenant)
        if ref.version is not None:
            served = trunk.served_version(ref.node)
            if served is not None and served != ref.version:
                raise await self.version_error(ref.node, ref.version, served, caller)
        return trunk

    async def check_answer(self, ref: NodeRef, answered: int, caller: Caller) -> None:
        """Refuse an answer from another version than the pinned one (the snapshot moved meanwhile)."""
        if ref.version is not None and answered != ref.version:
            raise await self.version_error(ref.node, ref.version, answered, caller)

    async def version_error(self, node: str, version: int, served: int, caller: Caller) -> Exception:
        """404 for a version the node never had, 409 for one it has that is not served (asks the registry)."""
        known: Sequence[int] = ()
        if self._versions is not None:
            known = await asyncio.to_thread(self._versions, node, caller.tenant)
        if version in known:
            return VersionNotServed(node, version, served)
        return UnknownVersion(node, version)
