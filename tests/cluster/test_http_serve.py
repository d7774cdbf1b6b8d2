"""`treelm serve --http-port` in a real process: the official openai client against it, and the
same greedy answers over gRPC from the same process."""

from __future__ import annotations

import http.client
import re
import signal
import ssl
import urllib.parse

import pytest

import treelm
from tests.cluster.grpc_harness import PRIVATE, serve
from tests.cluster.http_harness import call, openai_client
from tests.cluster.test_server_lifecycle import _serve_process, self_signed, world  # noqa: F401 (the module's world)

pytestmark = pytest.mark.timeout(240)


def test_with_tls_the_http_api_speaks_https_only(world, tmp_path):  # noqa: F811
    cert, key = self_signed(tmp_path)
    server = serve(world, tls_cert=cert, tls_key=key, http_port=0)
    try:
        url = urllib.parse.urlparse(server.server.http_url)
        assert url.scheme == "https"
        context = ssl.create_default_context(cafile=str(cert))
        secure = http.client.HTTPSConnection(url.hostname, url.port, context=context, timeout=30)
        secure.request("GET", "/v1/models", headers={"Authorization": f"Bearer {world.tokens['acme']}"})
        assert secure.getresponse().status == 200
        secure.close()
        with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
            call(f"http://{url.hostname}:{url.port}/v1", "GET", "/models", token=world.tokens["acme"], timeout=10)
    finally:
        server.stop()


@pytest.mark.slow
def test_treelm_serve_answers_the_openai_client_and_grpc_alike(world):  # noqa: F811
    proc = _serve_process(world, "--http-port", "0", "--grace", "5")
    try:
        lines, target, base_url = [], None, None
        for line in proc.stdout:
            lines.append(line)
            found = re.search(r"serving rt on (127\.0\.0\.1:\d+).*OpenAI API at (http://127\.0\.0\.1:\d+/v1)", line)
            if found:
                target, base_url = found.groups()
                break
        assert base_url, "".join(lines) + proc.stderr.read()
        client = openai_client(base_url, world.tokens["acme"])
        assert PRIVATE in [m.id for m in client.models.list()]
        messages = [{"role": "user", "content": "Hello"}]
        reply = client.chat.completions.create(model="rt/en/medical", messages=messages, max_tokens=8, temperature=0)
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="rt/en/medical", messages=messages, max_tokens=8, temperature=0, stream=True
            )
        )
        scored = client.completions.create(model="rt/en", prompt="The cat sat", max_tokens=0, echo=True, logprobs=1)
        with treelm.Client(target, token=world.tokens["acme"]) as sdk:
            twin = sdk.generate("rt/en/medical", messages=messages, max_new_tokens=8)
            echo = sdk.generate("rt/en", "The cat sat", max_new_tokens=0, echo=True, logprobs=True).echo
        assert reply.choices[0].message.content == streamed == twin.text
        assert scored.choices[0].logprobs.token_logprobs == pytest.approx([t.logprob for t in echo.logprobs], abs=1e-6)
        anonymous = call(base_url, "GET", "/models")
        assert anonymous.status == 401
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out and "Traceback" not in err
