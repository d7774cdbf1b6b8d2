"""Update manifests, DSSE envelopes and Ed25519 keys: exact bytes, strict parsing, PAE signatures."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from hierarchy.errors import HierarchyError
from hierarchy.updates import (
    UPDATE_PAYLOAD_TYPE,
    Envelope,
    EnvelopeError,
    FileEntry,
    KeyFormatError,
    ManifestError,
    PublicKey,
    Signature,
    SigningKey,
    UpdateError,
    UpdateManifest,
    pae,
    parse_manifest,
    sha256_digest,
    sign_manifest,
)

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


def make_manifest(**overrides) -> UpdateManifest:
    fields = dict(
        node="demo/en/medical/radiology",
        parent="demo/en/medical",
        parent_version=2,
        base_digest=sha256_digest(b"base weights"),
        version=4,
        files={
            "adapter_model.safetensors": FileEntry.of("adapter_model.safetensors", b"weights"),
            "adapter_config.json": FileEntry.of("adapter_config.json", b"{}"),
        },
        layers={"model.layers.0.self_attn.q_proj": {"out": 8, "in": 8, "rank": 2}},
        training_data_digest=sha256_digest(b"radiology reports"),
        metrics={"eval_ppl": 12.5, "eval_loss": 2.53},
        created=T0,
        expires=T0 + timedelta(days=7),
    )
    fields.update(overrides)
    return UpdateManifest(**fields)


# -- PAE and signatures --------------------------------------------------------------------------------


def test_pae_matches_the_dsse_specification_example():
    # The worked example of the DSSE protocol document.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    # LEN counts bytes, not characters.
    assert pae("t\u00e9", b"\xff\x00") == b"DSSEv1 3 t\xc3\xa9 2 \xff\x00"


def test_signature_covers_pae_bytes_not_the_payload_nor_its_json():
    key = SigningKey.generate()
    m = make_manifest()
    env = sign_manifest(m, [key])
    sig = env.signatures[0]
    assert key.public.verify(sig.sig, pae(UPDATE_PAYLOAD_TYPE, m.to_bytes()))
    assert not key.public.verify(sig.sig, m.to_bytes())  # the bare payload is not what was signed
    # The same JSON document, serialised differently, does not verify.
    for reserialised in (
        json.dumps(m.to_dict(), indent=2).encode(),
        json.dumps(m.to_dict(), sort_keys=False).encode(),
        json.dumps(m.to_dict(), sort_keys=True).encode(),  # default separators add spaces
    ):
        assert json.loads(reserialised) == json.loads(m.to_bytes())
        assert not key.public.verify(sig.sig, pae(UPDATE_PAYLOAD_TYPE, reserialised))
    # The payload type is signed too.
    assert not key.public.verify(sig.sig, pae("application/json", m.to_bytes()))


@settings(max_examples=30, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(0, 7))
def test_any_flipped_payload_bit_breaks_the_signature(position, bit):
    key = SigningKey.generate()
    payload = make_manifest().to_bytes()
    env = sign_manifest(make_manifest(), [key])
    i = position % len(payload)
    tampered = bytearray(payload)
    tampered[i] ^= 1 << bit
    assert key.public.verify(env.signatures[0].sig, pae(UPDATE_PAYLOAD_TYPE, payload))
    assert not key.public.verify(env.signatures[0].sig, pae(UPDATE_PAYLOAD_TYPE, bytes(tampered)))


# -- manifest bytes ------------------------------------------------------------------------------------


def test_manifest_serialises_to_sorted_compact_utf8_and_parses_back():
    m = make_manifest()
    raw = m.to_bytes()
    assert b" " not in raw and b"\n" not in raw
    assert list(json.loads(raw)) == sorted(json.loads(raw))
    assert json.loads(raw)["created"] == "2030-01-01T12:00:00Z"
    again = parse_manifest(raw)
    assert again == m and again.to_bytes() == raw
    assert m.digest == "sha256:" + hashlib.sha256(raw).hexdigest()
    assert [f.name for f in m.files] == ["adapter_config.json", "adapter_model.safetensors"]  # sorted


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(
    version=st.integers(1, 10**9),
    parent_version=st.integers(0, 10**9),
    metrics=st.dictionaries(names, st.floats(allow_nan=False, allow_infinity=False, width=64), max_size=5),
    files=st.dictionaries(names, st.binary(max_size=64), min_size=1, max_size=4),
    lifetime=st.integers(1, 10**8),
    epoch=st.integers(0, 4 * 10**9),
)
def test_manifest_round_trips_exactly(version, parent_version, metrics, files, lifetime, epoch):
    m = make_manifest(
        version=version,
        parent_version=parent_version,
        metrics=metrics,
        files={name: FileEntry.of(name, data) for name, data in files.items()},
        created=epoch,
        expires=epoch + lifetime,
    )
    raw = m.to_bytes()
    assert parse_manifest(raw) == m
    assert parse_manifest(raw).to_bytes() == raw


def test_equivalent_but_non_canonical_json_is_refused():
    m = make_manifest()
    for text in (
        json.dumps(m.to_dict(), indent=1),
        json.dumps(m.to_dict(), sort_keys=True),
        json.dumps(dict(reversed(m.to_dict().items())), separators=(",", ":")),  # key order not sorted
    ):
        with pytest.raises(ManifestError, match="canonical"):
            parse_manifest(text.encode())


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda d: d.pop("version"), "version"),
        (lambda d: d.update(surprise=1), "surprise"),
        (lambda d: d.update(version=0), "version"),
        (lambda d: d.update(version="4"), "version"),
        (lambda d: d.update(version=True), "version"),
        (lambda d: d.update(parent_version=-1), "parent_version"),
        (lambda d: d.update(parent="demo/en"), "parent"),
        (lambda d: d.update(node="demo"), "node"),
        (lambda d: d.update(node="Demo/EN"), "node"),
        (lambda d: d.update(base_digest="md5:abc"), "base_digest"),
        (lambda d: d.update(created=1893499200), "created"),
        (lambda d: d.update(expires=d["created"]), "expires"),
        (lambda d: d.update(files={"../escape": {"sha256": "0" * 64, "length": 1}}), "files"),
        (lambda d: d.update(files={"/abs": {"sha256": "0" * 64, "length": 1}}), "files"),
        (lambda d: d.update(files={"a": {"sha256": "0" * 63, "length": 1}}), "files"),
        (lambda d: d.update(files={}), "files"),
        (lambda d: d.update(layers={"q": {"out": 0, "in": 8, "rank": 2}}), "layers.q.out"),
        (lambda d: d.update(metrics={"ppl": "low"}), "metrics"),
    ],
)
def test_bad_manifest_fields_are_named(mutate, field):
    d = make_manifest().to_dict()
    mutate(d)
    raw = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(ManifestError) as info:
        parse_manifest(raw)
    assert field in str(info.value)
    assert isinstance(info.value, UpdateError) and isinstance(info.value, HierarchyError)


def test_duplicate_keys_and_non_numbers_are_refused():
    raw = make_manifest().to_bytes()
    with pytest.raises(ManifestError, match="repeats"):
        parse_manifest(raw[:-1] + b',"version":4}')
    with pytest.raises(ManifestError, match="NaN"):
        parse_manifest(raw.replace(b'"eval_loss":2.53', b'"eval_loss":NaN'))
    with pytest.raises(ManifestError, match="UTF-8 JSON"):
        parse_manifest(b"\xff\xfe")


def test_times_must_be_aware_and_keep_second_precision():
    with pytest.raises(ManifestError, match="timezone-aware"):
        make_manifest(created=datetime(2030, 1, 1))
    m = make_manifest(created=T0 + timedelta(microseconds=700), expires="2030-02-01T00:00:00Z")
    assert m.created == T0 and m.expires == datetime(2030, 2, 1, tzinfo=UTC)


# -- envelopes -----------------------------------------------------------------------------------------


def test_envelope_round_trips_and_co_signing_keeps_the_payload():
    a, b = SigningKey.generate(), SigningKey.generate()
    env = sign_manifest(make_manifest(), [a])
    wire = env.to_bytes()
    assert set(json.loads(wire)) == {"payload", "payloadType", "signatures"}
    assert Envelope.from_bytes(wire) == env
    both = env.with_signatures(*sign_manifest(make_manifest(), [b]).signatures)
    assert both.payload == env.payload and [s.keyid for s in both.signatures] == [a.keyid, b.keyid]
    assert env.signatures == (env.signatures[0],)  # the original is untouched


@pytest.mark.parametrize(
    "wire, message",
    [
        (b"not json", "not JSON"),
        (b"[]", "JSON object"),
        (b'{"payload":"!!!","payloadType":"t","signatures":[]}', "base64"),
        (b'{"payload":"","payloadType":"t","signatures":[],"x":1}', "unknown field"),
        (b'{"payload":"","payloadType":"t","signatures":[{"keyid":1,"sig":""}]}', r"signatures\[0\]"),
        (b'{"payload":"","payloadType":"t","payloadType":"u","signatures":[]}', "duplicate"),
        (b'{"payload":"","payloadType":"","signatures":[]}', "payloadType"),
    ],
)
def test_malformed_envelopes_are_refused(wire, message):
    with pytest.raises(EnvelopeError, match=message):
        Envelope.from_bytes(wire)


def test_too_many_signatures_are_refused():
    with pytest.raises(EnvelopeError, match="at most"):
        Envelope("t", b"x", tuple(Signature(str(i), b"") for i in range(33)))


# -- keys ----------------------------------------------------------------------------------------------


def test_key_ids_are_the_sha256_of_the_raw_public_key():
    key = SigningKey.generate()
    raw = key.public.raw
    assert len(raw) == 32 and key.keyid == hashlib.sha256(raw).hexdigest()
    assert PublicKey.from_hex(key.public.hex) == key.public


def test_keys_round_trip_through_pem_with_and_without_password():
    key = SigningKey.generate()
    assert SigningKey.from_pem(key.to_pem()) == key
    locked = key.to_pem(password=b"correct horse")
    assert b"ENCRYPTED" in locked
    assert SigningKey.from_pem(locked, password=b"correct horse") == key
    with pytest.raises(KeyFormatError, match="password"):
        SigningKey.from_pem(locked, password=b"wrong")
    public_pem = key.public.to_pem()
    assert public_pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert PublicKey.from_pem(public_pem) == key.public
    message = b"DSSEv1 1 t 1 x"
    assert PublicKey.from_pem(public_pem).verify(key.sign(message), message)


def test_non_ed25519_and_malformed_keys_are_refused():
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ec_pem = ec_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(KeyFormatError, match="Ed25519"):
        SigningKey.from_pem(ec_pem)
    ec_pub = ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyFormatError, match="Ed25519"):
        PublicKey.from_pem(ec_pub)
    with pytest.raises(KeyFormatError):
        PublicKey(b"short")
    with pytest.raises(KeyFormatError):
        PublicKey.from_hex("zz" * 32)
    with pytest.raises(KeyFormatError):
        SigningKey.from_pem(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")


def test_private_key_never_shows_in_repr_and_bad_signatures_do_not_raise():
    key = SigningKey.generate()
    assert key.seed.hex() not in repr(key) and key.keyid[:12] in repr(key)
    assert key.public.verify(b"\x00" * 64, b"m") is False
    assert key.public.verify(b"short", b"m") is False
