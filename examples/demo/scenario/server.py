"""Start and stop the servers the scenario talks to: `treelm serve` and, optionally, a Ray cluster.

Both are stopped in `finally` blocks and on SIGINT/SIGTERM (Ctrl-C), so a run never leaves a
server or a Ray head behind and `make demo` can simply be run again.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from examples.demo.scenario.setup import DemoError, DemoState, cli


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _treelm() -> list[str]:
    return [sys.executable, "-c", "import sys; from cluster.cli import main; sys.exit(main())"]


class ServeProcess:
    """`treelm serve STATE/tree` in a child process (one torch thread), reachable at ``address``."""

    def __init__(self, state: DemoState, port: int | None = None, log: Path | None = None):
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        http_port = free_port()
        self.http_url = f"http://127.0.0.1:{http_port}/v1"  # the OpenAI-compatible API
        self._log = open(log or state.dir / "serve.log", "wb")  # noqa: SIM115 (the server's stdout while it runs)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        args = ["serve", str(state.tree), "--db", state.url, "--port", str(self.port), "--http-port", str(http_port)]
        args += ["--threads", "1", "--grace", "2"]
        args += ["--variant-key", str(state.variant_key), "--variant-delegation", str(state.variant_delegation)]
        self._proc = subprocess.Popen(
            [*_treelm(), *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parents[3],
        )

    def wait_ready(self, token: str, timeout: float = 300.0) -> None:
        from treelm import Client, TreeLMError

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise DemoError(f"treelm serve exited {self._proc.returncode}; see {self._log.name}")
            try:
                with Client(self.address, token=token, timeout=5, retries=0) as client:
                    client.status()
                return
            except TreeLMError:
                time.sleep(0.5)
        raise DemoError(f"treelm serve did not become ready in {timeout:.0f} s; see {self._log.name}")

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._log.close()


class RayCluster:
    """`treelm cluster up` for the state's tree and registry, from examples/demo/cluster.yaml's settings."""

    def __init__(self, state: DemoState, template: Path):
        body = yaml.safe_load(template.read_text())
        body["registry"] = state.url
        for trunk in body.get("trunks", []):
            trunk["tree"] = str(state.tree)
        ingress = body.setdefault("ingress", {})
        ingress["variant_key"] = str(state.variant_key)  # devices pull from the ingress (step 3b)
        ingress["variant_delegations"] = [str(state.variant_delegation)]
        self.config = state.dir / "cluster.yaml"
        self.config.write_text(yaml.safe_dump(body, sort_keys=False))
        self.state_dir = state.dir / "cluster"
        self.address = f"127.0.0.1:{ingress.get('port', 50051)}"
        http_port = ingress.get("http_port", 50080)  # cluster.yaml's default; null turns the API off
        self.http_url = f"http://127.0.0.1:{http_port}/v1" if http_port else None
        self.started = False

    def up(self) -> None:
        self.started = True  # set first: a failed or interrupted `up` is still taken down
        cli("cluster", "up", self.config, "--state-dir", self.state_dir)

    def status(self) -> dict:
        import json

        return json.loads(cli("cluster", "status", "--json", "--state-dir", self.state_dir))

    def down(self) -> None:
        if self.started:
            self.started = False
            cli("cluster", "down", "--state-dir", self.state_dir)


def interrupt_as_keyboard():
    """SIGTERM behaves like Ctrl-C, so the `finally` blocks stop the servers either way.

    Returns the previous handler (to restore), or None off the main thread (nothing changed)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def restore_sigterm(previous) -> None:
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)
