"""State for the demo scenario: a fresh working copy of the tree, a registry, keys, tenants, tokens.

Everything lives under one state dir (examples/demo/state/ for `make demo`, gitignored). Keys are
made once and reused; the tree copy and the registry are re-made on every run so the update story
always starts from version 1 (re-runnable). The built tree itself is never written to.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

HOSPITAL, OTHER = "st-marys", "globex"
CLINIC = "northfield"  # a second clinic: it grows its own private node while the others are served (step 6)


class DemoError(RuntimeError):
    """A demo step failed; the message says which command and what it printed."""


def cli(*args: object) -> str:
    """Run one `treelm` command in this process and return what it printed (stdout)."""
    from cluster.cli import main  # the composition root; imported late so `--help` stays fast

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if code != 0:
        raise DemoError(f"treelm {' '.join(map(str, args))} exited {code}: {err.getvalue().strip() or out.getvalue()}")
    return out.getvalue()


@dataclass(frozen=True)
class DemoState:
    """Paths and secrets of one demo run."""

    dir: Path
    tree: Path  # the working copy served and updated (hard links into the built tree)
    url: str  # SQLAlchemy URL of the embedded SQLite registry
    keys: Path  # keys/<name>/{private,public}.pem
    tokens: dict[str, str]  # tenant -> bearer token
    tree_name: str
    operator_token: str  # role operator (tenant "ops"): the server's status

    @property
    def variant_key(self) -> Path:
        """The server's online key that signs variant manifests for devices (treelm pull)."""
        return self.keys / "variants"

    @property
    def variant_delegation(self) -> Path:
        """Root's delegation of that key for this tree (made each run, by the run's root key)."""
        return self.keys / f"{self.tree_name}-variants.dsse"


def _copy_tree(src: Path, dst: Path) -> None:
    # Hard links: the base is ~540 MB; updates write new files (temp dir + rename), never in place.
    if dst.exists():
        shutil.rmtree(dst)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=link)


def prepare(built: Path, state_dir: Path) -> DemoState:
    """Fresh tree copy + registry; keys made once (idempotent); tenants and tokens issued."""
    import json

    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    tree = state_dir / "tree"
    _copy_tree(built.resolve(), tree)
    name = json.loads((tree / "tree.json").read_text())["name"]
    db = state_dir / "registry.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{db}"
    cli("registry", "init", "--db", url)
    cli("registry", "import", tree, "--db", url)  # also adds st-marys, owner of the private node
    for tenant in (OTHER, CLINIC):
        cli("registry", "tenant", "add", tenant, "--db", url)
    tokens = {
        t: cli("registry", "token", "issue", t, "--db", url).strip().splitlines()[-1].strip()
        for t in (HOSPITAL, OTHER, CLINIC)
    }
    cli("registry", "tenant", "add", "ops", "--db", url)
    operator = cli("registry", "token", "issue", "ops", "--role", "operator", "--db", url).strip().splitlines()[-1]
    keys = state_dir / "keys"
    onc, med, en = f"{name}/en/medical/oncology", f"{name}/en/medical", f"{name}/en"
    for key in ("root", "operator", "medical-eval", "en-eval", HOSPITAL, "variants", "cardiology", "service"):
        if not (keys / key / "private.pem").exists():
            cli("keys", "gen", "--no-encrypt", "--out", keys / key)  # the demo's throwaway keys
    cli("keys", "register", keys / "root", "--role", "root", "--db", url)
    for key, role, node in (
        ("operator", "operator", None),
        ("medical-eval", "evaluator", med),
        ("en-eval", "evaluator", en),
        (HOSPITAL, "node", onc),
        ("cardiology", "node", f"{name}/en/medical/cardiology"),  # signs what the feedback policy makes
        ("service", "node", None),  # signs the nodes tenants' fine-tuning jobs make (customize.key)
    ):
        extra = ["--node", node] if node else []
        cli("keys", "register", keys / key, "--role", role, *extra, "--sign-with", keys / "root", "--db", url)
    state = DemoState(state_dir, tree, url, keys, tokens, name, operator.strip())
    state.variant_delegation.unlink(missing_ok=True)  # never overwritten by the CLI: made afresh
    cli(
        "keys",
        "delegate-variants",
        name,
        "--key",
        state.variant_key,
        "--sign-with",
        keys / "root",
        "--out",
        state.variant_delegation,
    )
    return state
