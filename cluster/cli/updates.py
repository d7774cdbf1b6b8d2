"""`treelm keys ...` and `treelm update ...`: signing keys, and the signed update protocol.

Keys talk to the registry (``--db``, else $TREELM_REGISTRY_URL). Update commands run either
*locally* against a tree directory and its registry (``--tree DIR [--db URL]``: the operator's
machine, where the tree lives) or *remotely* through a server's Updates service
(``--server HOST:PORT``, the token from ``--token-file`` or ``$TREELM_TOKEN``, and ``--tls``,
``--ca``, ``--client-cert``/``--client-key`` for TLS and mutual-TLS servers: a hospital
submitting from its own site). ``update make``
and ``update verify`` never change anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cluster.cli.connect import (
    CaOption,
    ClientCertOption,
    ClientKeyOption,
    Connection,
    TlsOption,
    TokenFileOption,
    TokenOption,
)
from cluster.cli.passphrase import (
    NoEncryptOption,
    PasswordEnv,
    PasswordFile,
    load_key,
    load_keys,
    new_key_passphrase,
    passphrase,
)
from hierarchy.errors import UpdateError
from hierarchy.updates.envelope import Envelope, sign_payload
from hierarchy.updates.statements import REPIN_PAYLOAD_TYPE, ROLLBACK_PAYLOAD_TYPE
from hierarchy.updates.trust import Role
from hierarchy.updates.verify import VERIFICATION_CHECKS

if TYPE_CHECKING:
    from cluster.updates.coordinator import Coordinator

__all__ = ["keys_app", "update_app"]

keys_app = typer.Typer(
    help="Ed25519 signing keys of the update protocol (roles: node, evaluator, operator, root).", no_args_is_help=True
)
update_app = typer.Typer(help="Signed updates: make, verify, submit, approve, roll back.", no_args_is_help=True)

DbOption = Annotated[str | None, typer.Option("--db", help="registry URL (default: $TREELM_REGISTRY_URL)")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
SignWith = Annotated[
    list[Path] | None,
    typer.Option("--sign-with", help="a key dir or private PEM that signs (repeatable: root or current group keys)"),
]
TreeOption = Annotated[Path | None, typer.Option("--tree", help="the tree dir (local mode, with --db)")]
ServerOption = Annotated[str | None, typer.Option("--server", help="HOST:PORT of a server (remote mode)")]
PolicyOption = Annotated[
    Path | None, typer.Option("--policy", help="update policy YAML (default: TREE_DIR/update-policy.yaml)")
]


def _echo_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


# -- keys ---------------------------------------------------------------------------------------
@keys_app.command("gen")
def keys_gen(
    out: Annotated[Path, typer.Option("--out", help="directory for private.pem (mode 0600) and public.pem")],
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
    no_encrypt: NoEncryptOption = False,
) -> None:
    """Generate an Ed25519 key pair; prints its key id (sha256 of the public key).

    private.pem is encrypted with the passphrase from --password-file, --password-env (default
    $TREELM_KEY_PASSPHRASE) or a prompt; --no-encrypt writes it unencrypted.
    """
    from cluster.updates.keys import write_key_files

    files = write_key_files(out, password=new_key_passphrase(password_env, password_file, no_encrypt))
    typer.echo(files.keyid)
    Console(stderr=True).print(
        f"[green]wrote[/green] {escape(str(files.private))} (0600) and "
        f"{escape(str(files.public))}; register it with `treelm keys register {escape(str(out))} "
        "--role ...`"
    )


@keys_app.command("register")
def keys_register(
    key_dir: Annotated[Path, typer.Argument(help="the key directory from `treelm keys gen` (its key signs too)")],
    role: Annotated[str, typer.Option("--role", help="node, evaluator, operator or root")],
    node: Annotated[str | None, typer.Option("--node", help="the node the key acts for (omit: every node)")] = None,
    sign_with: SignWith = None,
    threshold: Annotated[int | None, typer.Option("--threshold", help="the group's new threshold")] = None,
    db: DbOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
) -> None:
    """Trust a key for a role: signed by the key itself and by root (new group) or the group's keys."""
    from cluster.updates.keys import register_key
    from registry.db import open_registry

    password = passphrase(password_env, password_file)
    new = load_key(key_dir, password)
    signers = load_keys(sign_with, password)
    with open_registry(db) as reg:
        trust = register_key(reg, new, role, node, signers, threshold)
    group = trust.group(Role.parse(role), node)
    Console().print(
        f"[green]registered[/green] {new.keyid[:16]}... as {escape(role)} for "
        f"{escape(node or 'every node')} (group threshold {group.threshold}, key-set version "
        f"{group.version})"
    )


