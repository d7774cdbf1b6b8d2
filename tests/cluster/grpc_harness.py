"""A served tree for gRPC tests: a random built tree, a SQLite registry, tokens, an engine,
and TreeServers running on their own event-loop thread on 127.0.0.1 (free ports).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster.service.catalog import Catalog
from cluster.service.server import ServerConfig, TreeServer
from cluster.service.trunk import EngineTrunk
from cluster.tree_import import import_tree
from nodes.runtime.engine import Engine, EngineConfig
from nodes.store.tree import BuiltTree
from registry.access import create_tenant, issue_token
from registry.db import Registry, init_registry, open_registry
from tests.nodes.treefactory import make_random_tree

PRIVATE = "rt/en/legal/contracts"  # private to tenant "acme" in the factory's default tree
PUBLIC_LEAVES = ("rt/en/medical/radiology", "rt/en/medical/cardiology", "rt/fr/medical", "rt/en/legal")


@dataclass
class World:
    tree: BuiltTree
    db_url: str
    registry: Registry
    tokens: dict[str, str]  # tenant -> bearer token
    engine: Engine
    operator_token: str  # role operator (tenant "ops"): may call the Admin service

    def catalog(self) -> Catalog:
        return Catalog(self.registry)


def make_world(tiny_base_dir: Path, root: Path, engine_config: EngineConfig | None = None) -> World:
    tree = make_random_tree(root / "tree", tiny_base_dir)
    url = f"sqlite:///{root / 'registry.db'}"
    init_registry(url)
    registry = open_registry(url)
    result = import_tree(registry, tree.root)
    assert "acme" in result.tenants_added
    create_tenant(registry, "globex")
    tokens = {tenant: issue_token(registry, tenant).token for tenant in ("acme", "globex")}
    create_tenant(registry, "ops")
    operator = issue_token(registry, "ops", role="operator").token
    engine = Engine(tree.base_dir, tree.root, engine_config or EngineConfig(max_batch_size=16))
    return World(tree, url, registry, tokens, engine, operator)


class ServerThread:
    """A TreeServer on a private event loop in a daemon thread, driven from synchronous tests."""

    def __init__(self, make: Callable[[], TreeServer]):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="grpc-test-server", daemon=True)
        self.thread.start()
        self.server: TreeServer = self.call(self._start(make))

    @staticmethod
    async def _start(make: Callable[[], TreeServer]) -> TreeServer:
        server = make()  # grpc.aio objects must be made on the loop that runs them
        await server.start()
        return server

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 120) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, Any]):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    @property
    def target(self) -> str:
        return self.server.target

    def stop(self, grace: float = 0.0) -> None:
        if self.thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)


def serve(world: World, distribution: Any = None, **config: Any) -> ServerThread:
    config.setdefault("port", 0)
    return ServerThread(
        lambda: TreeServer(
            [EngineTrunk(world.engine)], world.catalog(), ServerConfig(**config), distribution=distribution
        )
    )


def distribution_for(world: World, chunk_bytes: int = 1 << 20, cache_bytes: int = 20 << 30) -> tuple[Any, str]:
    """A Distributor for the world's tree: a root key registered, a variant key delegated by it.

    Returns the distributor and the root key's fingerprint (what a device is told to trust).
    """
    from cluster.service.distribution import Distributor, VariantSigning
    from cluster.updates.keys import register_key
    from hierarchy.updates.distribution import SignerDelegation, sign_delegation
    from hierarchy.updates.keys import SigningKey

    root_key, variant_key = SigningKey.generate(), SigningKey.generate()
    register_key(world.registry, root_key, "root")
    delegation = sign_delegation(SignerDelegation(world.tree.name, (variant_key.public,)), [root_key])
    signing = VariantSigning(variant_key, {world.tree.name: delegation})
    distributor = Distributor(
        {world.tree.name: world.tree.root}, world.catalog(), signing, chunk_bytes=chunk_bytes, cache_bytes=cache_bytes
    )
    return distributor, root_key.keyid
