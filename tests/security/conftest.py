"""Attacks against real servers: a served tree (tests/cluster/grpc_harness.py), raw gRPC stubs and
raw HTTP, and `treelm serve` in its own process where memory or the log is measured."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cluster.grpc_harness import World, make_world

REPO = Path(__file__).resolve().parents[2]
_SERVING = re.compile(r"serving rt on (127\.0\.0\.1:\d+)[^;]*?OpenAI API at\s*(http://[0-9.:]+/v1)")


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory) -> Iterator[World]:
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("security"))
    yield w
    w.engine.close()
    w.registry.close()


@dataclass
class ServeProcess:
    proc: subprocess.Popen
    target: str  # host:port of the gRPC server
    base_url: str  # the OpenAI API's base URL
    log: Path  # stdout and stderr together

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert found, status
        return int(found.group(1)) * 1024


@pytest.fixture
def serve_process_args() -> list[str]:
    """More `treelm serve` arguments for ``serve_process`` (a test parametrizes this name to set them)."""
    return []


@pytest.fixture
def serve_process(world, tmp_path, serve_process_args) -> Iterator[ServeProcess]:
    """`treelm serve` with gRPC and HTTP in its own process; its log goes to a file (nothing to drain)."""
    log = tmp_path / "serve.log"
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    args = ["serve", str(world.tree.root), "--db", world.db_url, "--port", "0", "--http-port", "0"]
    args += serve_process_args
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *args, "--threads", "1"],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 180
        found = None
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            found = _SERVING.search(log.read_text())
            time.sleep(0.2)
        assert found, log.read_text()
        yield ServeProcess(proc, found.group(1), found.group(2), log)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