@keys_app.command("ls")
def keys_ls(db: DbOption = None, as_json: JsonOption = False) -> None:
    """List registered signing keys with their role, node, status and group threshold."""
    from cluster.updates.keys import load_trust
    from registry.access import list_signing_keys
    from registry.db import open_registry

    with open_registry(db) as reg:
        records = list_signing_keys(reg)
        trust = load_trust(reg)
    if as_json:
        _echo_json(
            {
                "keys": [
                    {
                        "keyid": r.key_id,
                        "role": r.role,
                        "node": r.node_id,
                        "status": r.status,
                        "created_at": r.created_at.isoformat(),
                        "threshold": trust.threshold(Role.parse(r.role), r.node_id),
                    }
                    for r in records
                ]
            }
        )
        return
    table = Table(title="signing keys")
    for col in ("key id", "role", "node", "status", "group threshold", "created"):
        table.add_column(col)
    for r in records:
        style = "red" if r.status == "revoked" else "green"
        table.add_row(
            r.key_id[:16] + "...",
            r.role,
            escape(r.node_id or "*"),
            f"[{style}]{r.status}[/{style}]",
            str(trust.threshold(Role.parse(r.role), r.node_id)),
            r.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)


@keys_app.command("rotate")
def keys_rotate(
    role: Annotated[str, typer.Option("--role", help="the group's role")],
    new: Annotated[list[Path], typer.Option("--new", help="key dir of a key in the new set (repeatable)")],
    threshold: Annotated[int, typer.Option("--threshold", help="the new set's threshold")],
    node: Annotated[str | None, typer.Option("--node", help="the group's node (omit: role-wide)")] = None,
    sign_with: SignWith = None,
    db: DbOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
) -> None:
    """Replace a group's keys: needs a threshold of the OLD keys and a threshold of the NEW keys."""
    from cluster.updates.keys import load_public_key, rotate
    from registry.db import open_registry

    password = passphrase(password_env, password_file)
    signers = load_keys(sign_with, password)
    # New keys sign for themselves when their private key is at hand (proof of possession).
    publics = []
    for path in new:
        publics.append(load_public_key(path))
        private = path / "private.pem" if path.is_dir() else None
        if private is not None and private.is_file():
            signers.append(load_key(path, password))
    with open_registry(db) as reg:
        trust = rotate(reg, role, publics, threshold, signers, node)
    group = trust.group(Role.parse(role), node)
    Console().print(
        f"[green]rotated[/green] {escape(role)}/{escape(node or '*')}: {len(publics)} key(s), "
        f"threshold {group.threshold}, key-set version {group.version}"
    )


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[str, typer.Argument(help="the key id to revoke (see `treelm keys ls --json`)")],
    sign_with: SignWith = None,
    db: DbOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
) -> None:
    """Revoke a key for good (signed by root's threshold of root keys)."""
    from cluster.updates.keys import revoke
    from registry.db import open_registry

    password = passphrase(password_env, password_file)
    with open_registry(db) as reg:
        revoke(reg, keyid, load_keys(sign_with, password))
    Console().print(f"[green]revoked[/green] {escape(keyid[:16])}...: it will never be trusted again")


