"""The OpenAI-compatible HTTP API, as vLLM's ``entrypoints/openai`` reads: ``protocol.py`` (the
request and response models, OpenAI's field by field), ``serving_*.py`` (translation to the
engine's GenerationRequest and back), ``api_server.py`` (routes, SSE, the uvicorn server) and
``errors.py`` (one OpenAI error shape, statuses from cluster/service/status.py). It runs inside
:class:`cluster.service.server.TreeServer` beside gRPC, with the same admission, tokens, engine
and metrics.
"""

from cluster.http.api_server import HttpApi, HttpLimits, HttpServer

__all__ = ["HttpApi", "HttpLimits", "HttpServer"]
