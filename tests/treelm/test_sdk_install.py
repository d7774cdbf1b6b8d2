"""`pip install treelm` is the SDK alone: a fresh venv without torch, Ray or SQLAlchemy imports
`from treelm import Client` and generates against a server started from the full install.

The package is installed from a copy of the repository's tracked files (pip builds the wheel
the ordinary way: build isolation, setuptools), never from the working tree in place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest

from tests.cluster.grpc_harness import distribution_for, make_world, serve
from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

_GENERATE = """
import json, sys
from treelm import Client
target, token, node = sys.argv[1:4]
with Client(target, token=token, timeout=120) as client:
    nodes = sorted(n.id for n in client.nodes())
    result = client.generate(node, prompt="the patient", max_new_tokens=6)
absent = []
for name in ("torch", "ray", "transformers", "sqlalchemy"):
    try:
        __import__(name)
    except ImportError:
        absent.append(name)
print(json.dumps({"nodes": nodes, "text": result.text, "tokens": list(result.token_ids), "absent": absent}))
"""


@pytest.fixture(scope="module")
def sdk_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sdk-install")
    source = root / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, source / rel)
    env_dir = root / "v"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    pip = subprocess.run(
        [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=800,
    )
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]
    return env_dir


def test_the_sdk_alone_installs_without_server_packages_and_generates(sdk_venv, tiny_base_dir, tmp_path):
    world = make_world(tiny_base_dir, tmp_path)
    server = serve(world)
    try:
        node = f"{world.tree.name}/en/medical"
        proc = subprocess.run(
            [str(sdk_venv / "bin" / "python"), "-c", _GENERATE, server.target, world.tokens["acme"], node],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,  # not the repository: the installed package must be what runs
        )
        assert proc.returncode == 0, proc.stderr
        answer = json.loads(proc.stdout.strip().splitlines()[-1])
        assert answer["absent"] == ["torch", "ray", "transformers", "sqlalchemy"]
        assert node in answer["nodes"]
        assert len(answer["tokens"]) == 6
    finally:
        server.stop()
        world.engine.close()
        world.registry.close()


def test_the_sdk_install_has_a_cli_that_says_what_a_server_command_needs(sdk_venv, tmp_path):
    treelm = str(sdk_venv / "bin" / "treelm")
    helped = subprocess.run([treelm, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert helped.returncode == 0 and "serve" in helped.stdout
    served = subprocess.run([treelm, "serve", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert served.returncode == 2, served.stderr
    assert "pip install 'treelm[server]'" in served.stderr and "Traceback" not in served.stderr


def test_a_device_with_only_the_sdk_pulls_and_verifies_a_gguf_model(sdk_venv, tiny_base_dir, tmp_path):
    world = make_world(tiny_base_dir, tmp_path)
    distributor, root_fp = distribution_for(world)
    server = serve(world, distribution=distributor)
    try:
        out = tmp_path / "device" / "model"
        command = [
            str(sdk_venv / "bin" / "treelm"),
            "pull",
            "en/medical/radiology",
            "--variant",
            "merged-int8",
            "--hardware",
            "cpu:2GiB",
            "--root-key",
            root_fp,
            "--out",
            str(out),
            "--json",
        ]
        env = {**os.environ, "TREELM_SERVER": server.target, "TREELM_TOKEN": world.tokens["acme"]}
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        pulled = json.loads(proc.stdout)
        assert pulled["node"] == "rt/en/medical/radiology" and pulled["variant"] == "merged-int8"
        assert (out / "treelm-pull.json").is_file() and any(p.suffix == ".gguf" for p in out.iterdir())
    finally:
        server.stop()
        world.engine.close()
        world.registry.close()


def test_the_sdk_ships_its_type_information(sdk_venv):
    site = subprocess.run(
        [str(sdk_venv / "bin" / "python"), "-c", "import treelm, pathlib; print(pathlib.Path(treelm.__file__).parent)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (Path(site.stdout.strip()) / "py.typed").is_file()
