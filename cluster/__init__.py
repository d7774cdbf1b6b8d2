"""Composition root: the `treelm` CLI, the single-process gRPC server (`treelm serve`); the Ray application later."""

from cluster.catalog import Catalog
from cluster.server import ServerConfig, TreeServer
from cluster.trunk import EngineTrunk

__all__: list[str] = ["Catalog", "EngineTrunk", "ServerConfig", "TreeServer"]
