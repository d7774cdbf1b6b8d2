"""`treelm registry token issue/ls/revoke`: roles, expiry, listing without secrets, bad input."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from registry import authenticate_token, open_registry
from registry.db import init_registry
from registry.errors import InvalidToken


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def db(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    init_registry(url)
    for tenant in ("acme", "ops"):
        assert cli(capsys, "registry", "tenant", "add", tenant, "--db", url)[0] == 0
    return url


def test_issue_list_and_revoke_tokens_without_ever_listing_a_secret(capsys, db, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the table's width (rich reads it)
    code, tenant_token, err = cli(capsys, "registry", "token", "issue", "acme", "--expires-in", "30d", "--db", db)
    assert code == 0 and "expires" in err
    code, operator_token, err = cli(capsys, "registry", "token", "issue", "ops", "--role", "operator", "--db", db)
    assert code == 0 and "operator token" in err
    tenant_token, operator_token = tenant_token.strip(), operator_token.strip()
    with open_registry(db) as reg:
        grant = authenticate_token(reg, tenant_token)
        assert grant.role == "tenant" and grant.expires_at is not None
        assert 29.9 < (grant.expires_at - grant.expires_at.now(grant.expires_at.tzinfo)).total_seconds() / 86400 <= 30
        assert authenticate_token(reg, operator_token).role == "operator"
    code, out, _ = cli(capsys, "registry", "token", "ls", "--json", "--db", db)
    listed = {t["tenant"]: t for t in json.loads(out)["tokens"]}
    assert code == 0 and set(listed) == {"acme", "ops"}
    assert listed["acme"]["state"] == "active" and listed["acme"]["expires_at"] is not None
    assert listed["ops"]["role"] == "operator" and listed["ops"]["expires_at"] is None
    code, table, _ = cli(capsys, "registry", "token", "ls", "--db", db)
    for secret in (tenant_token, operator_token):
        assert secret.split("_", 2)[2] not in out + table  # tlm_<id>_<secret>: ids are shown, secrets never
    assert code == 0 and listed["acme"]["token_id"] in table and "operator" in table

    assert cli(capsys, "registry", "token", "revoke", listed["acme"]["token_id"], "--db", db)[0] == 0
    code, out, _ = cli(capsys, "registry", "token", "ls", "--tenant", "acme", "--json", "--db", db)
    (only,) = json.loads(out)["tokens"]
    assert code == 0 and only["state"] == "revoked" and only["revoked_at"] is not None
    with open_registry(db) as reg, pytest.raises(InvalidToken):
        authenticate_token(reg, tenant_token)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--expires-in", "30"], "positive whole number with a unit"),
        (["--expires-in", "-1d"], "positive whole number with a unit"),
        (["--expires-in", "0h"], "positive whole number with a unit"),
        (["--role", "root"], "token role 'root' is not one of tenant, operator"),
    ],
)
def test_bad_roles_and_lifetimes_exit_2_and_issue_nothing(capsys, db, args, message):
    code, out, err = cli(capsys, "registry", "token", "issue", "acme", *args, "--db", db)
    assert code == 2 and message in " ".join(err.split()) and not out.strip()
    code, out, _ = cli(capsys, "registry", "token", "ls", "--json", "--db", db)
    assert json.loads(out)["tokens"] == []


def test_revoking_an_unknown_token_and_listing_an_unknown_tenant_exit_2(capsys, db):
    code, _, err = cli(capsys, "registry", "token", "revoke", "feedfacefeedface", "--db", db)
    assert code == 2 and "unknown token id" in err
    code, _, err = cli(capsys, "registry", "token", "ls", "--tenant", "nobody", "--db", db)
    assert code == 2 and "unknown tenant" in err
