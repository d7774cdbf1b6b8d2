"""The schema exists only through migrations; old, missing, newer and unreachable databases fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from registry import (
    DatabaseUnavailable,
    InvalidDatabaseUrl,
    RegistryNotInitialised,
    SchemaOutdated,
    SchemaTooNew,
    init_registry,
    list_nodes,
    open_registry,
    register_tree,
    resolve_url,
    schema_status,
    upgrade_registry,
)
from registry.db import head_revision, migrate
from registry.models import Model
from tests.registry.helpers import demo_tree, snapshot


def test_migrations_create_exactly_the_models_schema(db_url):
    status, created = init_registry(db_url)
    assert created and status.current == head_revision() == "0009_tenant_limits"
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            assert set(Model.metadata.tables) | {"alembic_version"} == tables
            # Autogenerate finds nothing to do: models and migrations describe the same schema.
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Model.metadata)
            assert diff == []
            indexes = {i["name"] for i in inspect(conn).get_indexes("nodes")}
            assert {"ix_nodes_path", "ix_nodes_language_domain_subdomain", "ix_nodes_subdomain"} <= indexes
    finally:
        engine.dispose()


def test_init_twice_is_a_no_op(db_url):
    init_registry(db_url)
    status, created = init_registry(db_url)
    assert not created and status.up_to_date


def test_older_schema_asks_for_upgrade_and_upgrade_keeps_data(db_url):
    migrate(db_url, "0001_core")
    assert schema_status(db_url).current == "0001_core"
    with pytest.raises(SchemaOutdated, match="treelm registry upgrade"):
        open_registry(db_url)
    with pytest.raises(SchemaOutdated, match="treelm registry upgrade"):
        init_registry(db_url)
    # Data written at the old schema survives the upgrade.
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('old-tenant', CURRENT_TIMESTAMP)"))
    engine.dispose()
    before, after = upgrade_registry(db_url)
    assert (before.current, after.current) == ("0001_core", head_revision())
    with open_registry(db_url) as reg:
        from registry import get_tenant

        assert get_tenant(reg, "old-tenant").name == "old-tenant"
    assert upgrade_registry(db_url)[1].current == head_revision()  # a second upgrade is a no-op


def test_newer_schema_is_refused(db_url):
    init_registry(db_url)
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_future'"))
    engine.dispose()
    with pytest.raises(SchemaTooNew, match="upgrade treelm"):
        open_registry(db_url)


def test_uninitialised_database_is_refused_and_left_untouched(db_url):
    before = snapshot(db_url) if not db_url.startswith("sqlite") else None
    with pytest.raises(RegistryNotInitialised, match="treelm registry init"):
        open_registry(db_url)
    with pytest.raises(RegistryNotInitialised, match="treelm registry init"):
        upgrade_registry(db_url)
    if db_url.startswith("sqlite"):
        assert not Path(db_url.removeprefix("sqlite:///")).exists()  # no empty file was created just to look
    else:
        assert snapshot(db_url) == before == {}


def test_unreachable_and_malformed_urls():
    with pytest.raises(DatabaseUnavailable, match="cannot reach"):
        open_registry("postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    with pytest.raises(InvalidDatabaseUrl):
        open_registry("not a url at all")
    with pytest.raises(InvalidDatabaseUrl):
        open_registry("nosuchdialect://host/db")


def test_url_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("TREELM_REGISTRY_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_url(None) == f"sqlite:///{tmp_path}/.treelm/registry.db"
    monkeypatch.setenv("TREELM_REGISTRY_URL", "sqlite:///~/other.db")
    assert resolve_url(None) == f"sqlite:///{tmp_path}/other.db"
    assert resolve_url("sqlite:////x/y.db") == "sqlite:////x/y.db"  # the argument wins


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    init_registry(url)
    with open_registry(url) as reg, reg.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def test_a_failed_import_writes_nothing(reg, db_url):
    register_tree(reg, demo_tree())
    before = snapshot(db_url)
    from dataclasses import replace

    from registry import ImportConflict

    tree = demo_tree()
    changed = tuple(replace(n, manifest_digest="f" * 64) if n.path == "en/legal/contracts" else n for n in tree.nodes)
    # A new node is added before the conflicting one is reached: the transaction must drop it too.
    extra = replace(tree.nodes[1], path="de", language="de", manifest_digest="e" * 64)
    with pytest.raises(ImportConflict, match="immutable"):
        register_tree(reg, replace(tree, nodes=(changed[0], extra, *changed[1:])))
    assert snapshot(db_url) == before
    assert "demo/de" not in {n.node_id for n in list_nodes(reg, include_private=True)}


def test_variant_kinds_migration_keeps_variants_and_the_database_enforces_the_kinds(db_url):
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    from registry import VariantFacts, add_variant, list_variants
    from registry.db import _alembic_config

    init_registry(db_url)
    with open_registry(db_url) as reg:
        register_tree(reg, demo_tree())
    engine = create_engine(db_url)
    with engine.connect() as conn, conn.begin():
        command.downgrade(_alembic_config(conn), "0003_updates")
    engine.dispose()
    before, after = upgrade_registry(db_url)
    assert (before.current, after.current) == ("0003_updates", head_revision())
    with open_registry(db_url) as reg:
        kinds = {v.kind for v in list_variants(reg, "demo/en/medical/radiology", 1)}
        assert kinds == {"chain", "flat", "merged", "merged-int8"}  # the rows survived the table copy
        add_variant(reg, "demo/en/medical/radiology", 1, VariantFacts("gguf-lora", 1_000, False, 10))
        assert "gguf-lora" in {v.kind for v in list_variants(reg, "demo/en/medical/radiology", 1)}
    engine = create_engine(db_url)
    try:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE variants SET kind = 'onnx' WHERE kind = 'gguf-lora'"))
    finally:
        engine.dispose()


def test_token_roles_migration_keeps_old_tokens_as_tenant_tokens_without_expiry(db_url):
    from alembic import command
    from sqlalchemy.exc import IntegrityError

    from registry import authenticate_token, create_tenant, issue_token
    from registry.access import _hash
    from registry.db import _alembic_config

    init_registry(db_url)
    engine = create_engine(db_url)
    with engine.connect() as conn, conn.begin():
        command.downgrade(_alembic_config(conn), "0004_variant_kinds")
    salt, secret = "ab" * 16, "old-secret"
    with engine.begin() as conn:  # a token as the previous schema stored it (no role, no expiry)
        conn.execute(text("INSERT INTO tenants (name, created_at) VALUES ('acme', CURRENT_TIMESTAMP)"))
        conn.execute(
            text(
                "INSERT INTO api_tokens (token_id, tenant_id, salt, token_hash, created_at) "
                "SELECT '0123456789abcdef', id, :salt, :hash, CURRENT_TIMESTAMP FROM tenants WHERE name = 'acme'"
            ),
            {"salt": salt, "hash": _hash(salt, secret)},
        )
    engine.dispose()
    assert upgrade_registry(db_url)[1].current == "0009_tenant_limits"
    with open_registry(db_url) as reg:
        grant = authenticate_token(reg, f"tlm_0123456789abcdef_{secret}")
        assert (grant.tenant, grant.role, grant.expires_at) == ("acme", "tenant", None)
        create_tenant(reg, "ops")
        assert authenticate_token(reg, issue_token(reg, "ops", role="operator").token).role == "operator"
    engine = create_engine(db_url)
    try:
        with pytest.raises(IntegrityError), engine.begin() as conn:
            conn.execute(text("UPDATE api_tokens SET role = 'root'"))  # the database enforces the roles
    finally:
        engine.dispose()
