"""A device's check of a variant manifest: root keys -> the signers' delegation -> the manifest."""

from __future__ import annotations

import pytest

from hierarchy.errors import EnvelopeError, ManifestError, ThresholdError, UnknownKeyError
from hierarchy.updates.distribution import (
    DELEGATION_PAYLOAD_TYPE,
    SignerDelegation,
    parse_delegation,
    sign_delegation,
    verify_variant,
)
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.variants import sign_variant_manifest
from tests.hierarchy.test_variant_manifest import manifest

ROOT_A, ROOT_B, SIGNER, OTHER = (SigningKey.generate() for _ in range(4))


def delegation(tree="demo", keys=(SIGNER,), threshold=1, roots=(ROOT_A,)):
    return sign_delegation(SignerDelegation(tree, tuple(k.public for k in keys), threshold), list(roots))


def test_a_manifest_signed_by_a_delegated_key_verifies_from_the_root():
    m = manifest()
    parsed, signers, valid = verify_variant(sign_variant_manifest(m, [SIGNER]), delegation(), [ROOT_A.public])
    assert parsed == m and signers.tree == "demo" and valid == (SIGNER.keyid,)
    assert parse_delegation(delegation().payload) == signers


@pytest.mark.parametrize(
    ("case", "error", "message"),
    [
        ("manifest by an undelegated key", UnknownKeyError, "not signed by any key trusted"),
        ("delegation by another root", UnknownKeyError, "delegation is not signed by any key trusted"),
        ("two roots needed, one signed", ThresholdError, "1 valid signature"),
        ("delegated for another tree", ManifestError, "delegated for 'other'"),
        ("payload changed after signing", ThresholdError, "0 valid signature"),
        ("delegation as the manifest", EnvelopeError, "expected a application/vnd.treelm.variant.v1"),
    ],
)
def test_every_break_in_the_chain_is_refused(case, error, message):
    m = manifest()
    good_manifest, good_delegation, roots, threshold = (
        sign_variant_manifest(m, [SIGNER]),
        delegation(),
        [ROOT_A.public],
        1,
    )
    if case == "manifest by an undelegated key":
        good_manifest = sign_variant_manifest(m, [OTHER])
    elif case == "delegation by another root":
        good_delegation = delegation(roots=(OTHER,))
    elif case == "two roots needed, one signed":
        roots, threshold = [ROOT_A.public, ROOT_B.public], 2
    elif case == "delegated for another tree":
        good_delegation = delegation(tree="other")
    elif case == "payload changed after signing":
        payload = good_manifest.payload.replace(b'"length":10', b'"length":11')
        good_manifest = Envelope(good_manifest.payload_type, payload, good_manifest.signatures)
    elif case == "delegation as the manifest":
        good_manifest = good_delegation
    with pytest.raises(error, match=message):
        verify_variant(good_manifest, good_delegation, roots, threshold)


def test_two_roots_and_two_signers_when_asked_for():
    both = delegation(keys=(SIGNER, OTHER), threshold=2, roots=(ROOT_A, ROOT_B))
    signed = sign_variant_manifest(manifest(), [SIGNER, OTHER])
    assert len(verify_variant(signed, both, [ROOT_A.public, ROOT_B.public], 2)[2]) == 2
    with pytest.raises(ThresholdError):
        verify_variant(sign_variant_manifest(manifest(), [SIGNER]), both, [ROOT_A.public], 1)


def test_bad_delegations_name_their_field():
    with pytest.raises(ManifestError, match="threshold must be 1..1") as info:
        SignerDelegation("demo", (SIGNER.public,), 2)
    assert info.value.details["field"] == "threshold"
    with pytest.raises(ManifestError, match="at least one signing key"):
        SignerDelegation("demo", (), 1)
    with pytest.raises(ManifestError, match="canonical"):
        parse_delegation(b'{"tree": "demo", "keys": ["' + SIGNER.public.hex.encode() + b'"], "threshold": 1}')
    assert DELEGATION_PAYLOAD_TYPE.endswith("+json")
