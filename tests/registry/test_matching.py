"""Matching a task and a device to nodes: ranking, fallback, privacy, revocation, fit bands, suggestions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from sqlalchemy import text

from registry import (
    Hardware,
    InvalidHardware,
    InvalidTask,
    MatchRequest,
    TaskQuery,
    TenantNotFound,
    UnknownTask,
    VariantFacts,
    add_variant,
    create_tenant,
    estimate_memory,
    load_candidates,
    match,
    match_candidates,
    parse_memory_size,
    record_deployment,
    register_tree,
    set_version_status,
)
from registry.candidates import candidate_query
from tests.registry.helpers import DEMO_NODES, demo_tree, smollm2_base

GiB = 2**30


def request(task="en/medical/radiology", memory="8GiB", device="cpu", **kw) -> MatchRequest:
    query = task if isinstance(task, TaskQuery) else TaskQuery.parse(task)
    hw = kw.pop("hardware", None) or Hardware(device, parse_memory_size(memory), bandwidth=kw.pop("bandwidth", None))
    return MatchRequest(query, hw, **kw)


def test_exact_match_ranks_the_deepest_node_first_with_reasons(demo_reg):
    result = match(demo_reg, request())
    best = result.candidates[0]
    assert best.node_id == "demo/en/medical/radiology" and best.version == 1
    assert best.fit == "perfect"
    data = result.to_json()
    assert set(data) == {"candidates", "suggestions"}
    assert set(data["candidates"][0]) == {"node", "version", "variant", "fit", "memory_bytes", "score", "reasons"}
    reasons = " | ".join(best.reasons)
    assert "exact match for task en/medical/radiology" in reasons
    assert "weights" in reasons and "KV cache" in reasons and "runtime overhead" in reasons
    assert "stable version 1 (accepted" in reasons
    # Shallower nodes follow, never ahead of the exact node.
    order = [c.node_id for c in match(demo_reg, request(top=50)).candidates]
    assert order.index("demo/en/medical/radiology") < order.index("demo/en/medical") < order.index("demo/en")
    assert all(c.fit in ("perfect", "good", "marginal") for c in result.candidates)


def test_attribute_task_walks_the_same_lineage_as_the_path(demo_reg):
    by_path = match(demo_reg, request(top=50))
    by_attrs = match(demo_reg, request(TaskQuery(language="en", domain="medical", subdomain="radiology"), top=50))
    assert [c.node_id for c in by_attrs.candidates] == [c.node_id for c in by_path.candidates]
    only_lang = match(demo_reg, request(TaskQuery(language="es"), top=50))
    assert {c.node_id for c in only_lang.candidates} == {"demo/es", "demo"}


def test_unknown_subdomain_falls_back_to_the_closest_ancestor(demo_reg):
    result = match(demo_reg, request("en/medical/dermatology"))
    assert result.target == "demo/en/medical"
    assert result.candidates[0].node_id == "demo/en/medical"
    assert "most specific node for task en/medical/dermatology" in result.candidates[0].reasons[0]


def test_private_nodes_are_candidates_only_for_their_owner(demo_reg):
    def nodes(result):
        return {c.node_id for c in result.candidates}

    anonymous = match(demo_reg, request("en/medical/oncology", top=50))
    assert "demo/en/medical/oncology" not in nodes(anonymous)
    assert anonymous.candidates[0].node_id == "demo/en/medical"
    assert "oncology" not in str(anonymous.to_json()).replace("en/medical/oncology", "")  # only the task echoes it
    owner = match(demo_reg, request("en/medical/oncology", tenant="st-marys"))
    assert owner.candidates[0].node_id == "demo/en/medical/oncology"
    create_tenant(demo_reg, "acme")
    other = match(demo_reg, request("en/medical/oncology", tenant="acme", top=50))
    assert "demo/en/medical/oncology" not in nodes(other)


def test_pure_matching_rechecks_visibility():
    rows = [
        _row("en", depth_attrs=("en", None, None)),
        _row("en/medical", depth_attrs=("en", "medical", None), visibility="private", owner="st-marys"),
    ]
    req = request("en/medical")
    assert {c.node_id for c in match_candidates(rows, req).candidates} == {"demo/en"}
    mine = replace(req, tenant="st-marys")
    assert match_candidates(rows, mine).candidates[0].node_id == "demo/en/medical"


def test_revoked_versions_are_never_returned(demo_reg):
    set_version_status(demo_reg, "demo/en/medical/radiology", 1, "revoked")
    result = match(demo_reg, request(top=50))
    assert "demo/en/medical/radiology" not in {c.node_id for c in result.candidates}
    best = result.candidates[0]
    assert best.node_id == "demo/en/medical"
    assert any("radiology skipped: its stable version 1 is revoked" in r for r in best.reasons)
    rows = load_candidates(demo_reg, TaskQuery(path="en/medical/radiology"))
    assert all(r.variant is None for r in rows if r.node_id == "demo/en/medical/radiology")


def test_fit_bands_at_their_boundaries_through_matching(demo_reg):
    base = smollm2_base()
    params = next(v.adapter_parameters for v in demo_tree().nodes[-1].variants if v.kind == "chain")
    need = estimate_memory(base, "chain", params, device="cpu", dtype="float32", context=2048, batch=1).total

    def fit_at(memory: int) -> str | None:
        hw = Hardware("cpu", memory)
        result = match(demo_reg, request("en/legal/contracts", hardware=hw, top=50))
        found = [c for c in result.candidates if c.node_id == "demo/en/legal/contracts" and c.variant == "chain"]
        assert not found or found[0].memory_bytes == need
        return found[0].fit if found else None

    for percent, inside, outside in ((60, "perfect", "good"), (85, "good", "marginal"), (98, "marginal", None)):
        edge = math.ceil(need * 100 / percent)  # the least memory at which `need` is within `percent`
        assert fit_at(edge) == inside
        assert fit_at(edge - 1) == outside


def test_better_evaluation_ranks_first_at_equal_specificity_and_fit(reg):
    register_tree(reg, demo_tree("alpha"))  # radiology eval_ppl 8
    better = {k: (*v[:7], 3.0) for k, v in DEMO_NODES.items()}
    register_tree(reg, demo_tree("beta", base=smollm2_base("other-base"), nodes=better))
    result = match(reg, request(top=50))
    first = result.candidates[0]
    assert first.node_id == "beta/en/medical/radiology"
    alpha = next(
        c for c in result.candidates if c.node_id == "alpha/en/medical/radiology" and c.variant == first.variant
    )
    assert first.evaluation > alpha.evaluation and first.score > alpha.score
    assert alpha.reasons[0].startswith("exact match")  # equally specific, only ranked lower


def test_fit_and_speed_order_variants_of_one_node(demo_reg):
    base = smollm2_base()
    params = next(v.adapter_parameters for v in demo_tree().nodes[-1].variants if v.kind == "chain")
    chain = estimate_memory(base, "chain", params, device="cpu", dtype="float32", context=2048, batch=1).total
    memory = math.ceil(chain * 100 / 80)  # chain is a good fit, int8 a perfect one
    result = match(demo_reg, request("en/legal/contracts", hardware=Hardware("cpu", memory, bandwidth=50e9), top=50))
    mine = [c for c in result.candidates if c.node_id == "demo/en/legal/contracts"]
    assert mine[0].variant == "merged-int8" and mine[0].fit == "perfect"
    assert {c.fit for c in mine[1:]} == {"good"}
    assert all(c.tokens_per_second and c.tokens_per_second > 0 for c in mine)
    assert mine[0].tokens_per_second > mine[1].tokens_per_second  # fewer bytes read per token
    assert any("tokens/s per sequence" in r for r in mine[0].reasons)


def test_measured_speed_is_used_on_its_device(demo_reg):
    add_variant(
        demo_reg,
        "demo/en/medical/radiology",
        1,
        VariantFacts("merged", 269_060_552, False, 0, tokens_per_second=42.5, measured_device="cpu"),
    )
    result = match(demo_reg, request(top=50))
    merged = next(c for c in result.candidates if c.node_id == "demo/en/medical/radiology" and c.variant == "merged")
    assert merged.tokens_per_second == 42.5
    assert any("measured 42.5 tokens/s on cpu" in r for r in merged.reasons)


def test_no_fit_suggests_a_shorter_context_that_then_fits(demo_reg):
    base = smollm2_base()
    int8_512 = estimate_memory(base, "merged-int8", 0, device="cpu", dtype="float32", context=512, batch=1).total
    memory = math.ceil(int8_512 * 100 / 98)
    result = match(demo_reg, request(hardware=Hardware("cpu", memory)))
    assert result.candidates == ()
    kinds = [s.kind for s in result.suggestions]
    assert kinds[0] == "shorter-context" and kinds[-1] == "remote"
    shorter = result.suggestions[0]
    assert shorter.node_id == "demo/en/medical/radiology" and shorter.variant == "merged-int8"
    assert 384 <= shorter.context <= 512
    again = match(demo_reg, request(hardware=Hardware("cpu", memory), context=shorter.context))
    assert again.candidates[0].node_id == "demo/en/medical/radiology"


def test_no_fit_suggests_a_smaller_variant_and_remote_endpoint(reg):
    nodes = demo_tree().nodes
    chain_only = tuple(replace(n, variants=tuple(v for v in n.variants if v.kind == "chain")) for n in nodes)
    register_tree(reg, replace(demo_tree(), nodes=chain_only))
    record_deployment(reg, "demo/en/medical/radiology", trunk="smollm2", endpoint="treelm.example:50051")
    base = smollm2_base()
    int8 = estimate_memory(base, "merged-int8", 0, device="cpu", dtype="float32", context=2048, batch=1).total
    memory = math.ceil(int8 * 100 / 85)  # int8 would be a good fit; chain does not fit at all
    result = match(reg, request(hardware=Hardware("cpu", memory)))
    assert result.candidates == ()
    smaller = next(s for s in result.suggestions if s.kind == "smaller-variant")
    assert (smaller.node_id, smaller.variant, smaller.fit) == ("demo/en/medical/radiology", "merged-int8", "good")
    assert "treelm export" in smaller.message
    remote = result.suggestions[-1]
    assert remote.kind == "remote" and "treelm.example:50051" in remote.message
    add_variant(reg, "demo/en/medical/radiology", 1, VariantFacts(smaller.variant, 1, True, 0))
    assert match(reg, request(hardware=Hardware("cpu", memory))).candidates[0].variant == smaller.variant


def test_no_fit_suggests_a_shallower_node_of_a_smaller_model(reg):
    register_tree(reg, demo_tree())  # SmolLM2-sized: nothing of it fits below
    small = replace(
        smollm2_base("small"), parameter_count=20_000_000, quantizable_parameter_count=15_000_000, layers=6, kv_heads=1
    )
    small_tree = demo_tree("small", base=small, nodes={"en": DEMO_NODES["en"]})  # no medical nodes at all
    chain_only = tuple(replace(n, variants=tuple(v for v in n.variants if v.kind == "chain")) for n in small_tree.nodes)
    register_tree(reg, replace(small_tree, nodes=chain_only))
    params = next(v.adapter_parameters for v in chain_only[1].variants)
    chain = estimate_memory(small, "chain", params, device="cpu", dtype="float32", context=256, batch=1).total
    int8 = estimate_memory(small, "merged-int8", 0, device="cpu", dtype="float32", context=256, batch=1).total
    memory = math.ceil(int8 * 100 / 98)
    assert chain * 100 > memory * 98  # the registered chain variant does not fit; an int8 export would
    result = match(reg, request(hardware=Hardware("cpu", memory), context=256))
    assert result.candidates == ()
    shallower = next(s for s in result.suggestions if s.kind == "shallower-node")
    assert (shallower.node_id, shallower.variant, shallower.fit) == ("small/en", "merged-int8", "marginal")
    assert "shallower node small/en" in shallower.message


def test_context_beyond_the_base_maximum_does_not_fit(demo_reg):
    result = match(demo_reg, request(context=100_000))
    assert result.candidates == ()
    assert any("exceeds the maximum context 8192" in n for n in result.notes)
    shorter = next(s for s in result.suggestions if s.kind == "shorter-context")
    assert shorter.context <= 8192


def test_bad_tasks_devices_and_tenants(demo_reg):
    with pytest.raises(UnknownTask, match="top-level nodes: en, es"):
        match(demo_reg, request("xx/medical"))
    with pytest.raises(UnknownTask, match="--tree demo"):
        match(demo_reg, request("demo/en/medical"))
    with pytest.raises(UnknownTask, match="known languages"):
        match(demo_reg, request(TaskQuery(language="klingon")))
    with pytest.raises(TenantNotFound):
        match(demo_reg, request(tenant="nobody"))
    with pytest.raises(InvalidHardware) as info:
        Hardware("tpu", GiB)
    assert info.value.field == "device"
    with pytest.raises(InvalidTask):
        TaskQuery.parse("en/Medical!")
    with pytest.raises(InvalidTask):
        TaskQuery.parse("flavour=sweet")


def test_the_candidate_query_uses_indexes_not_a_scan(demo_reg):
    tasks = [
        TaskQuery(path="en/medical/radiology"),
        TaskQuery(language="en", domain="medical", subdomain="radiology"),
        TaskQuery(language="en", subdomain="radiology", tags=("imaging",)),
    ]
    with demo_reg.engine.connect() as conn:
        for task in tasks:
            compiled = candidate_query(task, "st-marys").compile(conn, compile_kwargs={"literal_binds": True})
            if conn.dialect.name == "sqlite":
                plan = " | ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
                assert "SCAN nodes" not in plan, plan
                assert "ix_nodes_" in plan, plan
            else:
                conn.execute(text("SET enable_seqscan = off"))  # tiny tables: ask whether an index path exists
                plan = " | ".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {compiled}"))
                assert "Seq Scan on nodes" not in plan, plan


def _row(path, *, depth_attrs, visibility="public", owner=None):
    from registry import CandidateRow

    lang, dom, sub = depth_attrs
    return CandidateRow(
        node_id=f"demo/{path}",
        tree="demo",
        path=path,
        level=["base", "language", "domain", "subdomain"][path.count("/") + 1],
        language=lang,
        domain=dom,
        subdomain=sub,
        visibility=visibility,
        owner=owner,
        base=smollm2_base(),
        version=1,
        version_status="accepted",
        variant=VariantFacts("merged", 1, True, 0),
    )


def test_gguf_int8_is_offered_everywhere_and_fp16_safetensors_on_gpus_only(demo_reg):
    # merged-int8 is a GGUF Q8_0 file: llama.cpp runs it on CPUs and GPUs alike. float16 safetensors
    # are for GPUs: torch computes fp16 slowly on a CPU, where GGUF files serve in 16 bits or fewer.
    add_variant(demo_reg, "demo/en/medical/cardiology", 1, VariantFacts("merged-fp16", 269_030_016, False, 0))
    cpu = match(demo_reg, request("en/medical/cardiology", memory="24GiB", device="cpu", top=50))
    gpu = match(demo_reg, request("en/medical/cardiology", memory="24GiB", device="cuda", top=50))
    on_cpu = {c.variant for c in cpu.candidates if c.node_id == "demo/en/medical/cardiology"}
    on_gpu = {c.variant for c in gpu.candidates if c.node_id == "demo/en/medical/cardiology"}
    assert "merged-int8" in on_cpu and "merged-int8" in on_gpu
    assert "merged-fp16" in on_gpu and "merged-fp16" not in on_cpu
    int8 = next(c for c in cpu.candidates if c.variant == "merged-int8")
    assert any("weights" in r and "(GGUF Q8_0)" in r for r in int8.reasons)
    assert gpu.candidates[0].node_id == "demo/en/medical/cardiology"


def _small_context_tree(name="small"):
    """The demo tree over a SmolLM2-shaped base whose context limit is 512."""
    return demo_tree(name, base=replace(smollm2_base(name), max_context=512))


def test_a_context_nobody_asked_for_adapts_to_the_model(reg):
    register_tree(reg, _small_context_tree())
    result = match(reg, request(memory="8GiB"))  # no context given: 2048 by default, 512 is the base's limit
    best = result.candidates[0]
    assert best.node_id == "small/en/medical/radiology" and best.memory.context == 512
    assert any("context 512: the limit of base smollm2" in r for r in best.reasons)
    explicit = match(reg, request(memory="8GiB", context=2048))  # asked for: it rules the model out
    assert explicit.candidates == ()
    assert any("context 2048 exceeds the maximum context 512" in n for n in explicit.notes)
    assert match(reg, request(memory="8GiB", context=256)).candidates[0].memory.context == 256


def test_the_default_context_is_2048_where_the_model_allows_more(demo_reg):
    best = match(demo_reg, request()).candidates[0]
    assert best.memory.context == 2048 and not any("the limit of base" in r for r in best.reasons)


def test_a_path_task_finds_nodes_by_their_declared_attributes(reg):
    # en/med/radio declares domain: medical, subdomain: radiology; the task names them by path.
    nodes = {
        "en": DEMO_NODES["en"],
        "en/med": ("domain", "en", "medical", None, (), "public", None, 12.0),
        "en/med/radio": ("subdomain", "en", "medical", "radiology", (), "public", None, 8.0),
        "en/med/cardio": ("subdomain", "en", "medical", "cardiology", (), "public", None, 9.0),
        "en/law": ("domain", "en", "legal", None, (), "public", None, 14.0),
    }
    register_tree(reg, demo_tree("hospital", nodes=nodes))
    result = match(reg, request("en/medical/radiology", top=50))
    assert result.target == "hospital/en/med/radio"
    best = result.candidates[0]
    assert best.node_id == "hospital/en/med/radio" and best.specificity == 1.0
    assert best.reasons[0].startswith("exact match for task en/medical/radiology")
    found = {c.node_id for c in result.candidates}
    assert {"hospital/en/med", "hospital/en", "hospital"} <= found
    assert not found & {"hospital/en/med/cardio", "hospital/en/law"}
    # The attribute spelling of the same task agrees, and a path match still works as before.
    by_attrs = match(reg, request(TaskQuery(language="en", domain="medical", subdomain="radiology"), top=50))
    assert [c.node_id for c in by_attrs.candidates] == [c.node_id for c in result.candidates]
    assert match(reg, request("en/med/cardio")).candidates[0].node_id == "hospital/en/med/cardio"


def test_a_path_task_by_attributes_still_uses_the_indexes(demo_reg):
    with demo_reg.engine.connect() as conn:
        compiled = candidate_query(TaskQuery(path="en/med/radio"), None).compile(
            conn, compile_kwargs={"literal_binds": True}
        )
        if conn.dialect.name == "sqlite":
            plan = " | ".join(str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}"))
            assert "SCAN nodes" not in plan, plan
        else:
            conn.execute(text("SET enable_seqscan = off"))
            plan = " | ".join(r[0] for r in conn.exec_driver_sql(f"EXPLAIN {compiled}"))
            assert "Seq Scan on nodes" not in plan, plan


def test_four_bit_weights_are_offered_only_when_nothing_else_fits(demo_reg):
    from registry.memory import estimate_memory

    node = "demo/en/medical/radiology"
    add_variant(demo_reg, node, 1, VariantFacts("gguf-q4_0", 90_000_000, False, 0))
    roomy = match(demo_reg, request(memory="8GiB", bandwidth=50e9, top=50))
    assert "gguf-q4_0" not in {c.variant for c in roomy.candidates if c.node_id == node}  # int8 and more fit
    base = smollm2_base()
    q4 = estimate_memory(base, "gguf-q4_0", 0, device="cpu", dtype="float32", context=2048, batch=1).total
    int8 = estimate_memory(base, "merged-int8", 0, device="cpu", dtype="float32", context=2048, batch=1).total
    memory = math.ceil(q4 * 100 / 98)
    assert int8 * 100 > memory * 98  # Q8_0 does not fit, Q4_0 just does
    tight = match(demo_reg, request(hardware=Hardware("cpu", memory), top=50))
    assert tight.candidates[0].node_id == node and tight.candidates[0].variant == "gguf-q4_0"
