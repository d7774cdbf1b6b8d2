"""gRPC servicers: translate between wire messages and domain calls, nothing more.

Errors are raised as the project's typed errors; cluster/service/interceptors.py turns
them into status codes. The caller's tenant comes from cluster.service.auth.CALLER.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc.aio

from cluster.errors import BadArgument
from cluster.service.access import NodeAccess
from cluster.service.admission import Admission, NodeRef, TrunkRouter, bounded_node_id
from cluster.service.auth import current_caller, require_operator
from cluster.service.catalog import Catalog, MatchQuery
from cluster.service.convert import (
    chunk_to_proto,
    engine_request,
    match_to_proto,
    node_to_proto,
    result_to_proto,
    snapshot_to_proto,
    version_to_proto,
)
from cluster.service.redact import Redactor
from cluster.service.update_servicer import UpdateBackend
from cluster.updates.coordinator import Coordinator
from protos.treelm.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)

__all__ = ["AdminServicer", "InferenceServicer", "RegistryServicer", "TrunkRouter"]

# Hook for metrics: (method, node, prompt_tokens, completion_tokens, ttft_s).
GenerationObserver = Callable[[str, str, int, int, float], None]


def _time_remaining(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    # grpc reports a huge number when the client set no deadline.
    return None if remaining is None or remaining > 10**8 else max(0.0, remaining)


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    """``node`` may pin a version (``demo/en/medical@2``): see cluster/service/admission.py."""

    def __init__(self, admission: Admission, observe: GenerationObserver | None = None):
        self._admission = admission
        self._observe = observe

    async def _admit(self, request: inference_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        ref = NodeRef.parse(request.node, "node")
        trunk = await self._admission.admit(ref, current_caller())
        return ref, trunk, engine_request(request, _time_remaining(context), node=ref.node)

    async def Generate(self, request, context):
        ref, trunk, engine_req = await self._admit(request, context)
        result = await trunk.generate(engine_req)
        await self._admission.check_answer(ref, result.node_version, current_caller())
        if self._observe is not None:
            u = result.usage
            self._observe("Generate", ref.node, u.prompt_tokens, u.completion_tokens, result.timings.ttft_s)
        return result_to_proto(result)

    async def GenerateStream(self, request, context) -> AsyncIterator[inference_pb2.GenerateChunk]:
        ref, trunk, engine_req = await self._admit(request, context)
        chunks = trunk.stream(engine_req)
        try:
            async for chunk in chunks:
                if chunk.index == 0:  # every chunk names the version; the first decides
                    await self._admission.check_answer(ref, chunk.node_version, current_caller())
                if chunk.usage is not None and self._observe is not None:
                    u, ttft = chunk.usage, chunk.timings.ttft_s if chunk.timings else 0.0
                    self._observe("GenerateStream", ref.node, u.prompt_tokens, u.completion_tokens, ttft)
                yield chunk_to_proto(chunk, ref.node)
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()  # a client that went away cancels the engine request here


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    """Tenant-aware registry reads; the registry hides other tenants' private nodes itself."""

    def __init__(self, catalog: Catalog):
        self._catalog = catalog

    async def ListNodes(self, request, context):
        prefix = bounded_node_id(request.prefix, "prefix")
        records = await asyncio.to_thread(self._catalog.nodes, current_caller().tenant, prefix)
        return registry_pb2.ListNodesResponse(nodes=[node_to_proto(r) for r in records])

    async def GetNode(self, request, context):
        detail = await asyncio.to_thread(self._catalog.node, bounded_node_id(request.node), current_caller().tenant)
        aliases = {alias: v.version for v in detail.versions for alias in v.aliases}
        return node_to_proto(detail.node, aliases)

    async def ListVersions(self, request, context):
        tenant = current_caller().tenant
        records = await asyncio.to_thread(self._catalog.versions, bounded_node_id(request.node), tenant)
        # A public parent's versions carry figures about its children: hide the private ones' names.
        hidden = await asyncio.to_thread(self._catalog.hidden_nodes, tenant, records[0].node_id) if records else ()
        redactor = Redactor(hidden)
        return registry_pb2.ListVersionsResponse(versions=[version_to_proto(redactor.version(v)) for v in records])

    async def Match(self, request, context):
        query = MatchQuery(
            task=request.task,
            device=request.device,
            memory=request.memory,
            context=request.context or None,
            batch=request.batch or None,
            top=request.top or None,
            bandwidth=request.bandwidth or None,
            compute=request.compute or None,
            tags=tuple(request.tags),
            tree=request.tree or None,
            dtype=request.dtype or None,
        )
        result = await asyncio.to_thread(self._catalog.match, query, current_caller().tenant)
        return match_to_proto(result)


class AdminServicer(admin_pb2_grpc.AdminServicer):
    def __init__(
        self,
        router: TrunkRouter,
        access: NodeAccess,
        *,
        version: str,
        auth_enabled: bool,
        in_flight: Callable[[], int],
        updates: Coordinator | UpdateBackend | None = None,
    ):
        self._router = router
        self._updates = updates  # RetireNode's backend (the update coordinator); None: UNIMPLEMENTED
        self._access = access
        self._version = version
        self._auth_enabled = auth_enabled
        self._in_flight = in_flight
        self._started = time.monotonic()

    async def Status(self, request, context):
        caller = current_caller()
        require_operator(caller, auth_required=self._auth_enabled)  # load and cache counters are operators' data
        trunks = []
        for trunk in self._router.trunks.values():
            refresh = getattr(trunk, "refresh", None)  # remote trunks (cluster.ray.backend) fetch their state
            if refresh is not None:
                await refresh()
            snap = trunk.snapshot()
            # Operators see every loaded adapter; an anonymous caller (auth off) is not told private ones.
            visible = tuple(
                [n for n in snap.loaded_adapters if caller.operator or await self._access.visible(n, caller)]
            )
            trunks.append(snapshot_to_proto(snap, visible))
        return admin_pb2.StatusResponse(
            version=self._version,
            uptime_s=time.monotonic() - self._started,
            auth_enabled=self._auth_enabled,
            tenant=caller.tenant or "",
            trunks=trunks,
            in_flight=self._in_flight(),
        )

    async def RetireNode(self, request, context):
        require_operator(current_caller(), auth_required=self._auth_enabled)
        ref = NodeRef.parse(request.node, "node")  # BadArgument naming "node" when missing or malformed
        if ref.version is not None:
            raise BadArgument("node", "a node is retired whole, with every version: leave out '@version'")
        node = ref.node
        if self._updates is None:
            raise NotImplementedError("retiring nodes needs the update coordinator, which this server does not run")
        retired = await asyncio.to_thread(self._updates.retire_node, node, bool(request.force))
        return admin_pb2.RetireNodeResponse(node=node, retired=list(retired))
