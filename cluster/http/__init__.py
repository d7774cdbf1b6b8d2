"""The OpenAI-compatible HTTP API, as vLLM's ``entrypoints/openai`` reads: ``protocol.py`` (the
request and response models, OpenAI's field by field), ``serving/*.py`` (translation to the
engine's GenerationRequest and back, or to the shared calls of files, fine-tuning jobs, feedback
and distribution), ``api_server.py`` (routes, the uvicorn server), ``streams.py`` (SSE) and
``errors.py`` (one OpenAI error shape, statuses from cluster/service/status.py). It runs inside
:class:`cluster.service.server.TreeServer` beside gRPC, with the same admission, tokens, engine
and metrics.
"""

from cluster.http.api_server import HttpApi, HttpLimits, HttpServer

__all__ = ["HttpApi", "HttpLimits", "HttpServer"]
