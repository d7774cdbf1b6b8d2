"""Every `treelm ...` command documented in README.md still parses against the real CLI.

Commands are taken from fenced shell blocks (lines starting with `treelm` or
`$ treelm`, with backslash continuations joined). Each is parsed by click down to
its leaf command -- unknown commands, unknown options and missing arguments fail
-- without running it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from cluster.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def documented_commands() -> list[str]:
    commands: list[str] = []
    in_fence = in_block = False
    pending = ""
    for line in README.read_text().splitlines():
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            in_block = in_fence and line.strip().strip("`").strip() in ("", "bash", "sh", "console", "shell")
            pending = ""
            continue
        if not in_block:
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1] + " "
            continue
        pending = ""
        text = re.sub(r"^\$\s+", "", text)
        if text.startswith("treelm "):
            commands.append(text)
    return commands


def parse_only(argv: list[str]) -> None:
    command = typer.main.get_command(app)
    ctx = command.make_context("treelm", list(argv), resilient_parsing=False)
    # typer vendors its own click, so duck-type groups rather than isinstance-check them.
    while hasattr(command, "resolve_command"):
        # click >= 8.2 keeps the sub-command name in _protected_args until invoke.
        protected = getattr(ctx, "_protected_args", None) or getattr(ctx, "protected_args", None) or []
        args = [*protected, *ctx.args]
        if not args:
            return
        name, sub, rest = command.resolve_command(ctx, list(args))
        ctx = sub.make_context(name, rest, parent=ctx)
        command = sub


COMMANDS = documented_commands()


def test_readme_documents_commands():
    assert len(COMMANDS) >= 10, COMMANDS


def segments(line: str) -> list[list[str]]:
    """Split a shell line at &&, ||, ; and | into the treelm invocations it contains."""
    words = shlex.split(line, comments=True, posix=True)
    out: list[list[str]] = [[]]
    for word in words:
        if word in ("&&", "||", ";", "|"):
            out.append([])
        else:
            out[-1].append(word)
    return [seg[1:] for seg in out if seg and seg[0] == "treelm"]


@pytest.mark.parametrize("line", COMMANDS)
def test_documented_command_parses(line):
    invocations = segments(line)
    assert invocations, line
    for argv in invocations:
        try:
            parse_only(argv)
        except Exception as exc:
            # A path that only exists on a user's machine is fine; every other usage error is not.
            if not (type(exc).__name__ == "BadParameter" and "does not exist" in str(exc)):
                raise
