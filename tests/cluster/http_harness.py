"""Raw HTTP calls for the OpenAI-compatible API's tests (the standard library's http.client, so a
test sees exact statuses, headers and bytes), and the official openai client pointed at a server."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> dict[str, Any]:
        return self.json()["error"]


def _connection(base_url: str, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    url = urllib.parse.urlparse(base_url)
    return http.client.HTTPConnection(url.hostname, url.port, timeout=timeout), url.path.rstrip("/")


def call(
    base_url: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> Answer:
    """``body``: a JSON-able value, raw bytes, or an iterable of byte chunks (sent chunked)."""
    conn, prefix = _connection(base_url, timeout)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    chunked = False
    if body is not None and not isinstance(body, (bytes, bytearray)) and not _is_chunks(body):
        body = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    elif body is not None and _is_chunks(body):
        chunked = True
    try:
        conn.request(method, prefix + path, body=body, headers=sent, encode_chunked=chunked)
        response = conn.getresponse()
        return Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def _is_chunks(body: Any) -> bool:
    return isinstance(body, Iterator)


def events(base_url: str, path: str, body: Any, *, token: str, timeout: float = 120) -> list[Any]:
    """A streamed call's ``data:`` payloads in order (JSON decoded; ``[DONE]`` kept as the string)."""
    answer = call(base_url, "POST", path, body, token=token, timeout=timeout)
    assert answer.status == 200, answer.body
    assert answer.headers["content-type"].startswith("text/event-stream")
    return parse_events(answer.body.decode().split("\n"))


def parse_events(lines: Iterable[str]) -> list[Any]:
    out: list[Any] = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: ") :].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


class OpenStream:
    """A streamed call read event by event; ``close()`` drops the connection (a client that left)."""

    def __init__(self, base_url: str, path: str, body: Any, *, token: str, timeout: float = 120):
        self.conn, prefix = _connection(base_url, timeout)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.conn.request("POST", prefix + path, body=json.dumps(body).encode(), headers=headers)
        self.response = self.conn.getresponse()

    def next_event(self) -> Any:
        while True:
            line = self.response.readline().decode()
            if not line:
                raise EOFError("the stream ended")
            parsed = parse_events([line])
            if parsed:
                return parsed[0]

    def rest(self) -> list[Any]:
        return parse_events(self.response.read().decode().split("\n"))

    def close(self) -> None:
        self.conn.sock and self.conn.sock.close()  # no goodbye: as a killed client would
        self.conn.close()


def openai_client(base_url: str, token: str | None, **kwargs: Any):
    import openai

    return openai.OpenAI(base_url=base_url, api_key=token or "none", max_retries=0, timeout=120, **kwargs)
