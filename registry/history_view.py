"""How `treelm registry history NODE` shows a node's forgetting curve (rich table or JSON)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table

from registry.forgetting import PerplexityPoint

__all__ = ["history_json", "history_table"]


def _column(p: PerplexityPoint) -> str:
    return "stale (un-rebased)" if p.role == "stale" else f"{p.role}: {p.text_node}"


def history_json(node_id: str, points: Sequence[PerplexityPoint]) -> dict[str, Any]:
    versions: dict[int, dict[str, Any]] = {}
    for p in points:
        entry = versions.setdefault(p.version, {"version": p.version, "origin": p.origin, "at": "", "points": []})
        entry["at"] = p.at.isoformat()
        entry["points"].append({"role": p.role, "text": p.text_node, "perplexity": p.perplexity})
    return {"node": node_id, "versions": list(versions.values())}


def history_table(node_id: str, points: Sequence[PerplexityPoint]) -> Table:
    """One row per version; one column per (role, text); each cell the perplexity and its change
    from the previous version that has it (red when it rose by more than 1%)."""
    columns: list[str] = []
    rows: dict[int, tuple[str, dict[str, float]]] = {}
    for p in points:
        name = _column(p)
        if name not in columns:
            columns.append(name)
        rows.setdefault(p.version, (p.origin, {}))[1][name] = p.perplexity
    order = {"own": 0, "parent": 1, "sibling": 2, "stale": 3}
    columns.sort(key=lambda c: (order.get(c.split(":")[0].split(" ")[0], 9), c))
    table = Table(title=f"forgetting history of {escape(node_id)} (perplexity; change from the previous version)")
    table.add_column("version", justify="right")
    table.add_column("made by")
    for c in columns:
        table.add_column(escape(c), justify="right")
    last: dict[str, float] = {}
    for version in sorted(rows):
        origin, values = rows[version]
        cells = []
        for c in columns:
            if c not in values:
                cells.append("")
                continue
            value, before = values[c], last.get(c)
            if before is None or c.startswith("stale"):
                cells.append(f"{value:.3f}")
            else:
                change = value / before - 1
                style = "red" if change > 0.01 else "green" if change < -0.01 else "dim"
                cells.append(f"{value:.3f} [{style}]({change:+.1%})[/{style}]")
            if not c.startswith("stale"):
                last[c] = value
        table.add_row(str(version), origin, *cells)
    return table
