"""Repository functions: import, tenant-aware reads, versions and aliases, variants, keys, tokens, deployments."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest
from sqlalchemy import create_engine, text

from registry import (
    AliasError,
    Conflict,
    ImportConflict,
    InvalidInput,
    InvalidToken,
    NodeNotFound,
    SigningKeyNotFound,
    StatusTransitionError,
    TenantNotFound,
    VariantFacts,
    VersionNotFound,
    add_signing_key,
    add_variant,
    add_version,
    create_tenant,
    get_node,
    get_version,
    issue_token,
    list_deployments,
    list_nodes,
    list_signing_keys,
    list_variants,
    list_versions,
    record_deployment,
    register_tree,
    remove_deployment,
    resolve_alias,
    resolve_token,
    revoke_signing_key,
    revoke_token,
    set_alias,
    set_version_status,
)
from tests.registry.helpers import demo_tree, digest, snapshot


def test_import_registers_everything_once(reg, db_url):
    first = register_tree(reg, demo_tree())
    assert (first.nodes_added, first.versions_added) == (10, 10)  # the base and nine nodes
    assert first.variants_added == 2 + 9 * 4 and first.tenants_added == ("st-marys",)
    before = snapshot(db_url)
    again = register_tree(reg, demo_tree())
    assert not again.changed
    assert snapshot(db_url) == before  # idempotent: nothing at all changed
    nodes = {n.node_id: n for n in list_nodes(reg, include_private=True)}
    assert nodes["demo"].level == "base" and nodes["demo"].parent is None
    rad = nodes["demo/en/medical/radiology"]
    assert (rad.parent, rad.level, rad.language, rad.domain, rad.subdomain) == (
        "demo/en/medical",
        "subdomain",
        "en",
        "medical",
        "radiology",
    )
    assert rad.tags == ("imaging",) and rad.stable_version == 1 and rad.candidate_version is None


def test_reimport_follows_descriptive_changes_but_refuses_moved_nodes(reg):
    register_tree(reg, demo_tree())
    tree = demo_tree()
    retagged = tuple(replace(n, tags=("xray",)) if n.path == "en/medical/radiology" else n for n in tree.nodes)
    register_tree(reg, replace(tree, nodes=retagged))
    assert get_node(reg, "demo/en/medical/radiology").node.tags == ("xray",)
    other_base = replace(tree, base=replace(tree.base, digest=digest("another base")))
    with pytest.raises(ImportConflict, match="base never changes"):
        register_tree(reg, other_base)


def test_private_nodes_are_read_only_by_their_owner(demo_reg):
    public = {n.node_id for n in list_nodes(demo_reg)}
    assert "demo/en/medical/oncology" not in public and "demo/en/medical" in public
    mine = {n.node_id for n in list_nodes(demo_reg, tenant="st-marys")}
    assert mine == public | {"demo/en/medical/oncology"}
    with pytest.raises(NodeNotFound) as hidden:
        get_node(demo_reg, "demo/en/medical/oncology", tenant="acme")
    with pytest.raises(NodeNotFound) as missing:
        get_node(demo_reg, "demo/en/medical/nothing", tenant="acme")
    # Same wording for "hidden" and "missing": a private node's existence never leaks.
    assert str(hidden.value).replace("oncology", "X") == str(missing.value).replace("nothing", "X")
    assert get_node(demo_reg, "demo/en/medical/oncology", tenant="st-marys").node.owner == "st-marys"
    with pytest.raises(NodeNotFound):
        list_versions(demo_reg, "demo/en/medical/oncology")


def test_node_detail_carries_base_facts_versions_and_variants(demo_reg):
    detail = get_node(demo_reg, "demo/en/medical")
    assert detail.base.layers == 30 and detail.base.kv_heads == 3 and detail.base.head_dim == 64
    assert [v.version for v in detail.versions] == [1] and detail.versions[0].aliases == ("stable",)
    assert {v.kind for v in detail.variants} == {"chain", "flat", "merged", "merged-int8"}
    chain = next(v for v in detail.variants if v.kind == "chain")
    assert not chain.bytes_estimated
    assert detail.to_json()["versions"][0]["metrics"] == {"eval_ppl": 12.0}
    with pytest.raises(FrozenInstanceError):
        detail.node.level = "domain"  # type: ignore[misc]


def test_versions_aliases_and_status_transitions(demo_reg, db_url):
    node = "demo/en/medical"
    v2 = add_version(demo_reg, node, manifest_digest=digest("v2"), parent_version=1, metrics={"eval_ppl": 11.0})
    assert (v2.version, v2.status, v2.parent_version) == (2, "candidate", 1)
    set_alias(demo_reg, node, "candidate", 2)
    before = snapshot(db_url)
    with pytest.raises(AliasError, match="needs an accepted version"):
        set_alias(demo_reg, node, "stable", 2)
    with pytest.raises(VersionNotFound):
        set_alias(demo_reg, node, "stable", 7)
    with pytest.raises(InvalidInput):
        set_alias(demo_reg, node, "latest", 1)
    with pytest.raises(Conflict, match="next version must be 3"):
        add_version(demo_reg, node, manifest_digest=digest("v5"), version=5)
    assert snapshot(db_url) == before  # every refusal left the database as it was
    set_version_status(demo_reg, node, 2, "accepted")
    moved = set_alias(demo_reg, node, "stable", 2)
    assert (moved.previous_version, moved.version) == (1, 2)
    assert resolve_alias(demo_reg, node).version == 2
    assert {v.version: v.aliases for v in list_versions(demo_reg, node)} == {1: (), 2: ("candidate", "stable")}
    set_version_status(demo_reg, node, 2, "revoked")
    with pytest.raises(StatusTransitionError):
        set_version_status(demo_reg, node, 2, "accepted")
    with pytest.raises(AliasError, match="revoked"):
        set_alias(demo_reg, node, "stable", 2)
    rolled = set_alias(demo_reg, node, "stable", 1)  # rollback moves the alias back
    assert rolled.previous_version == 2 and get_version(demo_reg, node, 2).status == "revoked"


def test_versions_are_immutable_in_the_database(demo_reg):
    v2 = add_version(demo_reg, "demo/en", manifest_digest=digest("en v2"))
    assert v2.version == 2
    # No repository function rewrites a version's content; a duplicate number is refused by the schema.
    engine = demo_reg.engine
    with pytest.raises(Exception), engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO node_versions (node_id, version, manifest_digest, status, metrics, created_at, status_changed_at) "
                "SELECT node_id, 2, manifest_digest, 'candidate', metrics, created_at, status_changed_at "
                "FROM node_versions WHERE version = 2"
            )
        )


def test_variants_measured_replaces_estimated(demo_reg):
    node = "demo/en/legal"
    add_variant(
        demo_reg,
        node,
        1,
        VariantFacts("merged-int8", 123_456, False, 0, tokens_per_second=31.0, measured_device="cpu", uri="/exports/x"),
    )
    int8 = next(v for v in list_variants(demo_reg, node, 1) if v.kind == "merged-int8")
    assert (int8.bytes, int8.bytes_estimated, int8.tokens_per_second, int8.uri) == (123_456, False, 31.0, "/exports/x")
    register_tree(demo_reg, demo_tree())  # a re-import's estimate never overwrites a measurement
    again = next(v for v in list_variants(demo_reg, node, 1) if v.kind == "merged-int8")
    assert again.bytes == 123_456 and not again.bytes_estimated
    with pytest.raises(InvalidInput):
        VariantFacts("gguf", 1, True)


def test_signing_keys_add_list_revoke(demo_reg):
    root = add_signing_key(demo_reg, "root-public-key-base64", "root")
    node_key = add_signing_key(demo_reg, "node-key", "node", node_id="demo/en/medical/radiology")
    evaluator = add_signing_key(demo_reg, "eval-key", "evaluator", node_id="demo/en/medical", key_id="eval-1")
    assert evaluator.key_id == "eval-1" and node_key.node_id == "demo/en/medical/radiology"
    assert len(root.key_id) == 64
    assert [k.key_id for k in list_signing_keys(demo_reg, role="node")] == [node_key.key_id]
    assert [k.key_id for k in list_signing_keys(demo_reg, node_id="demo/en/medical")] == ["eval-1"]
    with pytest.raises(Conflict):
        add_signing_key(demo_reg, "root-public-key-base64", "root")
    with pytest.raises(InvalidInput):
        add_signing_key(demo_reg, "k", "janitor")
    revoked = revoke_signing_key(demo_reg, "eval-1")
    assert revoked.status == "revoked" and revoked.revoked_at is not None
    assert {k.key_id for k in list_signing_keys(demo_reg, status="active")} == {root.key_id, node_key.key_id}
    with pytest.raises(SigningKeyNotFound):
        revoke_signing_key(demo_reg, "nope")


def test_tokens_are_stored_hashed_and_resolve_to_their_tenant(demo_reg):
    issued = issue_token(demo_reg, "st-marys")
    assert issued.token.startswith(f"tlm_{issued.token_id}_")
    assert resolve_token(demo_reg, issued.token).name == "st-marys"
    with demo_reg.engine.connect() as conn:
        stored = conn.execute(text("SELECT salt, token_hash FROM api_tokens")).all()
    secret = issued.token.split("_", 2)[2]
    assert len(stored) == 1 and secret not in stored[0].token_hash and secret not in stored[0].salt
    second = issue_token(demo_reg, "st-marys")
    assert second.token != issued.token
    for bad in (None, "", "tlm_", issued.token + "x", issued.token.replace("tlm_", "xyz_"), f"tlm_nothere_{secret}"):
        with pytest.raises(InvalidToken):
            resolve_token(demo_reg, bad)
    revoke_token(demo_reg, issued.token_id)
    with pytest.raises(InvalidToken):
        resolve_token(demo_reg, issued.token)
    assert resolve_token(demo_reg, second.token).name == "st-marys"
    with pytest.raises(TenantNotFound):
        issue_token(demo_reg, "nobody")
    create_tenant(demo_reg, "acme")
    with pytest.raises(Conflict):
        create_tenant(demo_reg, "acme")
    with pytest.raises(InvalidInput):
        create_tenant(demo_reg, "two words")


def test_deployments_record_update_and_remove(demo_reg):
    record_deployment(demo_reg, "demo/en/medical", trunk="smollm2", endpoint="10.0.0.1:50051", version=1)
    record_deployment(demo_reg, "demo/en/medical", trunk="smollm2", endpoint="10.0.0.1:50051", status="draining")
    record_deployment(demo_reg, "demo/en", trunk="smollm2", endpoint="10.0.0.2:50051")
    found = list_deployments(demo_reg, "demo/en/medical")
    assert [(d.endpoint, d.status, d.version) for d in found] == [("10.0.0.1:50051", "draining", None)]
    assert len(list_deployments(demo_reg)) == 2
    assert get_node(demo_reg, "demo/en").deployments[0].endpoint == "10.0.0.2:50051"
    remove_deployment(demo_reg, "demo/en/medical", "10.0.0.1:50051")
    assert list_deployments(demo_reg, "demo/en/medical") == ()
    with pytest.raises(InvalidInput):
        record_deployment(demo_reg, "demo/en", trunk="t", endpoint="e", status="exploded")


def test_unknown_nodes_and_malformed_ids(demo_reg):
    with pytest.raises(NodeNotFound, match="treelm registry ls"):
        get_node(demo_reg, "demo/xx")
    with pytest.raises(InvalidInput) as info:
        get_node(demo_reg, "demo/Bad Path")
    assert info.value.field == "node"


def test_a_damaged_database_is_a_registry_error_not_a_traceback(reg, db_url):
    from registry import DatabaseUnavailable

    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE nodes RENAME TO nodes_gone"))  # damaged behind our back
    engine.dispose()
    with pytest.raises(DatabaseUnavailable, match="cannot use the registry database"):
        list_nodes(reg)
    with pytest.raises(DatabaseUnavailable, match="cannot use the registry database"):
        register_tree(reg, demo_tree())
