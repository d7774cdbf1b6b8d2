"""`treelm registry import TREE_DIR`: the registry's command that reads nodes' on-disk layout.

It lives here, not in registry/cli.py, because registry/ must not import nodes/; the `treelm`
app attaches it to the registry group.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from registry.cli import DbOption, db_url

__all__ = ["import_command"]


def import_command(
    ctx: typer.Context,
    tree_dir: Annotated[Path, typer.Argument(help="a built tree directory (from `treelm tree build`)")],
    db: DbOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Register a built tree: its base, nodes, first versions (as stable) and variants. Idempotent."""
    from cluster.tree_import import tree_import
    from registry import register_tree
    from registry.db import open_registry

    prepared = tree_import(tree_dir)  # read and check everything before touching the database
    with open_registry(db_url(ctx, db)) as reg:
        result = register_tree(reg, prepared)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "tree": result.tree,
                    "base_digest": result.base_digest,
                    "nodes_added": result.nodes_added,
                    "versions_added": result.versions_added,
                    "variants_added": result.variants_added,
                    "variants_updated": result.variants_updated,
                    "tenants_added": list(result.tenants_added),
                    "changed": result.changed,
                },
                indent=2,
            )
        )
        return
    console = Console()
    if not result.changed:
        console.print(f"[green]up to date[/green]: tree {escape(result.tree)} is already registered as built")
        return
    console.print(
        f"[green]imported[/green] tree {escape(result.tree)} (base {result.base_digest[:12]}): "
        f"{result.nodes_added} node(s), {result.versions_added} version(s), {result.variants_added} variant(s) added, "
        f"{result.variants_updated} variant(s) updated"
    )
    if result.tenants_added:
        console.print(
            f"  new tenant(s) for private nodes: {escape(', '.join(result.tenants_added))} "
            "(issue tokens with `treelm registry token issue TENANT`)"
        )
