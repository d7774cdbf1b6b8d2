"""The SDK never uploads what a link in an update package points to, nor a special file: it refuses
the package with InvalidRequest (field ``package``) before opening a connection's stream."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import treelm
from hierarchy.updates.envelope import Envelope
from tests.cluster.grpc_harness import serve

pytestmark = pytest.mark.timeout(300)


def _package(root: Path) -> Path:
    envelope = Envelope("application/vnd.treelm.update+json", json.dumps({"node": "rt/en/legal"}).encode())
    (root / "files" / "sub").mkdir(parents=True)
    (root / "envelope.json").write_bytes(envelope.to_bytes())
    (root / "files" / "adapter_model.safetensors").write_bytes(b"weights")
    return root


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text("the contents of another file on this machine")
    return secret


def _link_to_file(pkg: Path, secret: Path) -> None:
    (pkg / "files" / "sub" / "adapter_config.json").symlink_to(secret)


def _link_to_dir(pkg: Path, secret: Path) -> None:
    (pkg / "files" / "elsewhere").symlink_to(secret.parent, target_is_directory=True)


def _fifo(pkg: Path, secret: Path) -> None:
    os.mkfifo(pkg / "files" / "pipe")


def _linked_files_dir(pkg: Path, secret: Path) -> None:
    (pkg / "files" / "adapter_model.safetensors").unlink()
    (pkg / "files" / "sub").rmdir()
    (pkg / "files").rmdir()
    (pkg / "files").symlink_to(secret.parent, target_is_directory=True)


def _linked_envelope(pkg: Path, secret: Path) -> None:
    real = pkg.parent / "real-envelope.json"
    (pkg / "envelope.json").rename(real)
    (pkg / "envelope.json").symlink_to(real)


@pytest.mark.parametrize(
    "attack,culprit,what",
    [
        (_link_to_file, "files/sub/adapter_config.json", "a symbolic link"),
        (_link_to_dir, "files/elsewhere", "a symbolic link"),
        (_fifo, "files/pipe", "not a regular file"),
        (_linked_files_dir, "files", "a symbolic link"),
        (_linked_envelope, "envelope.json", "a symbolic link"),
    ],
    ids=["link-to-file", "link-to-dir", "fifo", "files-dir-is-a-link", "envelope-is-a-link"],
)
def test_the_sdk_refuses_links_and_special_files_in_a_package_before_uploading(world, tmp_path, attack, culprit, what):
    pkg = _package(tmp_path / "pkg")
    attack(pkg, _secret(tmp_path))
    server = serve(world)
    try:
        with treelm.Client(server.target, token=world.tokens["acme"], retries=0) as client:
            with pytest.raises(treelm.InvalidRequest) as info:
                client.submit_update(pkg)
    finally:
        server.stop()
    error = info.value
    assert error.field == "package" and error.code is None  # refused here: the server never saw a chunk
    assert str(pkg / culprit) in error.details and what in error.details


def test_a_package_of_regular_files_still_streams(world, tmp_path):
    from treelm._updates import package_chunks

    pkg = _package(tmp_path / "pkg")
    (pkg / "files" / "sub" / "adapter_config.json").write_text("{}")
    chunks = list(package_chunks(pkg))
    assert chunks[0].node == "rt/en/legal"
    assert [(c.file, c.data) for c in chunks[1:]] == [
        ("adapter_model.safetensors", b"weights"),
        ("sub/adapter_config.json", b"{}"),
    ]