# -- update -------------------------------------------------------------------------------------
@contextmanager
def _local(tree: Path | None, db: str | None, policy: Path | None) -> Iterator[Coordinator]:
    """The tree's coordinator (the first use registers the tree and pins its built versions)."""
    from cluster.updates.coordinator import Coordinator
    from cluster.updates.policy import UpdatePolicy
    from registry.db import open_registry

    if tree is None:
        raise typer.BadParameter("give --tree DIR (local mode) or --server HOST:PORT (remote mode)")
    with open_registry(db) as reg:
        yield Coordinator.open(reg, tree, UpdatePolicy.for_tree(tree, policy))


def _connect(server: str, token, token_file, tls, ca, client_cert, client_key):
    """A client for --server with the command's TLS and token options (cluster/cli/connect.py)."""
    return Connection.of(
        server, token=token, token_file=token_file, tls=tls, ca=ca, client_cert=client_cert, client_key=client_key
    ).client()


def _remote(call):
    import treelm

    try:
        return call()
    except treelm.TreeLMError as exc:
        kind = f" ({exc.kind})" if exc.kind else ""
        Console(stderr=True).print(
            f"[bold red]error:[/bold red] {exc.code.name if exc.code else ''}{kind}: {escape(exc.details)}",
            highlight=False,
        )
        raise typer.Exit(2) from None


def _print_status(status: Any, as_json: bool) -> None:
    from cluster.updates.status import UpdateStatus

    data = (
        status.to_json()
        if isinstance(status, UpdateStatus)
        else {
            k: getattr(status, k)
            for k in (
                "update_id",
                "kind",
                "node",
                "version",
                "parent",
                "parent_version",
                "state",
                "reasons",
                "approvals",
                "approvals_needed",
                "candidate_id",
                "figures",
                "manifest_digest",
            )
        }
    )
    if as_json:
        _echo_json(data)
        return
    console = Console()
    style = {"rejected": "red", "stable": "green", "absorbed": "green", "awaiting-approval": "yellow"}.get(
        data["state"], "cyan"
    )
    console.print(
        f"update [bold]{data['update_id']}[/bold] ({data['kind']}): {escape(data['node'])} "
        f"v{data['version']} -> [{style}]{data['state']}[/{style}]"
    )
    approvals = f"; approvals {data['approvals']}/{data['approvals_needed']}" if data["kind"] == "candidate" else ""
    console.print(
        f"  over {escape(data['parent'])} v{data['parent_version']}{approvals}"
        + (f"; in candidate {data['candidate_id']}" if data["candidate_id"] else "")
    )
    for reason in data["reasons"]:
        console.print(f"  - {escape(reason)}", highlight=False)
    gate = {k: v for k, v in data["figures"].items() if k.startswith("gate.checks.")}
    if gate:
        table = Table(title="gate (relative perplexity change)")
        table.add_column("check")
        table.add_column("change", justify="right")
        for name, value in sorted(gate.items()):
            table.add_row(escape(name[len("gate.checks.") : -len(".change")]), f"{value:+.2%}")
        console.print(table)


