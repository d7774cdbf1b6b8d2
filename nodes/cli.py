"""`treelm tree ...` and `treelm base ...` command groups.

Heavy imports (torch, transformers) happen inside commands so that
`treelm tree validate` answers instantly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

from hierarchy.errors import SpecError
from hierarchy.ids import Level
from hierarchy.spec import TreeSpec, load_spec

__all__ = ["base_app", "tree_app"]

tree_app = typer.Typer(help="Validate, show, build and export trees of models.", no_args_is_help=True)
base_app = typer.Typer(help="Make and inspect base models.", no_args_is_help=True)

_LEVEL_STYLE = {Level.BASE: "bold magenta", Level.LANGUAGE: "bold cyan", Level.DOMAIN: "green", Level.SUBDOMAIN: "yellow"}


def _load(spec: Path, err: Console) -> TreeSpec:
    try:
        return load_spec(spec)
    except SpecError as exc:
        err.print(f"[bold red]{escape(str(spec))}: {len(exc.problems)} problem(s)[/bold red]")
        for problem in exc.problems:
            err.print(f"  [red]-[/red] {escape(str(problem))}", highlight=False)
        raise typer.Exit(code=2) from None


def render_spec_tree(tree: TreeSpec) -> Tree:
    """A rich tree view of a spec: one line per node with its level and attributes."""
    root = Tree(f"[{_LEVEL_STYLE[Level.BASE]}]{escape(tree.name)}[/] [dim]base: {escape(tree.base.model)}[/dim]")
    branches = {"": root}
    for node in tree.nodes:
        attrs = [node.level.value]
        for key in ("language", "domain", "subdomain"):
            if getattr(node, key):
                attrs.append(f"{key}={getattr(node, key)}")
        attrs.append(f"r={node.lora.r}")
        if node.is_private:
            attrs.append(f"[red]private[/red] owner={escape(node.owner or '')}")
        label = f"[{_LEVEL_STYLE[node.level]}]{escape(node.path.name)}[/] [dim]{' '.join(attrs)}[/dim]"
        branches[str(node.path)] = branches[str(node.parent)].add(label)
    return root


@tree_app.command("validate")
def validate(spec: Annotated[Path, typer.Argument(help="tree spec YAML file")]) -> None:
    """Check a tree spec; list every problem (exit 2) or say it is valid (exit 0)."""
    console, err = Console(), Console(stderr=True)
    tree = _load(spec, err)
    console.print(f"[green]ok[/green]: {escape(str(spec))}: tree '{escape(tree.name)}' with {len(tree.nodes)} node(s)")


@tree_app.command("show")
def show(
    spec: Annotated[Path, typer.Argument(help="tree spec YAML file")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Show a tree spec as a tree (or JSON with --json)."""
    err = Console(stderr=True)
    tree = _load(spec, err)
    if as_json:
        typer.echo(json.dumps(tree.to_json(), indent=2))
        return
    Console().print(render_spec_tree(tree))


@base_app.command("tiny")
def tiny(
    out: Annotated[Path, typer.Argument(help="output model directory")],
    hidden: Annotated[int, typer.Option(help="hidden size")] = 64,
    layers: Annotated[int, typer.Option(help="number of decoder layers")] = 2,
    vocab: Annotated[int, typer.Option(help="vocabulary size (>= 300)")] = 512,
    heads: Annotated[int, typer.Option(help="attention heads")] = 4,
    kv_heads: Annotated[int, typer.Option(help="key/value heads")] = 2,
    seed: Annotated[int, typer.Option(help="initialisation seed")] = 0,
    text: Annotated[Optional[list[Path]], typer.Option(help="text file(s) to train the tokenizer on")] = None,
) -> None:
    """Write a tiny random Llama with a byte-level BPE tokenizer (for tests and trials)."""
    from nodes.base import TinyBaseConfig, base_digest, make_tiny_base
    from nodes.errors import BaseModelError

    texts = []
    for file in text or []:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise BaseModelError(f"cannot read tokenizer text {file}: {exc}") from exc
    config = TinyBaseConfig(hidden=hidden, layers=layers, vocab=vocab, heads=heads, kv_heads=kv_heads, seed=seed)
    path = make_tiny_base(out, config, texts)
    Console().print(f"[green]wrote[/green] tiny base to {escape(str(path))} (digest {base_digest(path)[:12]})")
