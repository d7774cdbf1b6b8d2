"""Errors raised by the composition root (the gRPC server and its CLI).

    ClusterError
    ├── ServeError          the server cannot start as configured (bad tree dir, TLS files, port in use)
    └── CallError           one RPC failed for a reason found in cluster/ itself
        ├── Unauthenticated     no bearer token, or one the registry does not know
        ├── PermissionDenied    a valid token that may not do this
        ├── NodeNotVisible      no such node for this caller (unknown, or another tenant's private node)
        ├── BadArgument         a request field is wrong; ``field`` names it
        ├── ShuttingDown        the server is draining and takes no new work
        └── ReplicaUnavailable  the Ray replica serving the call died or is unreachable (retry it)

cluster/service/interceptors.py maps these, and the errors of nodes/ and registry/, to
gRPC status codes in one table.
"""

from __future__ import annotations

__all__ = [
    "BadArgument",
    "CallError",
    "ClusterError",
    "NodeNotVisible",
    "PermissionDenied",
    "ReplicaUnavailable",
    "ServeError",
    "ShuttingDown",
    "Unauthenticated",
]


class ClusterError(Exception):
    """Base of every error raised by :mod:`cluster`."""


class ServeError(ClusterError):
    """The server cannot start as configured."""


class CallError(ClusterError):
    """One RPC failed; the server keeps serving others."""


class Unauthenticated(CallError):
    """The call carries no valid bearer token."""


class PermissionDenied(CallError):
    """The caller's tenant may not do this."""


class NodeNotVisible(CallError):
    """The node does not exist for this caller. Same message whether it is absent or private."""

    def __init__(self, node: str):
        self.node = node
        super().__init__(f"unknown node {node!r}: Client.nodes() or `treelm registry ls` lists the nodes you can use")


class BadArgument(CallError, ValueError):
    """A request field is out of range or malformed; ``field`` names it."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")


class ShuttingDown(CallError):
    """The server is draining for shutdown."""


class ReplicaUnavailable(CallError):
    """The replica serving a call failed (died, its node left); the call did not complete."""