@update_app.command("make")
def update_make(
    tree_dir: Annotated[Path, typer.Argument(help="your copy of the tree dir (its snapshot is trained over)")],
    key: Annotated[Path, typer.Option("--key", help="the node's key dir or private PEM")],
    out: Annotated[Path, typer.Option("--out", help="the package directory to write")],
    node_id: Annotated[
        str | None, typer.Argument(help="the node to fine-tune on --train, e.g. demo/en/medical/oncology")
    ] = None,
    train: Annotated[
        Path | None, typer.Option("--train", help="local training text (UTF-8; documents split by blank lines)")
    ] = None,
    from_feedback: Annotated[
        str | None,
        typer.Option("--from-feedback", help="NODE: train on its waiting feedback instead (from the registry)"),
    ] = None,
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="whose feedback (--from-feedback; default: anonymous)")
    ] = None,
    db: DbOption = None,
    policy: PolicyOption = None,
    eval_file: Annotated[
        Path | None, typer.Option("--eval", help="local eval text (default: the last 10% of --train, held out)")
    ] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps (default 20; feedback: the policy's)")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate (default 3e-3; feedback: the policy's)")] = None,
    seed: Annotated[int, typer.Option(help="seed")] = 0,
    version: Annotated[int | None, typer.Option(help="the new version (default: current + 1)")] = None,
    expires_days: Annotated[float, typer.Option("--expires-days", help="days until the package expires")] = 7.0,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
    as_json: JsonOption = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's choice)")] = None,
) -> None:
    """Fine-tune a node on local data (or its users' feedback) and write a signed package.

    The package is a manifest, a DSSE envelope and PEFT files. With ``--from-feedback NODE`` the
    training data are the tenant's waiting corrections and positively rated answers whose texts
    were retained; the newest part is held out, and every later update of the node must improve on it.
    """
    import torch

    from cluster.updates.make import make_package

    if (node_id is None) == (from_feedback is None) or (node_id is not None and train is None):
        raise typer.BadParameter("give NODE_ID with --train FILE, or --from-feedback NODE (not both)")
    signer = load_key(key, passphrase(password_env, password_file))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    if from_feedback is not None:
        from cluster.cli.learn import make_from_feedback_command

        try:
            make_from_feedback_command(
                tree_dir, from_feedback, tenant, db, signer, out, policy, steps, lr, seed, as_json
            )
        finally:
            torch.set_num_threads(previous)
        return
    assert node_id is not None and train is not None  # checked above
    steps, lr = steps or 20, lr or 3e-3
    try:
        with Console(stderr=True).status(f"fine-tuning {escape(node_id)} for {steps} steps ..."):
            made = make_package(
                tree_dir,
                node_id,
                train,
                signer,
                out,
                eval_file=eval_file,
                steps=steps,
                lr=lr,
                seed=seed,
                version=version,
                expires_in=timedelta(days=expires_days),
            )
    finally:
        torch.set_num_threads(previous)  # an in-process caller (the demo) keeps its own setting
    m = made.manifest
    if as_json:
        _echo_json(
            {
                "package": str(made.path),
                "node": str(m.node),
                "version": m.version,
                "parent_version": m.parent_version,
                "manifest_digest": m.digest,
                "metrics": dict(made.metrics),
            }
        )
        return
    Console().print(
        f"[green]wrote[/green] {escape(str(made.path))}: {escape(str(m.node))} v{m.version} over {escape(str(m.parent))} "
        f"v{m.parent_version}, signed by {signer.keyid[:16]}...; held-out perplexity "
        f"{made.metrics['eval_ppl_before']:.2f} -> {made.metrics['eval_ppl']:.2f}"
    )


