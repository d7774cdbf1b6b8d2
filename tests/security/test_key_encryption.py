"""`treelm keys gen` encrypts private keys unless told `--no-encrypt`, and everything that loads a
signing key (the CLI's commands, `treelm serve --variant-key`, the SDK) opens an encrypted key with
the passphrase from $TREELM_KEY_PASSPHRASE, `--password-env VAR` or `--password-file FILE`, or
refuses it with a message saying how (exit 2), never a traceback."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import treelm
from cluster.cli import main
from cluster.updates.keys import load_signing_key
from hierarchy.errors import KeyEncryptedError, KeyFormatError
from hierarchy.updates.distribution import parse_delegation
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import PASSPHRASE_ENV
from treelm._updates import load_signing_key as sdk_load_signing_key

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(autouse=True)
def _no_passphrase_in_env(monkeypatch):
    monkeypatch.delenv(PASSPHRASE_ENV, raising=False)
    monkeypatch.setenv("COLUMNS", "400")  # messages on one line, not wrapped in a box


def _cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


def _passphrase_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


def test_keys_gen_without_a_passphrase_refuses_and_writes_nothing(tmp_path, capsys):
    code, out, err = _cli(capsys, "keys", "gen", "--out", tmp_path / "k")
    assert code == 2 and out == ""
    assert f"set {PASSPHRASE_ENV}" in err and "--no-encrypt" in err and "Traceback" not in err
    assert not (tmp_path / "k").exists()
    code, _, err = _cli(capsys, "keys", "gen", "--out", tmp_path / "k", "--no-encrypt", "--password-env", "X")
    assert code == 2 and "--no-encrypt" in err and not (tmp_path / "k").exists()


def test_keys_gen_encrypts_with_the_environment_passphrase(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(PASSPHRASE_ENV, "correct horse")
    code, out, err = _cli(capsys, "keys", "gen", "--out", tmp_path / "k")
    assert code == 0, err
    pem = (tmp_path / "k" / "private.pem").read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_signing_key(tmp_path / "k").keyid == out.strip()  # the variable opens it
    monkeypatch.delenv(PASSPHRASE_ENV)
    with pytest.raises(
        KeyEncryptedError, match=f"key {tmp_path / 'k' / 'private.pem'} is encrypted: set {PASSPHRASE_ENV}"
    ):
        load_signing_key(tmp_path / "k")
    with pytest.raises(KeyEncryptedError, match="is encrypted"):
        sdk_load_signing_key(tmp_path / "k")
    with pytest.raises(KeyFormatError, match="wrong password"):
        load_signing_key(tmp_path / "k", b"wrong")
    assert sdk_load_signing_key(tmp_path / "k", b"correct horse").keyid == out.strip()


def test_no_encrypt_writes_a_plain_key_that_loads_whatever_the_environment(tmp_path, capsys, monkeypatch):
    code, out, _ = _cli(capsys, "keys", "gen", "--no-encrypt", "--out", tmp_path / "k")
    assert code == 0
    assert (tmp_path / "k" / "private.pem").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    monkeypatch.setenv(PASSPHRASE_ENV, "set for other keys")  # must not break a plain key
    assert load_signing_key(tmp_path / "k").keyid == out.strip()


def test_commands_that_sign_take_the_passphrase_from_a_file_or_a_named_variable(tmp_path, capsys, monkeypatch):
    db = f"sqlite:///{tmp_path / 'registry.db'}"
    assert main(["registry", "init", "--db", db]) == 0
    secret = _passphrase_file(tmp_path / "pass", "from a file")
    assert _cli(capsys, "keys", "gen", "--out", tmp_path / "root", "--password-file", secret)[0] == 0
    register = ["keys", "register", tmp_path / "root", "--role", "root", "--db", db]
    code, _, err = _cli(capsys, *register)
    assert code == 2 and f"is encrypted: set {PASSPHRASE_ENV} or pass --password-file" in err
    assert "Traceback" not in err
    assert _cli(capsys, "keys", "ls", "--db", db, "--json")[1].count("keyid") == 0  # nothing registered
    code, _, err = _cli(capsys, *register, "--password-env", "ROOT_PASS")  # a named variable must be set
    assert code == 2 and "ROOT_PASS is not set" in err
    monkeypatch.setenv("ROOT_PASS", "wrong")
    code, _, err = _cli(capsys, *register, "--password-env", "ROOT_PASS")
    assert code == 2 and "wrong password" in err
    secret.chmod(0o644)
    code, _, err = _cli(capsys, *register, "--password-file", secret)
    assert code == 2 and f"chmod 600 {secret}" in err
    secret.chmod(0o600)
    code, _, err = _cli(capsys, *register, "--password-file", secret)
    assert code == 0, err
    monkeypatch.setenv("ROOT_PASS", "from a file")
    assert _cli(capsys, "keys", "gen", "--no-encrypt", "--out", tmp_path / "op")[0] == 0
    code, _, err = _cli(
        capsys, "keys", "register", tmp_path / "op", "--role", "operator", "--sign-with", tmp_path / "root",
        "--db", db, "--password-env", "ROOT_PASS",
    )  # fmt: skip
    assert code == 0, err  # the plain key and the encrypted signer, one passphrase
    assert _cli(capsys, "keys", "ls", "--db", db, "--json")[1].count("keyid") == 2


def _read(fd: int, deadline: float) -> bytes:
    """What the terminal has within the deadline (b"" at its end or when the child closed it)."""
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    if not ready:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:  # the child closed the terminal
        return b""


def _run_in_a_terminal(argv: list[str], answers: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run ``argv`` with a pseudo-terminal as its controlling terminal, answering each prompt in turn."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: stdin/stdout/stderr and /dev/tty are the terminal
        os.environ.pop(PASSPHRASE_ENV, None)
        os.environ["PYTHONPATH"] = str(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "cluster.cli", *argv])
    seen, deadline = b"", time.monotonic() + timeout
    try:
        for answer in answers:
            asked = len(seen)
            # click prints "...:" and then getpass turns echo off and prints " ": answer after that,
            # or the terminal flushes the answer away with the echo change.
            while not seen[asked:].endswith(b": ") and time.monotonic() < deadline:
                seen += _read(fd, deadline)
            os.write(fd, answer.encode() + b"\n")
        while chunk := _read(fd, deadline):
            seen += chunk
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_keys_gen_prompts_twice_on_a_terminal_and_signing_prompts_again(tmp_path):
    code, text = _run_in_a_terminal(["keys", "gen", "--out", str(tmp_path / "k")], ["typed twice", "typed twice"])
    assert code == 0, text
    assert "typed twice" not in text  # hidden input
    assert (tmp_path / "k" / "private.pem").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert load_signing_key(tmp_path / "k", b"typed twice").keyid in text
    delegation = tmp_path / "d.dsse"
    sign = ["keys", "delegate-variants", "rt", "--key", str(tmp_path / "k"), "--sign-with", str(tmp_path / "k")]
    code, text = _run_in_a_terminal([*sign, "--out", str(delegation)], ["typed twice"])
    assert code == 0 and delegation.is_file(), text


@pytest.fixture
def variant_keys(tmp_path, world, capsys, monkeypatch) -> tuple[Path, Path, Path]:
    """An encrypted variant key delegated by an encrypted root key registered in the world's registry."""
    secret = _passphrase_file(tmp_path / "pass", "server secret")
    for name in ("root", "variants"):
        assert _cli(capsys, "keys", "gen", "--out", tmp_path / name, "--password-file", secret)[0] == 0
    monkeypatch.setenv(PASSPHRASE_ENV, "server secret")
    code, _, err = _cli(capsys, "keys", "register", tmp_path / "root", "--role", "root", "--db", world.db_url)
    assert code == 0, err
    delegation = tmp_path / "variants.dsse"
    sign = ["--key", tmp_path / "variants", "--sign-with", tmp_path / "root", "--out", delegation]
    code, _, err = _cli(capsys, "keys", "delegate-variants", world.tree.name, *sign)
    assert code == 0, err
    monkeypatch.delenv(PASSPHRASE_ENV)
    return tmp_path / "variants", delegation, secret


