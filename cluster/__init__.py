"""Composition root: the `treelm` CLI, the single-process gRPC server (`treelm serve`), and the Ray
cluster (`treelm cluster ...`: cluster_config, ray_runtime, ray_app, ray_replica, ray_ingress, ray_backend;
those import Ray, so they are imported from their modules, not here)."""

from cluster.catalog import Catalog
from cluster.cluster_config import ClusterConfig, ClusterConfigError, load_cluster_config
from cluster.server import ServerConfig, TreeServer
from cluster.trunk import EngineTrunk

__all__: list[str] = [
    "Catalog",
    "ClusterConfig",
    "ClusterConfigError",
    "EngineTrunk",
    "ServerConfig",
    "TreeServer",
    "load_cluster_config",
]