@update_app.command("verify")
def update_verify(
    package: Annotated[Path, typer.Argument(help="a package directory")],
    tree: Annotated[Path, typer.Option("--tree", help="the tree dir the package is for")],
    db: DbOption = None,
    policy: PolicyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check a package against the registry (keys, versions, digests) without applying it.

    Prints every check; exit 0 only if all pass, 1 with the failing check otherwise. (The first
    command on a tree dir registers the tree and pins its built versions; nothing else is written.)
    """
    from cluster.updates.package import read_package

    failed: UpdateError | None = None
    with _local(tree, db, policy) as coordinator:
        try:
            coordinator.verify(read_package(package, coordinator.policy.max_package_bytes))
        except UpdateError as exc:
            failed = exc
    steps = VERIFICATION_CHECKS
    # An envelope that does not even parse fails the first check.
    failing = None if failed is None else (failed.check if failed.check in steps else steps[0])
    rows, seen = [], False
    for check in steps:
        if failing == check:
            rows.append((check, "FAILED", f"{type(failed).__name__}: {failed}"))
            seen = True
        else:
            rows.append((check, "not run" if seen else "ok", ""))
    if as_json:
        _echo_json({"ok": failed is None, "checks": [{"check": c, "result": r, "detail": d} for c, r, d in rows]})
    else:
        table = Table(title=f"verify {package}")
        for col in ("check", "result", "detail"):
            table.add_column(col)
        for check, result, detail in rows:
            style = {"ok": "green", "FAILED": "bold red"}.get(result, "dim")
            table.add_row(check, f"[{style}]{result}[/{style}]", escape(detail))
        Console().print(table)
    if failed is not None:
        raise typer.Exit(1)


@update_app.command("submit")
def update_submit(
    package: Annotated[Path, typer.Argument(help="a package directory")],
    tree: TreeOption = None,
    db: DbOption = None,
    policy: PolicyOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a package: verified, screened and gated; then stored, served, and aggregated upward."""
    from cluster.updates.package import read_package

    if server:
        with _connect(server, token, token_file, tls, ca, client_cert, client_key) as client:
            status = _remote(lambda: client.submit_update(package))
    else:
        with _local(tree, db, policy) as coordinator, Console(stderr=True).status("verifying, screening, gating ..."):
            status = coordinator.submit(read_package(package, coordinator.policy.max_package_bytes))
    _print_status(status, as_json)


@update_app.command("status")
def update_status(
    update_id: Annotated[str | None, typer.Argument(help="an update id (omit: list this tree's updates)")] = None,
    tree: TreeOption = None,
    db: DbOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one update, or list the tree's updates."""
    if server:
        if not update_id:
            raise typer.BadParameter("remote mode shows one update: give its id")
        with _connect(server, token, token_file, tls, ca, client_cert, client_key) as client:
            _print_status(_remote(lambda: client.update_status(update_id)), as_json)
        return
    with _local(tree, db, None) as coordinator:
        if update_id:
            _print_status(coordinator.status(update_id), as_json)
            return
        found = coordinator.updates()
    if as_json:
        _echo_json({"updates": [s.to_json() for s in found]})
        return
    table = Table(title="updates (ids: any unique prefix of 8+ characters works)")
    for col in ("id", "kind", "node", "version", "state", "approvals", "candidate"):
        table.add_column(col, no_wrap=col in ("id", "candidate"))
    for s in found:
        table.add_row(
            s.update_id[:12],
            s.kind,
            escape(s.node),
            str(s.version),
            s.state,
            f"{s.approvals}/{s.approvals_needed}" if s.kind == "candidate" else "-",
            (s.candidate_id or "-")[:12],
        )
    Console().print(table)


@update_app.command("approve")
def update_approve(
    update_id: Annotated[str, typer.Argument(help="the candidate's update id")],
    key: Annotated[Path, typer.Option("--key", help="an evaluator or operator key dir / private PEM")],
    tree: TreeOption = None,
    db: DbOption = None,
    policy: PolicyOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
    as_json: JsonOption = False,
) -> None:
    """Approve a candidate: sign its manifest (DSSE PAE) with your key; at k-of-n it becomes stable."""
    signer = load_key(key, passphrase(password_env, password_file))
    if server:
        with _connect(server, token, token_file, tls, ca, client_cert, client_key) as client:
            status = _remote(lambda: client.approve(update_id, signer))
    else:
        with _local(tree, db, policy) as coordinator:
            envelope = Envelope.from_bytes(coordinator.status(update_id).envelope)
            with Console(stderr=True).status("approving (re-validating the subtree when it completes) ..."):
                status = coordinator.approve(update_id, signer.keyid, signer.sign(envelope.pae()))
    _print_status(status, as_json)


@update_app.command("rollback")
def update_rollback(
    node_id: Annotated[str, typer.Argument(help="the node whose `stable` alias moves back")],
    to: Annotated[int, typer.Option("--to", help="the accepted version to serve again")],
    key: Annotated[list[Path], typer.Option("--key", help="operator key dir / private PEM (repeatable)")],
    tree: TreeOption = None,
    db: DbOption = None,
    policy: PolicyOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    ca: CaOption = None,
    client_cert: ClientCertOption = None,
    client_key: ClientKeyOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
) -> None:
    """Move `stable` back to an accepted version (nothing is re-signed); its subtree is re-pinned."""
    password = passphrase(password_env, password_file)
    signers = load_keys(key, password)
    if server:
        with _connect(server, token, token_file, tls, ca, client_cert, client_key) as client:
            result = _remote(lambda: client.rollback(node_id, to, signers))
    else:
        with _local(tree, db, policy) as coordinator:
            statement = coordinator.rollback_statement(node_id, to)
            result = coordinator.rollback(node_id, to, sign_payload(ROLLBACK_PAYLOAD_TYPE, statement, signers))
    Console().print(f"[green]stable[/green] of {escape(result.node)}: v{result.previous_version} -> v{result.version}")
    for node in result.held:
        Console().print(f"  [yellow]held[/yellow] {escape(node)}: stays on its validated chain", highlight=False)


@update_app.command("repin")
def update_repin(
    node_id: Annotated[str, typer.Argument(help="a held node")],
    key: Annotated[list[Path], typer.Option("--key", help="operator key dir / private PEM (repeatable)")],
    tree: TreeOption = None,
    db: DbOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
) -> None:
    """Operator decision: serve a held node over its parent's current chain without re-validation."""
    password = passphrase(password_env, password_file)
    signers = load_keys(key, password)
    with _local(tree, db, None) as coordinator:
        statement = coordinator.repin_statement(node_id)
        served = coordinator.repin(node_id, sign_payload(REPIN_PAYLOAD_TYPE, statement, signers))
    chain = " > ".join(f"{x.path}@v{x.version}" for x in served.chain)
    Console().print(f"[green]repinned[/green] {escape(node_id)}: {escape(chain)}")


@update_app.command("tick")
def update_tick(
    tree: TreeOption = None,
    db: DbOption = None,
    policy: PolicyOption = None,
    password_env: PasswordEnv = None,
    password_file: PasswordFile = None,
    as_json: JsonOption = False,
) -> None:
    """Aggregate every parent whose window has passed, and turn waiting feedback into updates where
    the policy says so (run it from cron; every decision is in `treelm update log`)."""
    from cluster.cli.learn import decision_rows, feedback_tick, print_decisions

    password = passphrase(password_env, password_file)
    with _local(tree, db, policy) as coordinator:
        made = coordinator.tick()
        decisions = feedback_tick(coordinator, lambda path: load_key(Path(path), password))
    if as_json:
        _echo_json({"candidates": made, "decisions": decision_rows(decisions)})
        return
    Console().print(f"{len(made)} candidate(s) made" + (": " + ", ".join(made) if made else ""))
    if decisions:
        print_decisions(decisions, "feedback policy: this tick")


@update_app.command("log")
def update_log(
    node: Annotated[str | None, typer.Option("--node", help="only this node's events")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The registry's record of every update state change (keys, versions, pins, approvals), and
    the feedback policy's decisions with their reasons."""
    from cluster.cli.learn import decision_rows, print_decisions
    from registry.db import open_registry
    from registry.feedback import list_decisions
    from registry.updates import list_update_events

    with open_registry(db) as reg:
        events = list_update_events(reg, node=node)
        decisions = list_decisions(reg, node)
    if as_json:
        _echo_json(
            {
                "decisions": decision_rows(decisions),
                "events": [
                    {
                        "at": e.at.isoformat(),
                        "event": e.event,
                        "node": e.node_id,
                        "update_id": e.update_id,
                        "detail": dict(e.detail),
                    }
                    for e in events
                ],
            }
        )
        return
    if decisions:
        print_decisions(decisions)
    table = Table(title="update events")
    for col in ("at", "event", "node", "update"):
        table.add_column(col)
    for e in events:
        table.add_row(e.at.strftime("%Y-%m-%d %H:%M:%S"), e.event, escape(e.node_id or "-"), (e.update_id or "-")[:12])
    Console().print(table)
