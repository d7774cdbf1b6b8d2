"""Files: the registry's SQLite file is created 0600 (its new folder 0700), key folders 0700, and a
private key (signing or TLS) that others may read is refused with the chmod that fixes it."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import treelm
from cluster.cli import main
from cluster.updates.keys import load_signing_key
from hierarchy.errors import KeyFormatError
from hierarchy.updates.keys import SigningKey
from treelm._updates import load_signing_key as sdk_load_signing_key

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def usual_umask():
    """The common 022: without our modes, new files would be world-readable."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_registry_init_creates_the_database_0600_in_a_new_folder_0700(tmp_path, capsys):
    db = tmp_path / "state" / "registry.db"
    assert main(["registry", "init", "--db", f"sqlite:///{db}"]) == 0
    assert _mode(db) == 0o600 and _mode(db.parent) == 0o700
    assert main(["registry", "ls", "--db", f"sqlite:///{db}"]) == 0  # a working registry
    for extra in db.parent.iterdir():  # journal / WAL files SQLite left beside it share its mode
        assert _mode(extra) & 0o077 == 0, extra


def test_an_existing_database_keeps_its_mode(tmp_path):
    db = tmp_path / "registry.db"
    db.touch(mode=0o640)
    db.chmod(0o640)
    assert main(["registry", "init", "--db", f"sqlite:///{db}"]) == 0
    assert _mode(db) == 0o640


def test_keys_gen_makes_a_private_folder_and_key(tmp_path):
    out = tmp_path / "keys" / "operator"
    assert main(["keys", "gen", "--no-encrypt", "--out", str(out)]) == 0
    assert _mode(out) == 0o700 and _mode(out / "private.pem") == 0o600
    assert load_signing_key(out).keyid


def _exposed_key(tmp_path: Path, mode: int) -> Path:
    file = tmp_path / "exposed.pem"
    file.write_bytes(SigningKey.generate().to_pem())
    file.chmod(mode)
    return file


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_signing_key_others_may_read_is_refused_with_the_fix(tmp_path, mode):
    file = _exposed_key(tmp_path, mode)
    with pytest.raises(KeyFormatError, match=f"chmod 600 {file}"):
        load_signing_key(file)
    with pytest.raises(treelm.InvalidRequest, match=f"chmod 600 {file}") as info:
        sdk_load_signing_key(file)
    assert info.value.field == "key"
    file.chmod(0o600)
    assert load_signing_key(file) == sdk_load_signing_key(file)


def test_the_cli_refuses_an_exposed_signing_key_with_exit_2(tmp_path, capsys):
    file = _exposed_key(tmp_path, 0o644)
    code = main(["update", "approve", "some-candidate", "--key", str(file), "--tree", str(tmp_path)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err and f"chmod 600 {file}" in err


def test_treelm_serve_refuses_a_tls_key_others_may_read(world, tmp_path, capsys):
    from tests.cluster.test_server_lifecycle import self_signed

    cert, key = self_signed(tmp_path)
    key.chmod(0o644)
    code = main(["serve", str(world.tree.root), "--db", world.db_url, "--tls-cert", str(cert), "--tls-key", str(key)])
    err = "".join(capsys.readouterr().err.split())
    assert code == 2 and "Traceback" not in err and f"chmod600{key}" in err