def _serve(world, args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "COLUMNS": "250", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop(PASSPHRASE_ENV, None)
    serve = ["serve", str(world.tree.root), "--db", world.db_url, "--port", "0", "--threads", "1", *args]
    with log.open("w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cluster.cli", *serve], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )


def test_serve_opens_an_encrypted_variant_key_with_its_passphrase_file(world, variant_keys, tmp_path):
    key, delegation, secret = variant_keys
    variants = ["--variant-key", str(key), "--variant-delegation", str(delegation)]
    refused = _serve(world, variants, tmp_path / "refused.log")
    assert refused.wait(120) == 2
    said = " ".join((tmp_path / "refused.log").read_text().split())
    assert f"is encrypted: set {PASSPHRASE_ENV} or pass --password-file" in said and "Traceback" not in said
    assert "loading the base" not in said  # refused before the slow part
    proc = _serve(world, [*variants, "--password-file", str(secret)], tmp_path / "serve.log")
    try:
        found, deadline = None, time.monotonic() + 180
        while found is None and time.monotonic() < deadline and proc.poll() is None:
            found = re.search(r"serving rt on (127\.0\.0\.1:\d+)", (tmp_path / "serve.log").read_text())
            time.sleep(0.2)
        assert found, (tmp_path / "serve.log").read_text()
        with treelm.Client(found.group(1), token=world.tokens["acme"], retries=0, timeout=30) as client:
            bundle = client.trust(world.tree.name)  # the delegation this server's (decrypted) key signs under
        delegated = parse_delegation(Envelope.from_bytes(bundle.delegation).payload)
        assert load_signing_key(key, b"server secret").keyid in {k.keyid for k in delegated.keys}
    finally:
        proc.terminate()
        proc.wait(60)
