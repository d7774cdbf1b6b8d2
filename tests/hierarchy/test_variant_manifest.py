"""The variant manifest: one canonical byte form, every field checked and named when wrong, signable."""

from __future__ import annotations

import json

import pytest

from hierarchy.updates import ManifestError
from hierarchy.updates.keys import SigningKey
from hierarchy.updates.manifest import FileEntry
from hierarchy.updates.variants import (
    VARIANT_PAYLOAD_TYPE,
    VariantLink,
    VariantManifest,
    VariantRequirement,
    parse_variant_manifest,
    sign_variant_manifest,
)

A, B, C, K = ("a" * 64, "b" * 64, "c" * 64, "d" * 64)


def manifest(**over) -> VariantManifest:
    fields = dict(
        key=K,
        kind="flat",
        node="demo/en/medical",
        version=2,
        chain=(VariantLink("en", 1, A), VariantLink("en/medical", 2, B)),
        base={"digest": C, "model": "smollm2", "hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        files=(FileEntry("adapter_model.safetensors", A, 10), FileEntry("README.md", B, 3)),
        load={"adapter": ("adapter_model.safetensors",), "card": ("README.md",)},
        requires=VariantRequirement("merged", "demo", C),
        metrics={"eval_ppl": 12.5},
        builder={"gguf": "0.19.0"},
    )
    return VariantManifest(**(fields | over))


def test_round_trip_through_the_canonical_bytes():
    m = manifest()
    assert parse_variant_manifest(m.to_bytes()) == m
    assert m.size == 13 and m.file("README.md").length == 3
    assert m.digest.startswith("sha256:") and [f.name for f in m.files] == ["README.md", "adapter_model.safetensors"]
    base = manifest(node="demo", version=0, chain=(), requires=None, kind="merged")
    assert parse_variant_manifest(base.to_bytes()).node.is_base


def test_equivalent_but_not_canonical_bytes_are_refused():
    data = json.loads(manifest().to_bytes())
    with pytest.raises(ManifestError, match="canonical form"):
        parse_variant_manifest(json.dumps(data).encode())
    with pytest.raises(ManifestError, match="repeats the JSON key"):
        parse_variant_manifest(b'{"key":"x","key":"y"}')
    with pytest.raises(ManifestError, match="unknown field"):
        parse_variant_manifest(json.dumps(data | {"extra": 1}, sort_keys=True, separators=(",", ":")).encode())


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        ({"key": "XYZ"}, "key", "64 lower-case hex"),
        ({"kind": "Flat Adapter"}, "kind", "is not a variant kind"),
        ({"version": 3}, "version", "chain ends at version 2"),
        ({"chain": (VariantLink("en/medical", 2, B),)}, "chain", "must name"),
        ({"node": "demo", "chain": (), "version": 1}, "version", "the base has version 0"),
        ({"base": {"digest": C, "model": "smollm2"}}, "base", "digest, model, hub_id"),
        ({"files": ()}, "files", "at least one file"),
        ({"load": {"adapter": ("missing.bin",)}}, "load", "does not list"),
        ({"load": {}}, "load", "how to load"),
        ({"requires": {"kind": "merged", "node": "demo", "key": "short"}}, "requires.key", "64 lower-case hex"),
        ({"metrics": {"ppl": float("nan")}}, "metrics", "plain JSON"),
    ],
)
def test_every_bad_field_is_named(change, field, message):
    with pytest.raises(ManifestError, match=message) as info:
        manifest(**change)
    assert info.value.details["field"] == field


def test_file_names_must_stay_inside_the_directory():
    with pytest.raises(ManifestError, match="relative path"):
        manifest(files=(FileEntry("../../etc/passwd", A, 1),))


def test_a_signed_manifest_verifies_and_a_changed_byte_does_not():
    key = SigningKey.generate()
    envelope = sign_variant_manifest(manifest(), [key])
    assert envelope.payload_type == VARIANT_PAYLOAD_TYPE and envelope.signatures[0].keyid == key.keyid
    assert key.public.verify(envelope.signatures[0].sig, envelope.pae())
    tampered = envelope.payload.replace(b'"length":10', b'"length":11')
    assert tampered != envelope.payload
    assert not key.public.verify(envelope.signatures[0].sig, type(envelope)(VARIANT_PAYLOAD_TYPE, tampered).pae())


def test_the_total_must_add_up():
    data = json.loads(manifest().to_bytes())
    assert data["bytes"] == 13
    with pytest.raises(ManifestError, match="the files add up to 13") as info:
        VariantManifest.from_dict(data | {"bytes": 14})
    assert info.value.details["field"] == "bytes"
