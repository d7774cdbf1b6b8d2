"""Variants of any stored node version for end devices: HF safetensors, a flat PEFT adapter, GGUF.

    store = VariantStore(TREE_DIR)
    artifact = store.build("demo/en/medical/cardiology", "merged-int8")        # cached after the first call
    artifact = store.build("demo/en/medical", "gguf-lora", version=2)          # a version made by an update
    artifact.manifest.files, artifact.files("gguf"), artifact.verify()

Kinds and why each is what it is: :mod:`nodes.build.variants.kinds`; which weights a variant
is made of: :mod:`nodes.build.variants.source`; the cache: :mod:`nodes.build.variants.store`;
GGUF after llama.cpp's converters: :mod:`nodes.build.variants.gguf_model` and
:mod:`nodes.build.variants.gguf_lora`.
"""

from nodes.build.variants.kinds import ALIASES, KINDS, VariantKind, canonical_kind
from nodes.build.variants.source import VariantSource, resolve_source
from nodes.build.variants.store import (
    MANIFEST_FILE,
    VARIANTS_DIR,
    SilentProgress,
    VariantArtifact,
    VariantProgress,
    VariantStore,
    variant_key,
    verify_files,
)

__all__ = [
    "ALIASES",
    "KINDS",
    "MANIFEST_FILE",
    "VARIANTS_DIR",
    "SilentProgress",
    "VariantArtifact",
    "VariantKind",
    "VariantProgress",
    "VariantSource",
    "VariantStore",
    "canonical_kind",
    "resolve_source",
    "variant_key",
    "verify_files",
]
