"""Bad input gets a typed error naming the field, and the engine keeps serving everyone else."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from nodes.base.model import TinyBaseConfig, load_base, make_tiny_base
from nodes.errors import (
    AdapterError,
    BaseModelError,
    DeadlineExceeded,
    EngineConfigError,
    IntegrityError,
    InvalidRequest,
    QueueFull,
    UnknownNode,
)
from nodes.runtime import cache as cache_module
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import FinishReason, GenerationRequest, SamplingParams
from tests.nodes.treefactory import MergedReference, make_random_tree

PROMPT = "The patient was admitted with chest pain."


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("errors") / "tree", tiny_base_dir)


@pytest.fixture(scope="module")
def reference(tiny_base_dir, tree):
    return MergedReference(tiny_base_dir, tree)


@pytest.fixture(scope="module")
def engine(tiny_base_dir, tree):
    engine = Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4, max_new_tokens_limit=64, max_context=128))
    yield engine
    engine.close()


def request(node, prompt=PROMPT, deadline=None, **params):
    return GenerationRequest(node=node, prompt=prompt, params=SamplingParams(**params), deadline=deadline)


async def assert_still_serving(engine, reference, node, n=6):
    req = request(node, max_new_tokens=n)
    result = await engine.generate(req)
    assert list(result.token_ids) == reference.tokens(node, engine.encode(req), n)


BAD_REQUESTS = {
    "unknown-node": (lambda t: request(f"{t.name}/en/nope"), UnknownNode, None),
    "other-tree": (lambda t: request("other-tree/en"), UnknownNode, None),
    "malformed-node": (lambda t: request(f"{t.name}/EN/Bad Path"), InvalidRequest, "node"),
    "longer-than-context": (lambda t: request(f"{t.name}/en", prompt="word " * 200), InvalidRequest, "prompt"),
    "empty-prompt": (lambda t: request(f"{t.name}/en", prompt=""), InvalidRequest, "prompt"),
    "above-the-limit": (lambda t: request(f"{t.name}/en", max_new_tokens=65), InvalidRequest, "max_new_tokens"),
    "past-deadline": (lambda t: request(f"{t.name}/en", deadline=time.time() - 1), DeadlineExceeded, None),
    "not-a-request": (lambda t: "hello", InvalidRequest, "request"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
async def test_bad_requests_get_typed_errors_and_nothing_is_queued(engine, reference, tree, case):
    make, error, field = BAD_REQUESTS[case]
    before = engine.stats()
    # A good request is in flight while the bad one is refused.
    good = asyncio.ensure_future(engine.generate(request(f"{tree.name}/fr/medical", max_new_tokens=10)))
    with pytest.raises(error) as info:
        await engine.generate(make(tree))
    if field is not None:
        assert info.value.field == field
    assert (await good).usage.completion_tokens >= 0
    after = engine.stats()
    assert after.submitted == before.submitted + 1 and after.failed == before.failed
    await assert_still_serving(engine, reference, f"{tree.name}/en/medical")


@pytest.mark.parametrize(
    "params, field",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": ("",)}, "stop"),
    ],
)
def test_bad_sampling_parameters_name_the_field(params, field):
    with pytest.raises(InvalidRequest) as info:
        SamplingParams(**params)
    assert info.value.field == field


async def test_a_changed_adapter_file_fails_its_subtree_only(tiny_base_dir, tmp_path):
    tree = make_random_tree(tmp_path / "tree", tiny_base_dir)
    reference = MergedReference(tiny_base_dir, tree)
    file = tree.node(f"{tree.name}/en/medical").directory / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-2] ^= 0x01
    file.write_bytes(bytes(data))
    async with Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4)) as engine:
        ok_nodes = [f"{tree.name}/en", f"{tree.name}/en/legal/contracts", f"{tree.name}/fr/medical", tree.name]
        bad_nodes = [f"{tree.name}/en/medical", f"{tree.name}/en/medical/radiology"]
        results = await asyncio.gather(
            *(engine.generate(request(n, max_new_tokens=8)) for n in ok_nodes + bad_nodes), return_exceptions=True
        )
        for node, result in zip(ok_nodes, results, strict=False):
            assert list(result.token_ids) == reference.tokens(node, engine.encode(request(node)), 8)
        for result in results[len(ok_nodes) :]:
            assert isinstance(result, IntegrityError) and "changed on disk" in str(result)
        stats = engine.stats()
        assert stats.failed == 2 and stats.cache.integrity_failures == 2 and stats.cache.pinned == 0
        assert engine.cache.tier_of("en/medical") == "disk"
        await assert_still_serving(engine, reference, f"{tree.name}/en/legal")


async def test_a_full_queue_rejects_with_queue_full_and_serves_the_rest(tiny_base_dir, tree, reference):
    config = EngineConfig(max_batch_size=1, max_queue=1)
    async with Engine(tiny_base_dir, tree.root, config) as engine:
        long = request(f"{tree.name}/en", max_new_tokens=300, ignore_eos=True)
        stream = engine.stream(long)
        await stream.__anext__()  # the long request is running: the batch (of one) is full
        queued = asyncio.ensure_future(engine.generate(request(f"{tree.name}/fr", max_new_tokens=5)))
        for _ in range(1000):  # the prompt is tokenized in a thread, then queued
            if engine.stats().queue_depth:
                break
            await asyncio.sleep(0.005)
        assert engine.stats().queue_depth == 1
        with pytest.raises(QueueFull):
            await engine.generate(request(f"{tree.name}/en/legal", max_new_tokens=5))
        assert engine.stats().rejected == 1
        rest = [c async for c in stream]
        assert rest[-1].finish_reason == FinishReason.LENGTH
        fr = await queued
        assert list(fr.token_ids) == reference.tokens(f"{tree.name}/fr", engine.encode(request(f"{tree.name}/fr")), 5)
        await assert_still_serving(engine, reference, f"{tree.name}/en/legal")


def test_engine_config_and_base_mismatches_are_refused(tiny_base_dir, tree, tmp_path):
    for bad in (
        {"max_batch_size": 0},
        {"max_queue": -1},
        {"max_context": 0},
        {"host_cache_bytes": -5},
        {"max_batch_size": 2.5},
    ):
        with pytest.raises(EngineConfigError, match=next(iter(bad))):
            EngineConfig(**bad)
    with pytest.raises(EngineConfigError, match="max_active_adapters"):
        Engine(tiny_base_dir, tree.root, EngineConfig(max_active_adapters=2))  # chains are 3 deep
    other = make_tiny_base(
        tmp_path / "other", TinyBaseConfig(hidden=32, layers=1, vocab=400, heads=2, kv_heads=1, seed=3)
    )
    with pytest.raises(BaseModelError, match="digest"):
        Engine(load_base(other), tree.root)
    with pytest.raises(BaseModelError, match="different base"):
        Engine(other, tree.root)


async def test_an_unreadable_adapter_fails_its_request_with_a_typed_error(tiny_base_dir, tmp_path, monkeypatch):
    tree = make_random_tree(tmp_path / "tree", tiny_base_dir)
    reference = MergedReference(tiny_base_dir, tree)
    unreadable = tree.node(f"{tree.name}/fr").directory
    real_read = cache_module.read_adapter

    def read(path, **kwargs):  # the disk refuses one node's folder (tests run as root: chmod would not)
        if Path(path) == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, **kwargs)

    monkeypatch.setattr(cache_module, "read_adapter", read)
    async with Engine(tiny_base_dir, tree.root) as engine:
        with pytest.raises(AdapterError, match="PermissionError"):
            await engine.generate(request(f"{tree.name}/fr/medical", max_new_tokens=4))
        assert engine.stats().failed == 1 and engine.stats().cache.pinned == 0
        await assert_still_serving(engine, reference, f"{tree.name}/en/legal")
