"""Keys through the CLI: gen (0600), register, ls, and key rotation as a table (after python-tuf's
test_updater_key_rotations): (new keys, threshold, who signs) -> accepted or the exact refusal,
with the registry unchanged on refusal; revocation; a rotated-out key can no longer sign updates."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.updates.keys import load_signing_key
from tests.cluster.update_world import TREE, built_tree, honest_adapter, make_world, package_of
from tests.registry.helpers import snapshot

RAD = f"{TREE}/en/medical/radiology"


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split())


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    w = make_world(tmp_path_factory.mktemp("keys"), built_tree(tmp_path_factory), keys=False)
    yield w
    w.close()


def test_gen_writes_a_private_key_only_its_owner_reads(tmp_path, capsys):
    code, out, _ = cli(capsys, "keys", "gen", "--no-encrypt", "--out", tmp_path / "k")
    assert code == 0 and len(out.strip()) == 64
    assert stat.S_IMODE(os.stat(tmp_path / "k" / "private.pem").st_mode) == 0o600
    assert load_signing_key(tmp_path / "k").keyid == out.strip()
    code, _, err = cli(capsys, "keys", "gen", "--no-encrypt", "--out", tmp_path / "k")  # never overwrites a key
    assert code == 2 and "already holds a key" in err


def test_rotation_table(world, tmp_path, capsys):
    db = ("--db", world.url)
    for name in ("root", "other-root", "k1", "k2", "k3", "k4", "k5"):
        assert cli(capsys, "keys", "gen", "--no-encrypt", "--out", tmp_path / name)[0] == 0
    public_only = tmp_path / "k3-public"
    public_only.mkdir()
    shutil.copy(tmp_path / "k3" / "public.pem", public_only / "public.pem")
    assert cli(capsys, "keys", "register", tmp_path / "root", "--role", "root", *db)[0] == 0
    code, _, err = cli(capsys, "keys", "register", tmp_path / "other-root", "--role", "root", *db)
    assert code == 2 and "from the current root keys" in err  # a second root needs the first one's signature
    assert (
        cli(
            capsys,
            "keys",
            "register",
            tmp_path / "k1",
            "--role",
            "node",
            "--node",
            RAD,
            "--sign-with",
            tmp_path / "root",
            *db,
        )[0]
        == 0
    )

    def rotate(new, threshold, signers):
        args = ["keys", "rotate", "--role", "node", "--node", RAD, "--threshold", threshold, *db]
        for n in new:
            args += ["--new", tmp_path / n if n != "k3-public" else public_only]
        for s in signers:
            args += ["--sign-with", tmp_path / s]
        return cli(capsys, *args)

    # (new key set, threshold, signers besides the new keys' own, expected: "ok" or a phrase of the refusal)
    table = [
        (["k2"], 1, ["k1"], "ok"),  # old threshold (k1) and new threshold (k2 signs for itself)
        (["k3"], 1, [], "from the current node keys"),  # the old group did not sign
        (["k3-public"], 1, ["k2"], "from the new keys"),  # the new key did not sign (no proof of possession)
        (["k3-public", "k4"], 2, ["k2"], "from the new keys"),  # 1 of the 2 new signatures
        (["k3", "k4"], 3, ["k2"], "threshold must be between 1 and 2"),  # impossible threshold
        (["k1"], 1, ["k2", "root"], "revoked and can never be trusted again"),  # rotated-out keys stay out
        (["k3", "k4"], 2, ["k2"], "ok"),
        (["k5"], 1, ["k3"], "from the current node keys"),  # the new group needs 2 of {k3, k4}
        (["k5"], 1, ["k3", "k4"], "ok"),
    ]
    for new, threshold, signers, expected in table:
        before = snapshot(world.url)
        code, _, err = rotate(new, threshold, signers)
        if expected == "ok":
            assert code == 0, (new, threshold, signers, err)
        else:
            assert code == 2 and expected in err, (new, threshold, signers, err)
            assert snapshot(world.url) == before, (new, threshold, signers)
    code, out, _ = cli(capsys, "keys", "ls", "--json", *db)
    status = {k["keyid"]: k["status"] for k in json.loads(out)["keys"]}
    ids = {n: load_signing_key(tmp_path / n).keyid for n in ("k1", "k2", "k3", "k4", "k5")}
    assert [status[ids[n]] for n in ("k1", "k2", "k3", "k4", "k5")] == ["revoked"] * 4 + ["active"]

    # Revocation needs root; a revoked key never comes back.
    before = snapshot(world.url)
    code, _, err = cli(capsys, "keys", "revoke", ids["k5"], "--sign-with", tmp_path / "k5", *db)
    assert code == 2 and "root signature" in err and snapshot(world.url) == before
    assert cli(capsys, "keys", "revoke", ids["k5"], "--sign-with", tmp_path / "root", *db)[0] == 0
    code, _, err = cli(
        capsys,
        "keys",
        "register",
        tmp_path / "k5",
        "--role",
        "node",
        "--node",
        RAD,
        "--sign-with",
        tmp_path / "root",
        *db,
    )
    assert code == 2 and "revoked" in err

    # An update signed by a rotated-out key is refused: `update verify` says which check failed.
    pkg = tmp_path / "pkg"
    package_of(
        world,
        "en/medical/radiology",
        honest_adapter(world, "en/medical/radiology"),
        signers=[load_signing_key(tmp_path / "k2")],
        out=pkg,
    )
    code, out, _ = cli(capsys, "update", "verify", pkg, "--tree", world.tree, *db, "--json")
    checks = {c["check"]: c for c in json.loads(out)["checks"]}
    assert code == 1 and checks["keys"]["result"] == "FAILED" and "RevokedKeyError" in checks["keys"]["detail"]
    assert Path(world.tree / "snapshot.json").is_file()
