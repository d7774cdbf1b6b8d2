"""Forgetting: what an oncology update does to en/medical, its other children and its ancestors,
per merge method and server step eta, and how close each child stays once rebased.

For each method and eta (0.25, 0.5, 1.0) the candidate parent the protocol would make from one
honest update of ``en/medical/oncology`` (trained as `treelm update make` trains it) is measured:

* ``parent_gain``             1 - ppl_after / ppl_before of en/medical on the update's own text;
* ``max_sibling_regression``  the largest relative rise of another child's own-probe perplexity
                              (its adapter over the candidate parent, as the gate measures it);
* ``max_ancestor_change``     the largest |relative change| of en/medical on an ancestor's text;
* ``max_rebased_child_change`` after every child is rebased over the candidate (distilled towards
                              its old effective model), the largest |relative change| of its own
                              probe perplexity; ``max_stale_child_change``: the same, un-rebased;
* ``gate_passed``             whether the gate (2% bounds) accepts the candidate.

    python benchmarks/forgetting_bench.py [--tree examples/demo/build] [--tiny] [--methods concat,ties]

The demo tree is built by `treelm tree build examples/demo/tree.yaml --out examples/demo/build`;
``--tiny`` builds a tiny tree over the demo corpora instead (seconds; for CI-sized checks).
Writes benchmarks/results/forgetting.{json,png} (the JSON: a list of rows, relative changes,
0.02 = 2%; ``max_rebased_child_change`` and ``max_stale_child_change`` are signed, the largest
in magnitude, null where the run did not rebase) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from cluster.updates.coordinator import Coordinator  # noqa: E402
from cluster.updates.forgetting import measure_update  # noqa: E402
from cluster.updates.policy import REBASE_STARTS, DistillPolicy, RebasePolicy, UpdatePolicy  # noqa: E402
from cluster.updates.rebase import refit_child  # noqa: E402
from hierarchy.spec import TrainSettings, load_spec  # noqa: E402
from nodes.build.finetune import fine_tune  # noqa: E402
from nodes.build.gate import EvalText, read_eval_text  # noqa: E402
from nodes.build.training import tokenize_text  # noqa: E402
from registry.db import init_registry, open_registry  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NODE = "en/medical/oncology"
# name -> (merge field of the update policy, consolidation steps)
METHODS = {
    "concat": ("concat", 0),
    "ties": ("ties", 0),
    "dare": ({"method": "dare", "drop": 0.5, "seed": 0}, 0),
    "project": ({"method": "project", "energy": 0.9}, 0),
    "contrast": ({"method": "contrast", "strength": 4.0}, 0),
    "concat+consolidate": ("concat", 12),
}


def tiny_tree(folder: Path) -> Path:
    """The update tests' tiny tree (tests/cluster/update_world.py's shape) over the demo corpora."""
    import yaml

    from nodes.build.builder import build_tree

    data = REPO / "examples" / "demo" / "data"
    body: dict = {
        "name": "ut",
        "base": {"model": "tiny", "hidden": 64, "layers": 2, "vocab": 400, "heads": 4, "kv_heads": 2},
        "defaults": {
            "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj"]},
            "training": {"steps": 30, "batch_size": 4, "max_seq_len": 32, "lr": 0.01, "seed": 0},
        },
        "nodes": {},
    }
    for path, extra in {
        "en": {"level": "language", "language": "en"},
        "en/medical": {"level": "domain", "domain": "medical"},
        "en/legal": {"level": "domain", "domain": "legal"},
        "en/medical/radiology": {"level": "subdomain", "subdomain": "radiology"},
        "en/medical/cardiology": {"level": "subdomain", "subdomain": "cardiology"},
        NODE: {"level": "subdomain", "subdomain": "oncology"},
    }.items():
        local = folder / "data" / path
        local.mkdir(parents=True, exist_ok=True)
        docs = (data / path / "train.txt").read_text().split("\n\n")
        cut = int(len(docs) * 0.6)
        (local / "train.txt").write_text("\n\n".join(docs[:cut]))
        (local / "update.txt").write_text("\n\n".join(docs[cut:]))
        body["nodes"][path] = {"train": str(local / "train.txt"), "eval": str(data / path / "eval.txt"), **extra}
    (folder / "tree.yaml").write_text(yaml.safe_dump(body, sort_keys=False))
    build_tree(load_spec(folder / "tree.yaml"), folder / "tree").raise_for_failures()
    return folder / "tree"


def working_copy(tree: Path, work: Path) -> Path:
    """The tree copied (its base linked, not copied): the protocol writes versions into its copy."""
    out = work / "tree"
    shutil.copytree(tree, out, ignore=shutil.ignore_patterns("base", ".updates.lock", "versions", "snapshot.json"))
    (out / "base").symlink_to((tree / "base").resolve(), target_is_directory=True)
    return out


def rebase_changes(coordinator: Coordinator, view, parent: str, candidate, policy: RebasePolicy, updated: dict):
    """Each child of ``parent``: its own probe's relative change over the candidate parent, rebased
    (as the protocol rebases: cluster.updates.rebase.refit_child) and un-rebased, against its old
    effective model."""
    bench = coordinator.bench
    chain = view.chain(parent)
    new_parent = [*bench.adapters(chain[:-1]), candidate]
    ev = bench.evaluator
    rebased, stale = {}, {}
    for child in view.children(parent):
        old = bench.adapters(view.chain(child))
        if child in updated:  # the updating child serves its update when its parent's version lands
            old = [*old[:-1], updated[child]]
        own = old[-1]
        fitted = refit_child(bench, policy, child, old, new_parent)
        text = bench.probe(child)
        before = ev.perplexity(old, text)
        rebased[child] = ev.perplexity([*new_parent, fitted], text) / before - 1
        stale[child] = ev.perplexity([*new_parent, own], text) / before - 1
    return rebased, stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", type=Path, default=REPO / "examples" / "demo" / "build")
    parser.add_argument("--tiny", action="store_true", help="build and use a tiny tree (seconds)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--etas", default="0.25,0.5,1.0")
    parser.add_argument("--text", type=Path, help="the update's text (default: the demo's oncology notes)")
    parser.add_argument("--update-steps", type=int, default=4, help="the update's fine-tuning (as the demo)")
    parser.add_argument("--update-lr", type=float, default=0.002)
    parser.add_argument("--rebase-steps", type=int, default=20)
    parser.add_argument("--rebase-lm", type=float, default=UpdatePolicy().rebase.lm_weight, help="own LM loss weight")
    parser.add_argument("--rebase-lr", type=float, default=UpdatePolicy().rebase.lr)
    parser.add_argument("--rebase-start", choices=REBASE_STARTS, default=UpdatePolicy().rebase.start)
    parser.add_argument("--rebase-methods", help="rebase the children only for these methods (default: all)")
    parser.add_argument(
        "--rebase-etas", default="0.5", help="rebase the children only at these etas (default: 0.5, the policy's)"
    )
    parser.add_argument("--no-rebase", action="store_true", help="leave max_rebased_child_change out (faster)")
    parser.add_argument("--gate-max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    etas = [float(e) for e in args.etas.split(",")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="treelm-forgetting-") as scratch:
        work = Path(scratch)
        if args.tiny:
            tree = tiny_tree(work / "built")
            text_file = args.text or work / "built" / "data" / NODE / "update.txt"
            args.update_steps, args.update_lr = max(args.update_steps, 20), 3e-3
        else:
            tree = args.tree
            text_file = args.text or REPO / "examples" / "demo" / "oncology-notes.txt"
            if not (tree / "tree.json").is_file():
                # `make bench` on a fresh machine: as variants_bench, skip rather than build for ~10 minutes.
                print(
                    f"skipped: no built tree at {tree}; build it with `make demo` (or `treelm tree build "
                    f"examples/demo/tree.yaml --out {tree}`) and run this again, or pass --tiny"
                )
                return 0
        copy = working_copy(tree, work)
        url = f"sqlite:///{work / 'registry.db'}"
        init_registry(url)
        registry = open_registry(url)
        base_policy = UpdatePolicy(gate_max_tokens=args.gate_max_tokens)
        coordinator = Coordinator.open(registry, copy, base_policy)
        bench, view = coordinator.bench, coordinator._view()
        ev = bench.evaluator
        # The update, trained as `treelm update make` trains it: the notes but their last 10% of documents.
        raw = read_eval_text(text_file, "update text")
        docs = [d for d in raw.text.split("\n\n") if d.strip()]
        train = "\n\n".join(docs[: len(docs) - max(1, len(docs) // 10)])
        node = next(n for n in coordinator.tree.nodes if str(n.path) == NODE)
        batch = int((node.training or {}).get("batch_size", 4) or 4)
        settings = TrainSettings(
            steps=args.update_steps, lr=args.update_lr, batch_size=batch, max_seq_len=bench.seq_len, seed=0
        )
        chain = bench.adapters(view.chain(NODE))
        with ev.lock:
            new = fine_tune(ev.base.model, chain[:-1], chain[-1], tokenize_text(ev.base.tokenizer, train), settings)
        update_text = EvalText(raw.label, raw.sha256, raw.text)
        rows = []
        for name in methods:
            merge, consolidate = METHODS[name]
            for eta in etas:
                policy = base_policy.with_(
                    eta=eta, merge=merge, consolidate=DistillPolicy(steps=consolidate, lr=2e-3, batch_size=8)
                )
                t0 = time.perf_counter()
                fig = measure_update(bench, policy, view, NODE, new.adapter, update_text)
                row = {k: v for k, v in fig.to_dict().items() if k not in ("method",)}
                row = {"method": name, **row}
                # What refused it, and the updating child's own adapter over the candidate (reported, not gated).
                checks = fig.build.report.checks if fig.build is not None else ()
                row["gate_failures"] = [c.describe() for c in checks if not c.passed]
                row["double_counted_child"] = next((c.change for c in checks if c.kind == "stale"), None)
                rebase = (
                    not args.no_rebase
                    and (args.rebase_methods is None or name in args.rebase_methods.split(","))
                    and (args.rebase_etas is None or eta in [float(e) for e in args.rebase_etas.split(",")])
                )
                if rebase and fig.build is not None:
                    rebased, stale = rebase_changes(
                        coordinator,
                        view,
                        "en/medical",
                        fig.build.adapter,
                        RebasePolicy(
                            steps=args.rebase_steps,
                            lr=args.rebase_lr,
                            batch_size=8,
                            lm_weight=args.rebase_lm,
                            start=args.rebase_start,
                        ),
                        {NODE: new.adapter},
                    )
                    row["max_rebased_child_change"] = max(rebased.values(), key=abs)  # signed, largest |.|
                    row["max_stale_child_change"] = max(stale.values(), key=abs)
                    row["rebased_children"], row["stale_children"] = rebased, stale
                else:
                    row["max_rebased_child_change"] = row["max_stale_child_change"] = None
                row["seconds"] = round(time.perf_counter() - t0, 1)
                rows.append(row)
                print(
                    f"{name:>20} eta {eta:<4} gain {row['parent_gain']:+.2%}  sibling {row['max_sibling_regression']:+.2%}"
                    f"  ancestor {row['max_ancestor_change']:.2%}  gate {'ok' if row['gate_passed'] else 'REJECTED'}"
                    + (
                        f"  rebased {row['max_rebased_child_change']:+.2%} (stale {row['max_stale_child_change']:+.2%})"
                        if row["max_rebased_child_change"] is not None
                        else ""
                    ),
                    flush=True,
                )
        registry.close()
    meta = {
        "tree": "tiny" if args.tiny else str(args.tree),
        "node": NODE,
        "update_text": str(text_file.relative_to(REPO) if text_file.is_relative_to(REPO) else text_file.name),
        "update_steps": args.update_steps,
        "rebase_steps": None if args.no_rebase else args.rebase_steps,
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    # A list of rows (the format); each row says which tree and update it measured.
    listed = [{**row, "tree": meta["tree"], "update_steps": meta["update_steps"]} for row in rows]
    (args.out / "forgetting.json").write_text(json.dumps(listed, indent=2) + "\n")
    show(rows)
    plot(rows, args.out / "forgetting.png", meta["tree"])
    print(f"wrote {args.out / 'forgetting.json'} and {args.out / 'forgetting.png'} in {meta['seconds']} s")
    return 0


def show(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="forgetting: an oncology update of en/medical (relative perplexity changes)")
    for column in (
        "method",
        "eta",
        "parent gain",
        "max sibling regression",
        "max ancestor change",
        "updater (not gated)",
        "max rebased child change",
        "un-rebased",
        "gate",
    ):
        table.add_column(column, justify="left" if column == "method" else "right")

    def pct(v) -> str:
        return "" if v is None else f"{v:+.2%}"

    for r in rows:
        table.add_row(
            r["method"],
            f"{r['eta']:g}",
            pct(r["parent_gain"]),
            pct(r["max_sibling_regression"]),
            pct(r["max_ancestor_change"]),
            pct(r["double_counted_child"]),
            pct(r["max_rebased_child_change"]),
            pct(r["max_stale_child_change"]),
            "accepts" if r["gate_passed"] else "rejects",
        )
    Console(width=160).print(table)


def plot(rows: list[dict], out: Path, tree: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == name]
        xs = [r["max_sibling_regression"] * 100 for r in mine]
        ys = [r["parent_gain"] * 100 for r in mine]
        axes[0].plot(xs, ys, marker="o", label=name)
        for r, x, y in zip(mine, xs, ys, strict=True):
            axes[0].annotate(f"{r['eta']:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].axvline(2.0, color="#c44", linestyle="--", linewidth=1)
    axes[0].set_xlabel("largest sibling regression (%, own eval text; gate bound 2%)")
    axes[0].set_ylabel("en/medical gain on the update's text (%)")
    axes[0].set_title(f"gain vs forgetting per method (labels: eta) - {tree}")
    axes[0].legend(fontsize=7)
    # Rebased against un-rebased, per method and eta where the run rebased (signed: the largest |.|).
    rebased = [r for r in rows if r["max_rebased_child_change"] is not None]
    labels = [f"{r['method']}\n{r['eta']:g}" for r in rebased]
    xs = list(range(len(rebased)))
    axes[1].bar([x - 0.2 for x in xs], [r["max_stale_child_change"] * 100 for r in rebased], 0.4, label="un-rebased")
    axes[1].bar([x + 0.2 for x in xs], [r["max_rebased_child_change"] * 100 for r in rebased], 0.4, label="rebased")
    for bound in (1.0, -1.0):
        axes[1].axhline(bound, color="#c44", linestyle="--", linewidth=1)
    axes[1].set_xticks(xs, labels, fontsize=7)
    axes[1].set_ylabel("child's own perplexity change, largest |.| (%)")
    axes[1].set_title("children over the new parent (gate.rebase: within 1%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
