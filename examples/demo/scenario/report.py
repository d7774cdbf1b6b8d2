"""demo-report/: every table as JSON, the tree as a PNG (levels, versions, perplexity gains),
tokens/s per node as a PNG, and each updated node's forgetting history (the registry's perplexities
per version on its own, its parent's and its siblings' texts) as a PNG."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table as RichTable

from examples.demo.scenario.steps import Table


def show(console: Console, table: Table) -> None:
    rich = RichTable(title=table.title, title_justify="left", show_lines=True)
    for column in table.columns:
        rich.add_column(column, overflow="fold")
    for row in table.rows:
        rich.add_row(*("" if v is None else escape(str(v)) for v in row))
    console.print(rich)
    for note in table.notes:
        console.print(f"  {escape(note)}")


def tree_nodes(tree_dir: Path, versions: dict[str, int | None]) -> list[dict]:
    """One record per node of a built tree: id, parent, level, version, specialisation gain."""
    meta = json.loads((tree_dir / "tree.json").read_text())
    out = [{"id": meta["name"], "parent": None, "level": "base", "version": None, "gain": None}]
    for path in meta["nodes"]:
        node = json.loads((tree_dir / "nodes" / path / "node.json").read_text())
        out.append(
            {
                "id": node["id"],
                "parent": node.get("parent") or meta["name"],
                "level": node["level"],
                "version": versions.get(node["id"], node.get("version")),
                "gain": node.get("metrics", {}).get("specialisation_gain"),
                "owner": node.get("owner") if node.get("visibility") == "private" else None,
            }
        )
    return out


def forgetting(url: str) -> dict[str, list[dict]]:
    """Every node's recorded forgetting history (registry.forgetting), as JSON-ready points."""
    from registry.db import open_registry
    from registry.forgetting import history
    from registry.trees import list_nodes

    with open_registry(url) as reg:
        out = {}
        for node in list_nodes(reg, include_private=True):
            points = history(reg, node.node_id)
            if points:
                out[node.node_id] = [
                    {"version": p.version, "origin": p.origin, "role": p.role, "text": p.text_node, "ppl": p.perplexity}
                    for p in points
                ]
        return out


def _plot_forgetting(plt, path: Path, curves: dict[str, list[dict]]) -> None:
    """One panel per node: perplexity per version on each text (own solid, parent dashed, siblings dotted)."""
    nodes = sorted(curves)
    fig, axes = plt.subplots(1, max(1, len(nodes)), figsize=(4.2 * max(1, len(nodes)), 3.8), squeeze=False)
    styles = {"own": "-", "parent": "--", "sibling": ":", "stale": "none"}
    for ax, node in zip(axes[0], nodes, strict=False):
        lines: dict[tuple[str, str], list[tuple[int, float]]] = {}
        for p in curves[node]:
            lines.setdefault((p["role"], p["text"]), []).append((p["version"], p["ppl"]))
        for (role, text), pts in sorted(lines.items()):
            xs, ys = zip(*sorted(pts), strict=True)
            label = "un-rebased" if role == "stale" else f"{role}: {text.split('/', 1)[-1]}"
            ax.plot(xs, ys, linestyle=styles.get(role, "-"), marker="x" if role == "stale" else "o", label=label)
        ax.set_title(node.split("/", 1)[-1], fontsize=9)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_xlabel("version")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=6)
    if not nodes:
        axes[0][0].text(0.5, 0.5, "no version made by the update protocol yet", ha="center", va="center")
    fig.suptitle("Forgetting history: each version's perplexity on its own, parent's and siblings' eval texts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    report_dir: Path,
    tables: list[Table],
    nodes: list[dict],
    rates: dict[str, float],
    history: dict[str, list[dict]] | None = None,
) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in tables:
        path = report_dir / f"{table.name}.json"
        path.write_text(json.dumps(table.as_json(), indent=2, default=str) + "\n")
        written.append(path)
    (report_dir / "tree.json").write_text(json.dumps(nodes, indent=2) + "\n")
    written.append(report_dir / "tree.json")

    # The tree: one row per level, children spread under their parents.
    levels = {"base": 0, "language": 1, "domain": 2, "subdomain": 3}
    rows: dict[int, list[dict]] = {}
    for n in nodes:
        rows.setdefault(levels.get(n["level"], 3), []).append(n)
    pos = {}
    for depth, members in rows.items():
        for i, n in enumerate(members):
            pos[n["id"]] = ((i + 1) / (len(members) + 1), -depth)
    fig, ax = plt.subplots(figsize=(13, 6))
    for n in nodes:
        if n["parent"] in pos:
            (x0, y0), (x1, y1) = pos[n["parent"]], pos[n["id"]]
            ax.plot([x0, x1], [y0, y1], color="#999999", zorder=1)
    for n in nodes:
        x, y = pos[n["id"]]
        label = n["id"].split("/", 1)[-1] if "/" in n["id"] else f"{n['id']} (base)"
        if n["version"] is not None:
            label += f"\nv{n['version']}"
        if n.get("owner"):
            label += f"\nprivate ({n['owner']})"
        if n["gain"] is not None:
            label += f"  ppl gain {n['gain']:+.0%}"
        ax.text(
            x,
            y,
            label,
            ha="center",
            va="center",
            fontsize=8,
            zorder=2,
            bbox={"boxstyle": "round", "facecolor": "#dde8f7", "edgecolor": "#4a6fa5"},
        )
    ax.set_yticks([-d for d in sorted(rows)])
    ax.set_yticklabels([k for k, v in sorted(levels.items(), key=lambda kv: kv[1]) if v in rows])
    ax.set_xticks([])
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-max(rows) - 0.5, 0.5)
    ax.set_title("Tree: levels, serving versions, specialisation gain (1 - node/parent perplexity)")
    fig.tight_layout()
    fig.savefig(report_dir / "tree.png", dpi=110)
    plt.close(fig)
    written.append(report_dir / "tree.png")

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(rates)
    ax.barh(names, [rates[k] for k in names], color="#4a6fa5")
    ax.set_xlabel("tokens/s (one stream, greedy)")
    ax.set_title("Decode speed per node (same question)")
    fig.tight_layout()
    fig.savefig(report_dir / "tokens_per_s.png", dpi=110)
    plt.close(fig)
    written.append(report_dir / "tokens_per_s.png")

    if history is not None:
        (report_dir / "forgetting.json").write_text(json.dumps(history, indent=2) + "\n")
        _plot_forgetting(plt, report_dir / "forgetting.png", history)
        written += [report_dir / "forgetting.json", report_dir / "forgetting.png"]
    return written
