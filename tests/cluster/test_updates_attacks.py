"""The attack table (after python-tuf's and Flower's): every malicious or broken update is refused
through the coordinator AND through `treelm update submit`, with its exact error, and the tree
dir and every registry row are byte-identical afterwards."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cluster.cli import main
from cluster.updates.forgetting import measure_update
from cluster.updates.keys import register_key, revoke, rotate
from cluster.updates.package import Package, read_package, write_package
from cluster.updates.policy import POLICY_FILE, UpdatePolicy
from hierarchy import errors as e
from hierarchy.updates.envelope import Envelope, Signature
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.screening import Verdict
from nodes.build.gate import read_eval_text
from tests.cluster.update_world import (
    World,
    built_tree,
    combine,
    crafted_adapter,
    honest_adapter,
    lm_loss,
    make_world,
    package_of,
    served,
    stored_state,
    tokens,
)

RAD, CARD, LEGAL = "en/medical/radiology", "en/medical/cardiology", "en/legal"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    # The gate is what these attacks meet: auto (concat, or TIES on sign conflicts) passes a poisoned
    # increment to it whole. (The
    # default contrast merge shrinks it where the parent's and siblings' inputs lie, so the sibling
    # and held-out poisons no longer hurt enough to be refused: see the last test.)
    w = make_world(tmp_path_factory.mktemp("attacks"), built_tree(tmp_path_factory), UpdatePolicy(merge="auto"))
    (w.tree / POLICY_FILE).write_text("merge: auto\n")  # the same policy for the CLI's submissions
    # History to replay against: en/legal is at v2 (its increment waits in en's candidate).
    legal_v2, _ = package_of(w, LEGAL, honest_adapter(w, LEGAL), out=w.folder / "legal-v2")
    assert w.coordinator.submit(legal_v2).state == "aggregated"
    # Cardiology needs 2 of its 2 keys; radiology has a second key that is revoked.
    card2, rad_old = SigningKey.generate(), SigningKey.generate()
    card1 = w.keys.nodes[CARD]
    rotate(w.registry, "node", [card1.public, card2.public], 2, [card1, card2], f"ut/{CARD}")
    register_key(w.registry, rad_old, "node", f"ut/{RAD}", [w.keys.nodes[RAD]])
    revoke(w.registry, rad_old.keyid, [w.keys.root])
    w.keys.spare.update({"card2": card2, "rad-revoked": rad_old})
    yield w
    w.close()


def _tamper_file(p: Package) -> Package:
    files = dict(p.files)
    data = bytearray(files["adapter_model.safetensors"])
    data[-5] ^= 0x01  # one byte of one weight
    files["adapter_model.safetensors"] = bytes(data)
    return Package(p.envelope, files)


def _tamper_manifest(p: Package) -> Package:
    body = json.loads(p.envelope.payload)
    body["metrics"]["eval_ppl"] = 1.0  # claim a better score after signing
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return Package(Envelope(p.envelope.payload_type, payload, p.envelope.signatures), p.files)


def _honest(w: World, **kw) -> Package:
    return package_of(w, RAD, honest_adapter(w, RAD), **kw)[0]


def _parent_poison(w: World) -> Package:
    """Helps radiology (its own probe improves) but pushes the parent away from general medicine."""
    rad, med = tokens(w, w.local(RAD)), tokens(w, w.data / "en/medical/train.txt")
    adapter = crafted_adapter(w, RAD, lambda m, g: 2 * lm_loss(m, rad, g) - 0.3 * lm_loss(m, med, g), steps=20)
    return package_of(w, RAD, adapter)[0]


def _sibling_poison_adapter(w: World):
    """Helps radiology, keeps the parent's own text, and ascends on cardiology's text."""
    rad, med = tokens(w, w.local(RAD)), tokens(w, w.data / "en/medical/train.txt")
    card = tokens(w, w.data / CARD / "train.txt")
    loss = lambda m, g: 2 * lm_loss(m, rad, g) - lm_loss(m, card, g) + lm_loss(m, med, g)  # noqa: E731
    return crafted_adapter(w, RAD, loss, steps=30)


def _sibling_poison(w: World) -> Package:
    return package_of(w, RAD, _sibling_poison_adapter(w))[0]


def _scaled(w: World, factor: float) -> Package:
    """The honest increment times ``factor``, as an exact adapter (current + factor * increment)."""
    _, current, _ = served(w, RAD)
    return package_of(w, RAD, combine(current, [(factor, honest_adapter(w, RAD))]))[0]


def _past(w: World) -> Package:
    then = datetime.now(UTC) - timedelta(days=3)
    return _honest(w, now=then, expires_in=timedelta(days=1))


@dataclass(frozen=True)
class Attack:
    name: str
    build: Callable[[World], Package]
    error: type[Exception]
    detail: Callable[[Exception], bool] = lambda exc: True


ATTACKS = [
    Attack("tampered payload byte", lambda w: _tamper_file(_honest(w)), e.HashMismatchError),
    Attack(
        "tampered manifest",
        lambda w: _tamper_manifest(_honest(w)),
        e.ThresholdError,
        lambda exc: exc.details["valid"] == 0,
    ),
    Attack(
        "unsigned", lambda w: _honest(w, signers=[]), e.ThresholdError, lambda exc: "0 signature(s) present" in str(exc)
    ),
    Attack(
        "wrong key (a sibling's)",
        lambda w: _honest(w, signers=[w.keys.nodes[CARD]]),
        e.ThresholdError,
        lambda exc: "scoped to other nodes" in str(exc),
    ),
    Attack("unknown key", lambda w: _honest(w, signers=[SigningKey.generate()]), e.UnknownKeyError),
    Attack("revoked key", lambda w: _honest(w, signers=[w.keys.spare["rad-revoked"]]), e.RevokedKeyError),
    Attack(
        "threshold not met (1 of 2)",
        lambda w: package_of(w, CARD, honest_adapter(w, CARD))[0],
        e.ThresholdError,
        lambda exc: (exc.details["needed"], exc.details["valid"]) == (2, 1),
    ),
    Attack("replayed same version", lambda w: read_package(w.folder / "legal-v2"), e.ReplayError),
    Attack(
        "older version", lambda w: package_of(w, LEGAL, honest_adapter(w, LEGAL, seed=3), version=1)[0], e.RollbackError
    ),
    Attack(
        "skipped version",
        lambda w: _honest(w, version=4),
        e.SkippedVersionError,
        lambda exc: (exc.details["current"], exc.details["got"]) == (1, 4),
    ),
    Attack("expired", _past, e.ExpiredError),
    Attack("stale parent version", lambda w: _honest(w, parent_version=0), e.StaleParentError),
    Attack("different base", lambda w: _honest(w, base_digest="0" * 64), e.BaseMismatchError),
    Attack(
        "x100 norm",
        lambda w: _scaled(w, 100.0),
        e.ScreeningRejected,
        lambda exc: exc.details["result"].verdict is Verdict.TOO_LARGE,
    ),
    Attack(
        "near-zero update",
        lambda w: _scaled(w, 1e-7),
        e.ScreeningRejected,
        lambda exc: exc.details["result"].verdict is Verdict.TOO_SMALL,
    ),
    Attack(
        "sign-flipped update",
        lambda w: _scaled(w, -1.0),
        e.ScreeningRejected,
        lambda exc: exc.details["result"].verdict is Verdict.OPPOSED and exc.details["result"].weight == 0.0,
    ),
    Attack(
        "helps its child, hurts the parent's held-out text",
        _parent_poison,
        e.GateRejected,
        lambda exc: _gate(exc, fails={"parent ut/en/medical held-out"}, improves="update ut/en/medical/radiology"),
    ),
    Attack(
        "hurts a sibling's probe",
        _sibling_poison,
        e.GateRejected,
        lambda exc: _gate(
            exc,
            fails={"probe ut/en/medical/cardiology"},
            passes={"parent ut/en/medical held-out"},
            improves="update ut/en/medical/radiology",
        ),
    ),
]


def _gate(exc: Exception, *, fails: set[str], passes: set[str] = frozenset(), improves: str = "") -> bool:
    report = exc.details["report"]
    checks = {c.name: c for c in report.checks}
    failed = {c.name for c in report.failures}
    own = next(c for name, c in checks.items() if name.startswith(improves))
    # The figures are in the refusal: before, after, change and bound of every failing check.
    return (
        fails <= failed
        and not (passes & failed)
        and own.change < 0
        and all(f"{checks[n].before:.3f} -> {checks[n].after:.3f}" in str(exc) for n in fails)
    )


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_refused_and_changes_nothing(world, attack, tmp_path, capsys):
    package = attack.build(world)
    before = stored_state(world)
    with pytest.raises(Exception) as info:
        world.coordinator.submit(package)
    assert type(info.value) is attack.error, f"{attack.name}: {type(info.value).__name__}: {info.value}"
    assert attack.detail(info.value), f"{attack.name}: {info.value}"
    assert stored_state(world) == before, f"{attack.name} changed stored state"

    # The same package through the CLI: exit code 2, the same refusal, still nothing changed.
    write_package(tmp_path / "pkg", package.envelope, package.files)
    code = main(["update", "submit", str(tmp_path / "pkg"), "--tree", str(world.tree), "--db", world.url])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and str(info.value).split(":")[0][:40] in err, err
    assert stored_state(world) == before, f"{attack.name} (CLI) changed stored state"


def test_verify_prints_every_check_and_fails_on_the_first_bad_one(world, tmp_path, capsys):
    good = _honest(world, out=tmp_path / "good")
    code = main(["update", "verify", str(tmp_path / "good"), "--tree", str(world.tree), "--db", world.url, "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["ok"] and [c["result"] for c in report["checks"]] == ["ok"] * 9
    bad = _tamper_file(good)
    write_package(tmp_path / "bad", bad.envelope, bad.files)
    before = stored_state(world)
    code = main(["update", "verify", str(tmp_path / "bad"), "--tree", str(world.tree), "--db", world.url, "--json"])
    report = json.loads(capsys.readouterr().out)
    results = {c["check"]: c["result"] for c in report["checks"]}
    assert code == 1 and not report["ok"] and results["files"] == "FAILED"
    assert [results[c] for c in ("keys", "threshold", "manifest", "expiry", "version")] == ["ok"] * 5
    assert [results[c] for c in ("parent", "base", "shapes")] == ["not run"] * 3
    assert "HashMismatchError" in next(c["detail"] for c in report["checks"] if c["check"] == "files")
    assert stored_state(world) == before


def test_a_signature_is_over_the_exact_bytes_not_the_json(world):
    """Re-serialising the manifest (same JSON, other bytes) breaks the signature: DSSE signs the PAE."""
    package = _honest(world)
    body = json.loads(package.envelope.payload)
    spaced = json.dumps(body, sort_keys=True, indent=1).encode()
    forged = Envelope(package.envelope.payload_type, spaced, package.envelope.signatures)
    with pytest.raises(e.ThresholdError):
        world.coordinator.submit(Package(forged, package.files))
    sig = package.envelope.signatures[0]
    assert Signature(sig.keyid, base64.b64decode(base64.b64encode(sig.sig))) == sig


def test_refusals_are_not_recorded_but_an_accepted_update_is(world):
    before = stored_state(world)
    with pytest.raises(e.ThresholdError):
        world.coordinator.submit(_honest(world, signers=[]))
    assert stored_state(world) == before  # a refused package leaves no trace (the server log has it)
    assert Path(world.tree / "snapshot.json").is_file()


def test_the_default_merge_shrinks_a_sibling_poison_below_the_gate(world):
    """The sibling poison that auto hands to the gate (refused above) hurts cardiology by less
    than the gate's bound once the default contrast merge has shrunk it where the parent's and the
    other children's inputs lie: the merge protects siblings before the gate has to."""
    poison = _sibling_poison_adapter(world)
    view, bench = world.coordinator._view(), world.coordinator.bench
    text = read_eval_text(world.local(RAD), "radiology update text")
    concat = measure_update(bench, UpdatePolicy(merge="auto"), view, RAD, poison, text)
    default = measure_update(bench, UpdatePolicy(), view, RAD, poison, text)
    assert default.method == "contrast"
    assert concat.siblings[CARD] > 0.02 and not concat.gate_passed
    assert default.siblings[CARD] <= 0.02 < concat.siblings[CARD]
