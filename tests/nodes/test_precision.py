"""Serving precision: bf16 and int8 weight-only engines score close to fp32, adapters still apply,
and the prefix cache and chunked prefill stay exact within a precision."""

from __future__ import annotations

import math

import pytest
import torch

from nodes.base.model import load_base
from nodes.base.precision import Int8Linear, apply_precision, bf16_supported, precision_of, resolve_precision
from nodes.errors import BaseModelError, EngineConfigError
from nodes.runtime.engine import Engine, EngineConfig
from nodes.runtime.requests import GenerationRequest, SamplingParams
from tests.nodes.treefactory import make_random_tree

TEXT = "The patient was admitted with chest pain. The radiologist reviewed the scan. " * 3


@pytest.fixture(scope="module")
def tree(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("precision") / "tree", tiny_base_dir)


def test_auto_follows_the_hardware_and_bad_names_are_refused():
    assert resolve_precision("auto") == ("bf16" if bf16_supported() else "fp32")
    assert [resolve_precision(p) for p in ("fp32", "bf16", "int8")] == ["fp32", "bf16", "int8"]
    with pytest.raises(BaseModelError, match="fp32, bf16, int8 or auto"):
        resolve_precision("fp16")
    with pytest.raises(EngineConfigError, match="EngineConfig.precision"):
        EngineConfig(precision="float16")


def test_serve_refuses_an_unknown_precision_before_anything_starts(tmp_path):
    from cluster.errors import ServeError
    from cluster.service.standalone import StandaloneOptions

    assert StandaloneOptions(tmp_path, precision="int8").precision == "int8"
    with pytest.raises(ServeError, match="--precision must be one of fp32, bf16, int8 or auto"):
        StandaloneOptions(tmp_path, precision="fp16")


def test_int8_linear_is_the_per_channel_dequantized_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48, bias=True)
    layer = Int8Linear(linear)
    assert layer.qweight.dtype == torch.int8 and layer.scales.shape == (48,)
    # Each weight is within half a step of its channel's scale.
    step = linear.weight.abs().amax(dim=1, keepdim=True) / 127
    assert ((layer.weight.float() - linear.weight).abs() <= step * 0.51 + 1e-3).all()
    x = torch.randn(5, 64)
    want = torch.nn.functional.linear(x, layer.weight.float(), linear.bias)
    got = layer(x.to(torch.bfloat16)).float()
    assert torch.allclose(got, want, rtol=0.02, atol=0.02)
    assert layer(x.to(torch.bfloat16).view(5, 1, 64)).shape == (5, 1, 48)


def test_int8_keeps_unaligned_layers_and_unties_the_head(tiny_base_dir):
    base = load_base(tiny_base_dir)
    model = base.model
    model.model.layers[0].mlp.gate_proj = torch.nn.Linear(40, 128, bias=False)  # an odd width: stays bf16
    count = apply_precision(model, "int8")
    assert precision_of(model) == "int8"
    assert type(model.model.layers[0].mlp.gate_proj) is torch.nn.Linear
    assert model.model.layers[0].mlp.gate_proj.weight.dtype == torch.bfloat16
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.get_input_embeddings().weight.dtype == torch.bfloat16
    assert count == sum(isinstance(m, Int8Linear) for m in model.modules()) > 0
    with pytest.raises(BaseModelError, match="already int8"):
        apply_precision(model, "bf16")
    with pytest.raises(BaseModelError, match="already int8"):
        apply_precision(model, "fp32")  # never served as anything but what it is
    assert apply_precision(model, "int8") == 0 and precision_of(model) == "int8"


async def _logprobs(engine: Engine, node: str) -> list[float]:
    result = await engine.generate(
        GenerationRequest(node=node, prompt=TEXT, params=SamplingParams(max_new_tokens=0, echo=True, logprobs=True))
    )
    assert result.echo is not None and result.echo.logprobs is not None
    return [t.logprob for t in result.echo.logprobs if t.logprob is not None]


def _perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


@pytest.mark.parametrize("precision", ["bf16", "int8"])
async def test_an_engine_at_lower_precision_scores_close_to_fp32_and_adapters_apply(tiny_base_dir, tree, precision):
    node = f"{tree.name}/en/medical/radiology"
    with Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4)) as full:
        want = await _logprobs(full, node)
        base = await _logprobs(full, tree.name)
    with Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4, precision=precision)) as low:
        assert low.precision == precision
        got = await _logprobs(low, node)
        tokens = (
            await low.generate(GenerationRequest(node=node, prompt=TEXT, params=SamplingParams(ignore_eos=True)))
        ).token_ids
    assert len(got) == len(want) and len(tokens) == 64
    error = max(abs(a - b) for a, b in zip(got, want, strict=True))
    adapter = max(abs(a - b) for a, b in zip(base, want, strict=True))
    assert error < adapter / 4  # the node's adapters still apply, far above the rounding
    assert abs(_perplexity(got) / _perplexity(want) - 1) < (0.005 if precision == "bf16" else 0.02)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
async def test_prefix_cache_and_chunked_prefill_are_exact_within_a_precision(tiny_base_dir, tree, precision):
    node = f"{tree.name}/en/medical"
    requests = [GenerationRequest(node=node, prompt=TEXT + q, params=SamplingParams(max_new_tokens=8)) for q in "ab"]

    async def run(**config) -> list[tuple[int, ...]]:
        with Engine(tiny_base_dir, tree.root, EngineConfig(max_batch_size=4, precision=precision, **config)) as e:
            return [(await e.generate(r)).token_ids for r in requests]

    plain = await run(prefix_cache_bytes=0, prefill_chunk=0)
    assert await run() == plain
    assert await run(prefix_cache_bytes=0, prefill_chunk=16) == plain
