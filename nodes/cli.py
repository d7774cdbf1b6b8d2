"""`treelm tree ...` and `treelm base ...` command groups.

Heavy imports (torch, transformers) happen inside commands so that
`treelm tree validate` answers instantly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.tree import Tree

if TYPE_CHECKING:
    from rich.progress import TaskID
    from rich.table import Table

from hierarchy.errors import SpecError
from hierarchy.ids import Level
from hierarchy.spec import TreeSpec, load_spec

__all__ = ["base_app", "export_command", "render_build_summary", "tree_app"]

tree_app = typer.Typer(help="Validate, show, build and export trees of models.", no_args_is_help=True)
base_app = typer.Typer(help="Make and inspect base models.", no_args_is_help=True)

_LEVEL_STYLE = {
    Level.BASE: "bold magenta",
    Level.LANGUAGE: "bold cyan",
    Level.DOMAIN: "green",
    Level.SUBDOMAIN: "yellow",
}


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
    text: Annotated[list[Path] | None, typer.Option(help="text file(s) to train the tokenizer on")] = None,
) -> None:
    """Write a tiny random Llama with a byte-level BPE tokenizer (for tests and trials)."""
    from nodes.base.model import TinyBaseConfig, base_digest, make_tiny_base
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


# --------------------------------------------------------------------------- build and export


class _RichBars:
    """A transient rich Progress (one bar per task, a status column ``field``) that is its own context."""

    def __init__(self, console: Console, field: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(f"{{task.fields[{field}]}}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)


class _RichBuildProgress(_RichBars):
    """Rich progress for `tree build`: one bar per node being trained, one line per finished node."""

    def __init__(self, console: Console):
        super().__init__(console, "status")

    def message(self, text: str) -> None:
        self.console.print(f"[dim]{escape(text)}[/dim]")

    def node_started(self, node_id: str, steps: int) -> None:
        self.tasks[node_id] = self.progress.add_task(node_id, total=steps, status="")

    def step(self, node_id: str, step: int, total: int, loss: float) -> None:
        self.progress.update(self.tasks[node_id], completed=step, total=total, status=f"loss {loss:.3f}")

    def phase(self, node_id: str, text: str) -> None:
        if node_id in self.tasks:
            self.progress.update(self.tasks[node_id], status=text)

    def node_finished(self, outcome) -> None:
        if outcome.node_id in self.tasks:
            self.progress.remove_task(self.tasks.pop(outcome.node_id))
        style = {"trained": "green", "reused": "cyan", "updated": "cyan", "failed": "red", "skipped": "yellow"}
        line = f"[{style.get(outcome.status, 'white')}]{outcome.status:>8}[/] {escape(outcome.node_id)}"
        if outcome.status == "trained":
            line += f" [dim]({outcome.seconds:.1f} s)[/dim]"
        self.console.print(line)


def _quiet_hf(threads: int) -> None:
    """One torch thread per process by default; our own progress bars replace transformers' ones."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads < 1:
        raise typer.BadParameter(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()


def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def render_build_summary(report) -> Table:
    """The summary table of a build: perplexities, specialisation gain and forgetting per node."""
    from rich.table import Table

    table = Table(title=f"tree {report.name}: {report.base_model} ({report.seconds:.0f} s)")
    for col in (
        "node",
        "status",
        "steps",
        "own ppl parent→node",
        "gain",
        "parent-text ppl parent→node",
        "forgetting",
        "bound",
    ):
        table.add_column(col, justify="left" if col in ("node", "status") else "right")
    colors = {"trained": "green", "reused": "cyan", "updated": "cyan", "failed": "red", "skipped": "yellow"}
    for o in report.outcomes:
        m = o.metrics
        gain, forgetting, bound = m.get("specialisation_gain"), m.get("forgetting"), m.get("forgetting_bound")
        gain_txt = "-" if gain is None else f"[{'green' if gain > 0 else 'red'}]{gain:+.1%}[/]"
        if forgetting is None:
            forget_txt = "n/a" if m else "-"
        else:
            forget_txt = f"[{'green' if forgetting <= (bound or 0) else 'red'}]{forgetting:+.1%}[/]"
        table.add_row(
            escape(o.node_id),
            f"[{colors.get(o.status, 'white')}]{o.status}[/]",
            _fmt(m.get("steps"), "d"),
            f"{_fmt(m.get('parent_eval_ppl'))} → {_fmt(m.get('eval_ppl'))}" if m else "-",
            gain_txt,
            f"{_fmt(m.get('parent_text_parent_ppl'))} → {_fmt(m.get('parent_text_ppl'))}" if m else "-",
            forget_txt,
            "-" if bound is None else f"{bound:.0%}",
        )
    return table


@tree_app.command("build")
def build(
    spec: Annotated[Path, typer.Argument(help="tree spec YAML file")],
    out: Annotated[Path, typer.Option("--out", help="output directory of the built tree")],
    force: Annotated[
        list[str] | None, typer.Option("--force", help="retrain this node (path) and its subtree; repeatable")
    ] = None,
    precision: Annotated[str, typer.Option(help="training precision: auto | fp32 | bf16 (autocast)")] = "auto",
    threads: Annotated[int, typer.Option(help="torch CPU threads (keep 1 on small shared machines)")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the build report as JSON")] = False,
) -> None:
    """Train every node parents-first over its parent (incremental; reuses what is built)."""
    from nodes.build.builder import BuildProgress, build_tree

    err = Console(stderr=True)
    tree = _load(spec, err)
    _quiet_hf(threads)
    if as_json:
        report = build_tree(tree, out, force=force or (), precision=precision, progress=BuildProgress())
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        console = Console()
        if not console.is_terminal:  # piped (make demo | tee): keep the summary table on one line per node
            console = Console(width=140)
        with _RichBuildProgress(console) as progress:
            report = build_tree(tree, out, force=force or (), precision=precision, progress=progress)
        console.print(render_build_summary(report))
        console.print(f"built tree '{escape(report.name)}' into {escape(str(report.root))} in {report.seconds:.1f} s")
    report.raise_for_failures()


class _RichVariantProgress(_RichBars):
    """Rich progress for building variants: one bar per variant being built, one line per finished one."""

    def __init__(self, console: Console):
        super().__init__(console, "what")

    def started(self, label: str) -> None:
        self.tasks[label] = self.progress.add_task(label, total=None, what="")

    def advance(self, label: str, what: str, done: int, total: int) -> None:
        if label in self.tasks:
            self.progress.update(self.tasks[label], completed=done, total=total, what=what)

    def finished(self, label: str, artifact) -> None:
        if label in self.tasks:
            self.progress.remove_task(self.tasks.pop(label))
        self.console.print(f"[green]   built[/] {escape(label)} [dim]({artifact.seconds:.1f} s)[/dim]")


def export_command(
    tree_dir: Annotated[Path, typer.Argument(help="a built tree directory (treelm tree build --out DIR)")],
    node_id: Annotated[str, typer.Argument(help="node id (<tree>/<path>) or path, e.g. demo/en/medical")],
    variant: Annotated[
        str,
        typer.Option(
            help="flat | merged | merged-fp16 | merged-bf16 | merged-int8 (GGUF Q8_0) | gguf-f16 | gguf-q4_0 | gguf-lora"
        ),
    ] = "flat",
    version: Annotated[
        int | None, typer.Option(help="a stored version of the node (default: the version the tree serves)")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="new output directory")] = Path("export"),
    threads: Annotated[int, typer.Option(help="torch CPU threads")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
) -> None:
    """Export one node version for end devices: flat adapter, merged model, GGUF (built once, then cached)."""
    from nodes.build.export import export_node

    _quiet_hf(threads)
    if as_json:
        result = export_node(tree_dir, node_id, variant, out, version=version)
        typer.echo(json.dumps(result.to_json(), indent=2))
        return
    console = Console()
    with _RichVariantProgress(console) as progress:
        result = export_node(tree_dir, node_id, variant, out, version=version, progress=progress)
    line = (
        f"[green]exported[/green] {escape(result.node_id)} v{result.version} as [bold]{result.variant}[/bold] to "
        f"{escape(str(result.out))} ({result.bytes_on_disk / 1e6:.1f} MB on disk, {len(result.files)} files, manifest.json)"
    )
    console.print(line)
    need = result.to_json().get("requires")
    if need:
        console.print(
            f"  it runs over [bold]{need['variant']}[/bold] of the base: "
            f"`treelm export {escape(str(tree_dir))} {need['node']} --variant {need['variant']} --out BASE_DIR`"
        )
