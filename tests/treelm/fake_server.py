"""A scripted stand-in for the TreeLM server (the SDK's neighbour), on a real 127.0.0.1 socket.

Each RPC pops the next step of ``script`` (default: succeed); a step is either
``"ok"`` or ``(StatusCode, details, trailing_metadata)``. Calls are recorded.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass, field

import grpc

from protos.treelm.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)


@dataclass
class Recorder:
    script: list = field(default_factory=list)
    calls: list = field(default_factory=list)  # (method, request, metadata dict)
    chunks_before_failure: int = 0  # streams: chunks sent before a scripted failure
    chunk_delay_s: float = 0.0
    stream_chunks: int = 3
    cancelled = None  # threading.Event set when a stream's client went away

    def step(self, method: str, request, context) -> None:
        self.calls.append((method, request, dict(context.invocation_metadata())))
        action = self.script.pop(0) if self.script else "ok"
        if action != "ok":
            code, details, meta = action
            context.abort_with_status(_Status(code, details, meta))


@dataclass
class _Status(grpc.Status):
    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple


class FakeInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, rec: Recorder):
        self.rec = rec

    def Generate(self, request, context):
        self.rec.step("Generate", request, context)
        prompt = request.prompt if request.HasField("prompt") else "|".join(m.content for m in request.messages)
        return inference_pb2.GenerateResponse(
            request_id=request.request_id or "r1",
            node=request.node,
            node_version=2,
            text=f"echo:{prompt}",
            token_ids=[1, 2, 3],
            finish_reason=inference_pb2.FINISH_REASON_LENGTH,
            usage=inference_pb2.Usage(prompt_tokens=4, completion_tokens=3, total_tokens=7),
            timings=inference_pb2.Timings(queue_s=0.1, ttft_s=0.2, total_s=0.3),
        )

    def GenerateStream(self, request, context):
        rec = self.rec
        rec.cancelled = threading.Event()
        context.add_callback(rec.cancelled.set)
        rec.calls.append(("GenerateStream", request, dict(context.invocation_metadata())))
        action = rec.script.pop(0) if rec.script else "ok"
        if action != "ok":
            for i in range(rec.chunks_before_failure):
                yield inference_pb2.GenerateChunk(request_id="s", node=request.node, index=i, text=f"t{i}")
            code, details, meta = action
            context.abort_with_status(_Status(code, details, meta))
        for i in range(rec.stream_chunks):
            if rec.chunk_delay_s:
                time.sleep(rec.chunk_delay_s)
            if not context.is_active():
                return
            last = i == rec.stream_chunks - 1
            chunk = inference_pb2.GenerateChunk(
                request_id="s", node=request.node, node_version=2, index=i, text=f"t{i}"
            )
            chunk.token_ids.append(10 + i)
            if last:
                chunk.finish_reason = inference_pb2.FINISH_REASON_STOP
                chunk.usage.CopyFrom(inference_pb2.Usage(prompt_tokens=1, completion_tokens=rec.stream_chunks))
            yield chunk


class FakeRegistry(registry_pb2_grpc.RegistryServicer):
    def __init__(self, rec: Recorder):
        self.rec = rec

    def ListNodes(self, request, context):
        self.rec.step("ListNodes", request, context)
        return registry_pb2.ListNodesResponse(
            nodes=[
                registry_pb2.Node(id="demo", tree="demo", level="base", visibility="public"),
                registry_pb2.Node(
                    id="demo/en",
                    tree="demo",
                    path="en",
                    level="language",
                    parent="demo",
                    language="en",
                    visibility="public",
                    aliases={"stable": 1},
                ),
            ]
        )

    def GetNode(self, request, context):
        self.rec.step("GetNode", request, context)
        return registry_pb2.Node(id=request.node, tree="demo", level="language", parent="demo")

    def ListVersions(self, request, context):
        self.rec.step("ListVersions", request, context)
        v = registry_pb2.NodeVersion(node=request.node, version=1, status="accepted", manifest_digest="abc")
        v.metrics.update({"eval_ppl": 12.5})
        v.created_at.FromSeconds(1_700_000_000)
        return registry_pb2.ListVersionsResponse(versions=[v])

    def Match(self, request, context):
        self.rec.step("Match", request, context)
        return registry_pb2.MatchResponse(
            candidates=[
                registry_pb2.MatchCandidate(
                    node="demo/" + request.task,
                    version=1,
                    variant="chain",
                    fit="perfect",
                    memory_bytes=123,
                    score=0.9,
                    reasons=[f"memory={request.memory}"],
                )
            ],
            suggestions=[
                registry_pb2.MatchSuggestion(kind="shorter-context", message="use a shorter context", context=512)
            ],
        )


class FakeAdmin(admin_pb2_grpc.AdminServicer):
    def __init__(self, rec: Recorder):
        self.rec = rec

    def Status(self, request, context):
        self.rec.step("Status", request, context)
        return admin_pb2.StatusResponse(
            version="0.1.0",
            auth_enabled=True,
            tenant="acme",
            trunks=[admin_pb2.Trunk(tree="demo", queue_depth=2, cache=admin_pb2.AdapterCacheCounters(hits=5))],
        )


def start_fake_server() -> tuple[grpc.Server, int, Recorder]:
    rec = Recorder()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServicer_to_server(FakeInference(rec), server)
    registry_pb2_grpc.add_RegistryServicer_to_server(FakeRegistry(rec), server)
    admin_pb2_grpc.add_AdminServicer_to_server(FakeAdmin(rec), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, rec
