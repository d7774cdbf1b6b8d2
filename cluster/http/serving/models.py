"""GET /v1/models and GET /v1/models/{id}: the nodes this caller may use *here* (served by one of
this server's trunks; other tenants' private nodes never appear), as OpenAI model objects."""

from __future__ import annotations

import asyncio

from cluster.http.common import ApiContext
from cluster.http.protocol import Model, ModelList
from cluster.service.admission import NodeRef
from cluster.service.auth import Caller
from cluster.service.catalog import Catalog
from registry.records import NodeRecord

__all__ = ["ModelServing"]


def _model(record: NodeRecord, model_id: str | None = None) -> Model:
    return Model(
        id=model_id or record.node_id,
        created=int(record.created_at.timestamp()),
        owned_by=record.owner or "treelm",
        parent=record.parent,
        tree=record.tree,
        level=record.level,
        visibility=record.visibility,
        stable_version=record.stable_version,
    )


class ModelServing:
    def __init__(self, ctx: ApiContext, catalog: Catalog):
        self.ctx = ctx
        self._catalog = catalog

    async def list(self, caller: Caller) -> ModelList:
        records = await asyncio.to_thread(self._catalog.nodes, caller.tenant)  # parents first
        served = [r for r in records if self.ctx.admission.router.serves(r.node_id)]
        return ModelList(data=[_model(r) for r in served])

    async def retrieve(self, model_id: str, caller: Caller) -> Model:
        """One model; a pinned id (``demo/en@2``) must name the version served now, as in a request."""
        ref = NodeRef.parse(model_id, "model")
        await self.ctx.admission.admit(ref, caller)  # the same 404 for unknown and private nodes
        detail = await asyncio.to_thread(self._catalog.node, ref.node, caller.tenant)
        return _model(detail.node, str(ref))
