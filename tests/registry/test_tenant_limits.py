"""Per-tenant limits in the registry (registry/limits.py): set, cleared, read by servers; every
bad input refused with nothing written; and `treelm registry tenant limits` over them."""

from __future__ import annotations

import json

import pytest

from cluster.cli import main
from registry import create_tenant
from registry.errors import InvalidInput, TenantNotFound
from registry.limits import all_tenant_limits, get_tenant_limits, set_tenant_limits


def test_limits_are_set_merged_cleared_and_listed_for_servers(reg):
    create_tenant(reg, "acme")
    create_tenant(reg, "globex")
    assert get_tenant_limits(reg, "acme").limits == {} and all_tenant_limits(reg) == {}
    first = set_tenant_limits(reg, "acme", {"max_running": 4, "tokens_per_minute": 5000})
    assert first.limits == {"max_running": 4, "tokens_per_minute": 5000} and first.updated_at is not None
    second = set_tenant_limits(reg, "acme", {"stored_file_bytes": 3 << 30}, clear=["max_running"])
    assert second.limits == {"tokens_per_minute": 5000, "stored_file_bytes": 3 << 30}  # BIGINT
    set_tenant_limits(reg, "globex", {"max_queued": 8})
    assert all_tenant_limits(reg) == {
        "acme": {"tokens_per_minute": 5000, "stored_file_bytes": 3 << 30},
        "globex": {"max_queued": 8},
    }
    set_tenant_limits(reg, "globex", {}, clear=["max_queued"])
    assert "globex" not in all_tenant_limits(reg)  # nothing set: the servers' own limits


@pytest.mark.parametrize(
    ("values", "clear", "error", "message"),
    [
        ({"max_running": 0}, (), InvalidInput, "max_running must be a whole number 1"),
        ({"max_queued": -3}, (), InvalidInput, "max_queued"),
        ({"tokens_per_minute": True}, (), InvalidInput, "tokens_per_minute"),
        ({"tokens_per_minute": 1.5}, (), InvalidInput, "tokens_per_minute"),
        ({"stored_files": 1 << 63}, (), InvalidInput, "stored_files"),
        ({"max_running": 3_000_000_000}, (), InvalidInput, "max_running must be a whole number 1..2147483647"),
        ({"colour": 3}, (), InvalidInput, "unknown tenant limit 'colour'"),
        ({"max_running": 2}, ("colour",), InvalidInput, "unknown tenant limit 'colour'"),
    ],
)
def test_bad_limits_are_refused_and_change_nothing(reg, values, clear, error, message):
    create_tenant(reg, "acme")
    set_tenant_limits(reg, "acme", {"max_running": 4})
    with pytest.raises(error, match=message):
        set_tenant_limits(reg, "acme", values, clear=clear)
    assert get_tenant_limits(reg, "acme").limits == {"max_running": 4}


def test_an_unknown_tenant_is_refused_and_nothing_is_written(reg):
    with pytest.raises(TenantNotFound, match="treelm registry tenant add nobody"):
        set_tenant_limits(reg, "nobody", {"max_running": 2})
    assert all_tenant_limits(reg) == {}


def test_the_cli_shows_sets_and_unsets_limits(reg, db_url, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    create_tenant(reg, "acme")
    base = ["registry", "tenant", "limits", "acme", "--db", db_url]
    assert main([*base, "--max-running", "4", "--stored-file-bytes", "512MiB"]) == 0
    shown = capsys.readouterr().out
    assert "max_running" in shown and "512.0 MiB" in shown and "the server's" in shown
    assert main([*base, "--unset", "max-running", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tenant"] == "acme" and data["limits"] == {"stored_file_bytes": 512 << 20}
    assert main([*base, "--max-running", "0"]) == 2  # typer's own bound: a message, no traceback
    assert main(["registry", "tenant", "limits", "nobody", "--db", db_url, "--max-queued", "3"]) == 2
    err = capsys.readouterr().err
    assert "unknown tenant 'nobody'" in err and "Traceback" not in err
    assert get_tenant_limits(reg, "acme").limits == {"stored_file_bytes": 512 << 20}
