"""Shared test setup: one torch thread, offline Hugging Face, and a session-wide tiny base."""

from __future__ import annotations

import os

# Before any HF import: never reach a model hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import pytest

try:  # torch is always installed for the server packages; keep it to one thread on 2 cores
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    torch = None

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + tokenizer written once per test session."""
    from nodes.base.model import TinyBaseConfig, make_tiny_base

    out = tmp_path_factory.mktemp("bases") / "tiny"
    return make_tiny_base(out, TinyBaseConfig(hidden=64, layers=2, vocab=400, heads=4, kv_heads=2))
