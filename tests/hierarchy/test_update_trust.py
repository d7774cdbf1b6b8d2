"""Key rotation and revocation, as tables in the manner of python-tuf's test_updater_key_rotations."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hierarchy.updates import (
    KeyStatus,
    RevokedKeyError,
    Role,
    RotationError,
    SigningKey,
    ThresholdError,
    TrustedKey,
    TrustState,
    UnknownKeyError,
    UpdateError,
    revoke_key,
    rotate_keys,
    sign_revocation,
    sign_rotation,
)
from hierarchy.updates.trust import rotation_statement

NODE = "demo/en/medical/radiology"


@pytest.fixture(scope="module")
def keys() -> list[SigningKey]:
    return [SigningKey.generate() for _ in range(10)]


@dataclass
class KeySet:
    """One version of a group's keys: who is in it, its threshold, who signed the change to it."""

    keys: list[int]
    threshold: int
    sigs: list[int]
    res: type[Exception] | None = None


# fmt: off
ROOT_ROTATIONS: dict[str, list[KeySet]] = {
    "1-of-1 key rotation": [
        KeySet(keys=[1], threshold=1, sigs=[1]),
        KeySet(keys=[2], threshold=1, sigs=[2, 1]),
        KeySet(keys=[2], threshold=1, sigs=[2]),
    ],
    "1-of-1 key rotation, unused signatures": [
        KeySet(keys=[1], threshold=1, sigs=[3, 1, 4]),
        KeySet(keys=[2], threshold=1, sigs=[3, 2, 1, 4]),
        KeySet(keys=[2], threshold=1, sigs=[3, 2, 4]),
    ],
    "1-of-1 key rotation fail: not signed with old key": [
        KeySet(keys=[1], threshold=1, sigs=[1]),
        KeySet(keys=[2], threshold=1, sigs=[2, 3, 4], res=ThresholdError),
    ],
    "1-of-1 key rotation fail: not signed with new key": [
        KeySet(keys=[1], threshold=1, sigs=[1]),
        KeySet(keys=[2], threshold=1, sigs=[1, 3, 4], res=ThresholdError),
    ],
    "3-of-5, sign with different key combos": [
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 4, 1]),
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 1, 3]),
    ],
    "3-of-5, one key rotated": [
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        KeySet(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 1]),
    ],
    "3-of-5, one key rotate fails: not signed with 3 new keys": [
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        KeySet(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4], res=ThresholdError),
    ],
    "3-of-5, one key rotate fails: not signed with 3 old keys": [
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        KeySet(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5], res=ThresholdError),
    ],
    "3-of-5, one key rotated, with intermediate step": [
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        KeySet(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 2, 4, 5]),
        KeySet(keys=[0, 1, 3, 4, 5], threshold=3, sigs=[0, 4, 5]),
    ],
    "3-of-5, all keys rotated, with intermediate step": [
        KeySet(keys=[0, 1, 2, 3, 4], threshold=3, sigs=[0, 2, 4]),
        KeySet(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[0, 2, 4, 5, 6, 7]),
        KeySet(keys=[5, 6, 7, 8, 9], threshold=3, sigs=[5, 6, 7]),
    ],
    "1-of-3 threshold increase to 2-of-3": [
        KeySet(keys=[1, 2, 3], threshold=1, sigs=[1]),
        KeySet(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
    ],
    "1-of-3 threshold bump to 2-of-3 fails: new threshold not reached": [
        KeySet(keys=[1, 2, 3], threshold=1, sigs=[1]),
        KeySet(keys=[1, 2, 3], threshold=2, sigs=[2], res=ThresholdError),
    ],
    "2-of-3 threshold decrease to 1-of-3": [
        KeySet(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        KeySet(keys=[1, 2, 3], threshold=1, sigs=[1, 2]),
        KeySet(keys=[1, 2, 3], threshold=1, sigs=[1]),
    ],
    "2-of-3 threshold decrease to 1-of-3 fails: old threshold not reached": [
        KeySet(keys=[1, 2, 3], threshold=2, sigs=[1, 2]),
        KeySet(keys=[1, 2, 3], threshold=1, sigs=[1], res=ThresholdError),
    ],
    "1-of-2 threshold increase to 2-of-2": [
        KeySet(keys=[1], threshold=1, sigs=[1]),
        KeySet(keys=[1, 2], threshold=2, sigs=[1, 2]),
    ],
    # Not in python-tuf: a rotated-out key is revoked for good, so it cannot be rotated back in.
    "a rotated-out key can never come back": [
        KeySet(keys=[1], threshold=1, sigs=[1]),
        KeySet(keys=[2], threshold=1, sigs=[1, 2]),
        KeySet(keys=[1], threshold=1, sigs=[1, 2], res=RevokedKeyError),
    ],
    "impossible threshold": [
        KeySet(keys=[1, 2], threshold=1, sigs=[1]),
        KeySet(keys=[1, 2], threshold=3, sigs=[1, 2], res=RotationError),
    ],
}
# fmt: on


@pytest.mark.parametrize("name", list(ROOT_ROTATIONS))
def test_root_rotation(keys, name):
    """Publish each key set in turn; the last one fails or succeeds as the table says.

    On failure the state equals (to the byte) the state before the last rotation.
    """
    versions = ROOT_ROTATIONS[name]
    first = versions[0]
    trust = TrustState.genesis([keys[i].public for i in first.keys], first.threshold)
    for step, ks in enumerate(versions[1:], start=1):
        new_keys = [keys[i].public for i in ks.keys]
        sigs = sign_rotation(trust, Role.ROOT, new_keys, ks.threshold, [keys[i] for i in ks.sigs])
        last = step == len(versions) - 1
        if last and ks.res is not None:
            before = trust.to_bytes()
            with pytest.raises(ks.res):
                rotate_keys(trust, Role.ROOT, new_keys, ks.threshold, sigs)
            assert trust.to_bytes() == before
            return
        new = rotate_keys(trust, Role.ROOT, new_keys, ks.threshold, sigs)
        assert new is not trust and new != trust
        trust = new
        assert {k.keyid for k in trust.active_keys(Role.ROOT)} == {keys[i].keyid for i in ks.keys}
        assert trust.threshold(Role.ROOT) == ks.threshold
        assert trust.group(Role.ROOT).version == step
    # Keys that left the set are revoked, not forgotten.
    everyone = {i for ks in versions for i in ks.keys}
    for i in everyone - set(versions[-1].keys):
        assert trust.key(keys[i].keyid).status is KeyStatus.REVOKED


@settings(max_examples=80, deadline=None)
@given(
    old=st.sets(st.integers(0, 5), min_size=1),
    new=st.sets(st.integers(0, 5), min_size=1),
    signers=st.sets(st.integers(0, 7)),
    data=st.data(),
)
def test_rotation_needs_a_threshold_of_old_and_of_new_keys(keys, old, new, signers, data):
    t_old = data.draw(st.integers(1, len(old)))
    t_new = data.draw(st.integers(1, len(new)))
    trust = TrustState.genesis([keys[i].public for i in sorted(old)], t_old)
    new_keys = [keys[i].public for i in sorted(new)]
    sigs = sign_rotation(trust, Role.ROOT, new_keys, t_new, [keys[i] for i in sorted(signers)])
    ok = len(signers & old) >= t_old and len(signers & new) >= t_new
    if ok:
        after = rotate_keys(trust, Role.ROOT, new_keys, t_new, sigs)
        assert {k.keyid for k in after.active_keys(Role.ROOT)} == {keys[i].keyid for i in new}
    else:
        before = trust.to_bytes()
        with pytest.raises(ThresholdError):
            rotate_keys(trust, Role.ROOT, new_keys, t_new, sigs)
        assert trust.to_bytes() == before


def test_rotation_signatures_are_single_use(keys):
    """A rotation statement names the group's next version: replaying it later fails."""
    trust = TrustState.genesis([keys[1].public], 1)
    to_12 = [keys[1].public, keys[2].public]
    first = sign_rotation(trust, Role.ROOT, to_12, 1, [keys[1], keys[2]])
    trust = rotate_keys(trust, Role.ROOT, to_12, 1, first)
    to_123 = [*to_12, keys[3].public]
    trust = rotate_keys(trust, Role.ROOT, to_123, 1, sign_rotation(trust, Role.ROOT, to_123, 1, keys[1:4]))
    before = trust.to_bytes()
    with pytest.raises(ThresholdError):  # would silently drop key 3 if replays worked
        rotate_keys(trust, Role.ROOT, to_12, 1, first)
    assert trust.to_bytes() == before
    assert b'"version":3' in rotation_statement(trust, Role.ROOT, to_12, 1)


# -- node groups: created by root, rotated by their own keys, recovered by root after revocation ----------


def test_node_group_lifecycle(keys):
    root, n1, n2, n3, stranger = keys[0], keys[1], keys[2], keys[3], keys[9]
    trust = TrustState.genesis([root.public], 1)
    # Creating a node's key group: root's threshold plus proof of possession by the new key.
    with pytest.raises(ThresholdError, match="root keys"):
        rotate_keys(
            trust,
            Role.NODE,
            [n1.public],
            1,
            sign_rotation(trust, Role.NODE, [n1.public], 1, [n1, stranger], node=NODE),
            node=NODE,
        )
    with pytest.raises(ThresholdError, match="new keys"):
        rotate_keys(
            trust,
            Role.NODE,
            [n1.public],
            1,
            sign_rotation(trust, Role.NODE, [n1.public], 1, [root], node=NODE),
            node=NODE,
        )
    trust = rotate_keys(
        trust,
        Role.NODE,
        [n1.public],
        1,
        sign_rotation(trust, Role.NODE, [n1.public], 1, [root, n1], node=NODE),
        node=NODE,
    )
    assert [k.keyid for k in trust.keys_acting_for(Role.NODE, NODE)] == [n1.keyid]
    assert trust.keys_acting_for(Role.NODE, "demo/en/medical") == ()
    # Once it exists, the node rotates its own keys: root alone is not enough.
    with pytest.raises(ThresholdError, match="current node keys"):
        rotate_keys(
            trust,
            Role.NODE,
            [n2.public],
            1,
            sign_rotation(trust, Role.NODE, [n2.public], 1, [root, n2], node=NODE),
            node=NODE,
        )
    trust = rotate_keys(
        trust,
        Role.NODE,
        [n2.public, n3.public],
        2,
        sign_rotation(trust, Role.NODE, [n2.public, n3.public], 2, [n1, n2, n3], node=NODE),
        node=NODE,
    )
    assert trust.key(n1.keyid).status is KeyStatus.REVOKED and trust.threshold(Role.NODE, NODE) == 2
    # n3 is lost: root revokes it; the group can no longer reach 2-of-2, so root re-creates it.
    trust = revoke_key(trust, n3.keyid, sign_revocation(n3.keyid, [root]))
    fresh = keys[4]
    trust = rotate_keys(
        trust,
        Role.NODE,
        [n2.public, fresh.public],
        2,
        sign_rotation(trust, Role.NODE, [n2.public, fresh.public], 2, [root, n2, fresh], node=NODE),
        node=NODE,
    )
    assert {k.keyid for k in trust.active_keys(Role.NODE, NODE)} == {n2.keyid, fresh.keyid}
    # A key belongs to one group only.
    with pytest.raises(RotationError, match="already belongs"):
        rotate_keys(trust, Role.OPERATOR, [fresh.public], 1, (), node=None)


def test_revocation_needs_root_and_is_permanent(keys):
    r1, r2, n = keys[0], keys[1], keys[2]
    trust = TrustState.genesis([r1.public, r2.public], 2, keys=[TrustedKey(n.public, Role.NODE, NODE)])
    before = trust.to_bytes()
    for signers in ([], [r1], [n], [r1, r1]):
        with pytest.raises(ThresholdError):
            revoke_key(trust, n.keyid, sign_revocation(n.keyid, signers))
        assert trust.to_bytes() == before
    with pytest.raises(UnknownKeyError):
        revoke_key(trust, keys[9].keyid, sign_revocation(keys[9].keyid, [r1, r2]))
    # A signature for revoking another key does not revoke this one.
    with pytest.raises(ThresholdError):
        revoke_key(trust, n.keyid, sign_revocation(r2.keyid, [r1, r2]))
    after = revoke_key(trust, n.keyid, sign_revocation(n.keyid, [r1, r2]))
    assert after.key(n.keyid).status is KeyStatus.REVOKED and trust.key(n.keyid).active
    assert revoke_key(after, n.keyid, sign_revocation(n.keyid, [r1, r2])) is after  # replay: no change
    with pytest.raises(RotationError, match="rotate the root keys"):
        revoke_key(after, r1.keyid, sign_revocation(r1.keyid, [r1, r2]))


def test_trust_state_round_trips_through_its_stored_form(keys):
    trust = TrustState.genesis([keys[0].public], 1, {Role.NODE: 2}, keys=[TrustedKey(keys[1].public, Role.NODE, NODE)])
    trust = trust.with_node_version(NODE, 3, 1).with_accepted_norm("demo/en/medical", 0.5)
    again = TrustState.from_bytes(trust.to_bytes())
    assert again == trust and again.to_bytes() == trust.to_bytes() and again.digest == trust.digest
    assert again.threshold(Role.NODE, NODE) == 2 and again.accepted_norms("demo/en/medical") == (0.5,)
    stored = trust.to_dict()
    stored["keys"][0]["keyid"] = "0" * 64
    with pytest.raises(RotationError, match="does not match"):
        TrustState.from_dict(stored)


def test_accepted_norm_history_is_a_bounded_window():
    trust = TrustState()
    for i in range(10):
        trust = trust.with_accepted_norm("demo/en", float(i), window=4)
    assert trust.accepted_norms("demo/en") == (6.0, 7.0, 8.0, 9.0)
    assert trust.median_norm("demo/en") == 7.5 and trust.median_norm("demo/fr") is None
    with pytest.raises(ValueError):
        trust.with_accepted_norm("demo/en", float("nan"))


def test_bad_requests_are_typed(keys):
    trust = TrustState.genesis([keys[0].public], 1)
    with pytest.raises(RotationError, match="at least one key"):
        rotate_keys(trust, Role.ROOT, [], 1, ())
    with pytest.raises(RotationError, match="twice"):
        rotate_keys(trust, Role.ROOT, [keys[1].public, keys[1].public], 1, ())
    with pytest.raises(RotationError, match="unknown role"):
        rotate_keys(trust, "admin", [keys[1].public], 1, ())
    with pytest.raises(RotationError, match="cannot be scoped"):
        rotate_keys(trust, Role.ROOT, [keys[1].public], 1, (), node=NODE)
    with pytest.raises(RotationError):
        TrustState.genesis([keys[0].public], 2)
    assert issubclass(RotationError, UpdateError)
