"""Match latency on a registry of 100,000 nodes (4 levels), on SQLite and PostgreSQL.

The synthetic tree has realistic fan-out: a base, 25 languages, 40 domains per
language, 99 sub-domains per domain (100,026 nodes), each node with one accepted
stable version and four variants, 2% of sub-domains private. Tasks are a mix of
exact paths (70%), unknown sub-domains that fall back to their domain (10%) and
attribute tasks (20%). We time `registry.match` end to end (the one indexed
query + the pure ranking) and, as the baseline measured in the same run, the
same match done the naive way: fetch every node with its variants and filter in
Python (a full scan). Targets: p50 <= 20 ms on SQLite, <= 50 ms on PostgreSQL.

    python benchmarks/registry_bench.py [--postgres URL] [--nodes-per-domain 99] [--queries 300]

PostgreSQL: --postgres, else $TREELM_BENCH_POSTGRES_URL, else $TREELM_TEST_POSTGRES_URL
(the run uses a fresh schema and drops it). Writes benchmarks/results/registry_bench.{json,png};
the last line printed is ``match p50: sqlite=X.X ms postgres=Y.Y ms``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, select, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from registry import (  # noqa: E402
    BaseFacts,
    Hardware,
    ImportNode,
    MatchRequest,
    TaskQuery,
    TreeImport,
    VariantFacts,
    init_registry,
    match,
    match_candidates,
    open_registry,
    register_tree,
)
from registry.candidates import all_candidates_query, fold_rows  # noqa: E402
from registry.models import Node  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
LANGS, DOMAINS = 25, 40


def _digest(text_: str) -> str:
    return hashlib.sha256(text_.encode()).hexdigest()


def synthetic_tree(subdomains: int) -> TreeImport:
    base = BaseFacts(
        digest=_digest("bench-base"),
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
    )
    rng = random.Random(0)

    def variants(params: int) -> tuple:
        return (
            VariantFacts("chain", 269_000_000 + params * 4, False, params),
            VariantFacts("flat", 269_000_000 + params * 4, True, params),
            VariantFacts("merged", 269_060_552, True, 0),
            VariantFacts("merged-int8", 219_000_000, True, 0),
        )

    nodes = [ImportNode("", "base", base.digest, variants=variants(0))]
    for li in range(LANGS):
        lang = f"l{li:02d}"
        nodes.append(
            ImportNode(
                lang, "language", _digest(lang), language=lang, metrics={"eval_ppl": 20.0}, variants=variants(1_105_920)
            )
        )
        for di in range(DOMAINS):
            dom = f"d{di:02d}"
            path = f"{lang}/{dom}"
            nodes.append(
                ImportNode(
                    path,
                    "domain",
                    _digest(path),
                    parent_version=1,
                    language=lang,
                    domain=dom,
                    tags=(f"t{di % 7}",),
                    metrics={"eval_ppl": 12.0},
                    variants=variants(2_211_840),
                )
            )
            for si in range(subdomains):
                sub = f"s{si:02d}"
                p = f"{path}/{sub}"
                private = rng.random() < 0.02
                nodes.append(
                    ImportNode(
                        p,
                        "subdomain",
                        _digest(p),
                        parent_version=1,
                        language=lang,
                        domain=dom,
                        subdomain=sub,
                        visibility="private" if private else "public",
                        owner=f"tenant{si % 10}" if private else None,
                        metrics={"eval_ppl": 6.0 + rng.random() * 6},
                        variants=variants(3_317_760),
                    )
                )
    return TreeImport("bench", base, tuple(nodes))


def tasks(count: int, subdomains: int) -> list[TaskQuery]:
    rng = random.Random(1)
    out = []
    for _ in range(count):
        lang, dom, sub = (
            f"l{rng.randrange(LANGS):02d}",
            f"d{rng.randrange(DOMAINS):02d}",
            f"s{rng.randrange(subdomains):02d}",
        )
        roll = rng.random()
        if roll < 0.7:
            out.append(TaskQuery(path=f"{lang}/{dom}/{sub}"))
        elif roll < 0.8:
            out.append(TaskQuery(path=f"{lang}/{dom}/unknown"))
        else:
            out.append(TaskQuery(language=lang, domain=dom, subdomain=sub))
    return out


def full_scan_match(reg, request: MatchRequest):
    """The baseline: every node with its variants from the database, matching done in Python."""
    with reg.read() as session:
        rows = fold_rows(session.execute(all_candidates_query(request.tenant)).all())
    return match_candidates(rows, request)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_backend(name: str, url: str, tree: TreeImport, queries: list[TaskQuery], baseline_queries: int) -> dict:
    init_registry(url)
    reg = open_registry(url)
    started = time.perf_counter()
    result = register_tree(reg, tree)
    load_s = time.perf_counter() - started
    with reg.engine.begin() as conn:  # fresh statistics after a bulk load, as an operator would run
        conn.execute(text("ANALYZE"))
    with reg.read() as session:
        count = session.scalar(select(Node.id).order_by(Node.id.desc()).limit(1))
    hw = Hardware("cpu", 8 * 2**30)
    for task in queries[:20]:  # warm caches and the connection pool
        match(reg, MatchRequest(task, hw))
    latencies, hits = [], 0
    for task in queries:
        t0 = time.perf_counter()
        res = match(reg, MatchRequest(task, hw))
        latencies.append((time.perf_counter() - t0) * 1000)
        hits += bool(res.candidates)
    naive = []
    for task in queries[:baseline_queries]:
        t0 = time.perf_counter()
        slow = full_scan_match(reg, MatchRequest(task, hw))
        naive.append((time.perf_counter() - t0) * 1000)
        fast = match(reg, MatchRequest(task, hw))
        assert [c.node_id for c in slow.candidates] == [c.node_id for c in fast.candidates], task
    reg.close()
    return {
        "backend": name,
        "nodes": result.nodes_added,
        "max_node_pk": count,
        "import_s": round(load_s, 2),
        "queries": len(queries),
        "answered": hits,
        "p50_ms": statistics.median(latencies),
        "p95_ms": percentile(latencies, 0.95),
        "max_ms": max(latencies),
        "full_scan_p50_ms": statistics.median(naive),
        "baseline_queries": len(naive),
    }


def postgres_url(cli_value: str | None) -> str | None:
    return cli_value or os.environ.get("TREELM_BENCH_POSTGRES_URL") or os.environ.get("TREELM_TEST_POSTGRES_URL")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--postgres", default=None, help="PostgreSQL URL (a fresh schema is used and dropped)")
    parser.add_argument("--nodes-per-domain", type=int, default=99, help="sub-domains per domain (99 -> 100,026 nodes)")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--baseline-queries", type=int, default=2)
    args = parser.parse_args()

    tree = synthetic_tree(args.nodes_per_domain)
    queries = tasks(args.queries, args.nodes_per_domain)
    print(f"synthetic registry: {len(tree.nodes):,} nodes, {sum(len(n.variants) for n in tree.nodes):,} variants")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run_backend("sqlite", f"sqlite:///{tmp}/bench.db", tree, queries, args.baseline_queries))
    pg = postgres_url(args.postgres)
    if pg:
        schema = f"treelm_bench_{uuid.uuid4().hex[:10]}"
        admin = create_engine(pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        try:
            url = make_url(pg).update_query_dict({"options": f"-csearch_path={schema}"})
            rows.append(
                run_backend("postgres", url.render_as_string(hide_password=False), tree, queries, args.baseline_queries)
            )
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            admin.dispose()
    report(rows)
    by = {r["backend"]: r for r in rows}
    pg_text = f"{by['postgres']['p50_ms']:.1f} ms" if "postgres" in by else "n/a"
    print(f"match p50: sqlite={by['sqlite']['p50_ms']:.1f} ms postgres={pg_text}")
    return 0


def report(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    targets = {"sqlite": 20.0, "postgres": 50.0}
    table = Table(title="registry match latency, 100k-node registry (ms)")
    for col in ("backend", "nodes", "import s", "p50", "p95", "max", "target p50", "full scan p50", "speed-up"):
        table.add_column(col, justify="left" if col == "backend" else "right")
    for r in rows:
        r["target_p50_ms"] = targets[r["backend"]]
        r["speedup_vs_full_scan"] = r["full_scan_p50_ms"] / r["p50_ms"]
        table.add_row(
            r["backend"],
            f"{r['nodes']:,}",
            f"{r['import_s']:.1f}",
            f"{r['p50_ms']:.2f}",
            f"{r['p95_ms']:.2f}",
            f"{r['max_ms']:.2f}",
            f"<= {r['target_p50_ms']:.0f}",
            f"{r['full_scan_p50_ms']:.0f}",
            f"{r['speedup_vs_full_scan']:.0f}x",
        )
    Console(width=140).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "registry_bench.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["backend"] for r in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["p50_ms"] for r in rows], width=0.4, label="p50")
    ax.bar([x + 0.2 for x in xs], [r["p95_ms"] for r in rows], width=0.4, label="p95")
    for x, r in zip(xs, rows, strict=False):
        ax.hlines(r["target_p50_ms"], x - 0.45, x + 0.45, colors="red", linestyles="dashed")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("match latency (ms)")
    ax.set_title("registry match on 100k nodes (dashed: p50 target)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "registry_bench.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
