"""The standard gRPC health service (``grpc.health.v1.Health``), aware of draining.

Unlike the reference servicer, a ``Watch`` ends right after it has sent
NOT_SERVING for a draining server, so open health watches never hold a
graceful shutdown for its whole grace period.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["DrainingHealth"]

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealth(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {"": _SERVING}
        self._version = 0  # bumped on every change; watchers wait for it to move
        self._changed = asyncio.Condition()
        self.draining = False

    async def _bump(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def set(self, service: str, status: int) -> None:
        self._status[service] = status
        await self._bump()

    async def drain(self) -> None:
        """Every service turns NOT_SERVING; watches receive it and end."""
        self.draining = True
        for service in self._status:
            self._status[service] = _NOT_SERVING
        await self._bump()

    async def Check(self, request, context):
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request, context):
        last = None
        while True:
            seen = self._version
            status = self._status.get(request.service, _UNKNOWN)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if self.draining:
                return
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self._version != seen)
