"""The `treelm` console script, assembled from the command groups each package owns.

Each package's ``cli.py`` defines a ``typer.Typer`` group; this module only
mounts them and turns the project's typed errors into a clear message and exit
code 2 (never a traceback) for users.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape

from cluster.cli.cluster import cluster_app
from cluster.cli.distribution import delegate_variants_command
from cluster.cli.feedback import feedback_app
from cluster.cli.node import node_app
from cluster.cli.pull import pull_command
from cluster.cli.registry_import import import_command
from cluster.cli.serve import serve_command
from cluster.cli.updates import keys_app, update_app
from cluster.errors import ClusterError
from hierarchy.errors import HierarchyError
from nodes.cli import base_app, export_command, tree_app
from nodes.errors import NodesError
from registry.cli import registry_app
from registry.errors import RegistryError

__all__ = ["app", "main"]

app = typer.Typer(
    name="treelm",
    help="TreeLM: a tree of LoRA models over one base, served as one service.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(tree_app, name="tree")
app.add_typer(base_app, name="base")
# `registry import` reads nodes' on-disk layout, so it is attached here, not in registry/.
registry_app.command("import")(import_command)
app.add_typer(registry_app, name="registry")
app.command("export")(export_command)
app.command("serve")(serve_command)
app.command("pull")(pull_command)
keys_app.command("delegate-variants")(delegate_variants_command)
app.add_typer(keys_app, name="keys")
app.add_typer(update_app, name="update")
app.add_typer(cluster_app, name="cluster")
app.add_typer(feedback_app, name="feedback")
app.add_typer(node_app, name="node")

# Packages of the `server` extra: a command that needs one, run from an SDK-only install.
_SERVER_PACKAGES = frozenset(
    {
        "alembic",
        "grpc_health",
        "grpc_reflection",
        "matplotlib",
        "peft",
        "prometheus_client",
        "psycopg",
        "ray",
        "safetensors",
        "sqlalchemy",
        "tokenizers",
        "torch",
        "transformers",
    }
)

# Error types that are the user's to fix: printed plainly, exit code 2.
USER_ERRORS: tuple[type[BaseException], ...] = (HierarchyError, NodesError, RegistryError, ClusterError)


def _user_errors() -> tuple[type[BaseException], ...]:
    # The SDK's errors join only once a command has imported the SDK: importing it here would
    # pull grpc into every `--help` (tests/cluster/test_cli_help.py).
    sdk = sys.modules.get("treelm._errors")
    return USER_ERRORS if sdk is None else (*USER_ERRORS, sdk.TreeLMError)


def main(argv: list[str] | None = None) -> int:
    err = Console(stderr=True)
    try:
        # Standalone mode lets typer print usage errors itself (exit 2) and turn
        # Exit/Abort into SystemExit; our own typed errors still propagate here.
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except KeyboardInterrupt:
        err.print("[red]interrupted[/red]")
        return 130
    except _user_errors() as exc:
        err.print("[bold red]error:[/bold red]", escape(str(exc)), highlight=False)
        return 2
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in _SERVER_PACKAGES:
            raise
        needs = f"this command needs {exc.name}, part of the server install: pip install 'treelm[server]'"
        err.print("[bold red]error:[/bold red]", escape(needs), highlight=False, soft_wrap=True)
        return 2
    return 0
