"""Shared helpers for registry tests: database URLs (SQLite and PostgreSQL), synthetic trees, snapshots.

Every registry test that touches a database runs on SQLite and, when
``TREELM_TEST_POSTGRES_URL`` is set, on PostgreSQL too, each test in its own
schema (dropped afterwards), because CI and developers share that database.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url

from registry import BaseFacts, ImportNode, TreeImport, VariantFacts

PG_ENV = "TREELM_TEST_POSTGRES_URL"


def digest(seed: str) -> str:
    import hashlib

    return hashlib.sha256(seed.encode()).hexdigest()


@contextmanager
def postgres_schema_url(base_url: str) -> Iterator[str]:
    """A URL whose search_path is a fresh schema, dropped on exit."""
    schema = f"treelm_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        url = make_url(base_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@contextmanager
def database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'registry.db'}"
        return
    base = os.environ[PG_ENV]
    with postgres_schema_url(base) as url:
        yield url


def snapshot(url: str) -> dict[str, list[tuple]]:
    """Every row of every table (sorted), to assert that a failed operation wrote nothing."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            out = {}
            for table in sorted(inspect(conn).get_table_names()):
                rows = conn.execute(text(f'SELECT * FROM "{table}"')).all()
                out[table] = sorted(tuple(map(repr, r)) for r in rows)
            return out
    finally:
        engine.dispose()


# SmolLM2-135M's architecture (config.json of HuggingFaceTB/SmolLM2-135M-Instruct).
SMOLLM2 = dict(
    model="smollm2",
    architecture="LlamaForCausalLM",
    weight_dtype="bfloat16",
    parameter_count=134_515_008,
    quantizable_parameter_count=106_168_320,
    weights_bytes=269_060_552,
    layers=30,
    hidden_size=576,
    attention_heads=9,
    kv_heads=3,
    head_dim=64,
    vocab_size=49_152,
    max_context=8192,
    intermediate_size=1536,
)


def smollm2_base(seed: str = "smollm2") -> BaseFacts:
    return BaseFacts(digest=digest(seed), **SMOLLM2)


def variants(adapter_parameters: int, kinds: tuple[str, ...] = ("chain", "flat", "merged", "merged-int8")) -> tuple:
    sizes = {"chain": 269_000_000, "flat": 269_500_000, "merged": 269_060_552, "merged-int8": 150_000_000}
    return tuple(
        VariantFacts(kind, sizes[kind], kind != "chain", adapter_parameters if kind in ("chain", "flat") else 0)
        for kind in kinds
    )


# path -> (level, language, domain, subdomain, tags, visibility, owner, eval_ppl)
DEMO_NODES = {
    "en": ("language", "en", None, None, (), "public", None, 20.0),
    "es": ("language", "es", None, None, (), "public", None, 22.0),
    "en/medical": ("domain", "en", "medical", None, ("clinical", "health"), "public", None, 12.0),
    "en/legal": ("domain", "en", "legal", None, ("law",), "public", None, 14.0),
    "es/medical": ("domain", "es", "medical", None, ("clinical",), "public", None, 13.0),
    "en/medical/radiology": ("subdomain", "en", "medical", "radiology", ("imaging",), "public", None, 8.0),
    "en/medical/cardiology": ("subdomain", "en", "medical", "cardiology", ("heart",), "public", None, 9.0),
    "en/medical/oncology": ("subdomain", "en", "medical", "oncology", (), "private", "st-marys", 7.0),
    "en/legal/contracts": ("subdomain", "en", "legal", "contracts", (), "public", None, 10.0),
}


def demo_tree(name: str = "demo", base: BaseFacts | None = None, nodes: dict | None = None) -> TreeImport:
    """A TreeImport shaped like examples/demo/tree.yaml over SmolLM2-135M (no files needed)."""
    base = base or smollm2_base()
    spec = DEMO_NODES if nodes is None else nodes
    out = [ImportNode("", "base", base.digest, variants=variants(0, ("chain", "merged-int8")))]
    rank_params = 2 * 8 * 576 * 4 * 30  # r=8 on four 576x576-ish projections, 30 layers (approximate)
    for path, (level, lang, dom, sub, tags, vis, owner, ppl) in spec.items():
        depth = path.count("/") + 1
        out.append(
            ImportNode(
                path=path,
                level=level,
                manifest_digest=digest(f"{name}/{path}@1"),
                version=1,
                parent_version=1 if depth > 1 else None,
                language=lang,
                domain=dom,
                subdomain=sub,
                tags=tags,
                visibility=vis,
                owner=owner,
                metrics={"eval_ppl": ppl},
                variants=variants(rank_params * depth),
            )
        )
    return TreeImport(name=name, base=base, nodes=tuple(out))


def write_built_tree(root: Path, base_dir: Path, name: str = "demo", nodes: dict | None = None, r: int = 4) -> Path:
    """A built tree on disk in nodes.store.tree's layout: tree.json, node.json, real PEFT adapters.

    Adapters are random (rank ``r`` on q_proj and v_proj of every layer); what the
    registry reads is the layout, the digests and the safetensors headers.
    """
    import json

    import torch

    from hierarchy.chain import LoraFactors
    from nodes.base.model import base_digest
    from nodes.store.adapters import AdapterWeights, write_adapter

    config = json.loads((base_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    shapes = {"q_proj": heads * head_dim, "v_proj": config["num_key_value_heads"] * head_dim}
    generator = torch.Generator().manual_seed(0)
    spec = DEMO_NODES if nodes is None else nodes
    base = base_digest(base_dir)
    records: dict[str, dict] = {}
    for path, (level, lang, dom, sub, tags, vis, owner, ppl) in spec.items():
        factors = {
            f"model.layers.{i}.self_attn.{proj}": LoraFactors(
                A=torch.randn(r, hidden, generator=generator) * 0.1,
                B=torch.randn(out, r, generator=generator) * 0.1,
                scale=2.0,
            )
            for i in range(config["num_hidden_layers"])
            for proj, out in shapes.items()
        }
        directory = root / "nodes" / path
        files = write_adapter(
            AdapterWeights(r=r, alpha=2.0 * r, target_modules=("q_proj", "v_proj"), factors=factors),
            directory,
            base_model_name_or_path=str(base_dir),
        )
        parent = path.rpartition("/")[0]
        record = {
            "id": f"{name}/{path}",
            "level": level,
            "parent": f"{name}/{parent}" if parent else name,
            "version": 1,
            "parent_version": 1 if parent else None,
            "parent_adapter_digest": records[parent]["files"]["adapter_model.safetensors"]["sha256"]
            if parent
            else None,
            "base_digest": base,
            "language": lang,
            "domain": dom,
            "subdomain": sub,
            "tags": list(tags),
            "visibility": vis,
            "owner": owner,
            "description": f"the {path} node",
            "lora": {"r": r, "alpha": 2.0 * r, "target_modules": ["q_proj", "v_proj"]},
            "metrics": {"eval_ppl": ppl, "parent_eval_ppl": ppl * 1.2},
            "files": {f: {"sha256": sha, "length": (directory / f).stat().st_size} for f, sha in sorted(files.items())},
        }
        (directory / "node.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        records[path] = record
    tree = {
        "name": name,
        "base": {"dir": str(base_dir), "digest": base, "model": "tiny"},
        "spec_digest": "",
        "nodes": list(spec),
    }
    (root / "tree.json").write_text(json.dumps(tree, indent=2, sort_keys=True))
    return root
