"""Sizes, KV-cache bytes, memory estimates, fit bands and speed: golden figures and boundaries."""

from __future__ import annotations

import pytest

from registry import InvalidHardware, InvalidMemorySize, classify_fit, estimate_memory, kv_bytes_per_token
from registry.memory import (
    RUNTIME_OVERHEAD,
    estimate_speed,
    max_context_that_fits,
    parse_bandwidth,
    parse_compute,
    parse_memory_size,
    weight_bytes,
)
from tests.registry.helpers import smollm2_base


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512MiB", 512 * 2**20),
        ("8GiB", 8 * 2**30),
        ("8GB", 8 * 10**9),
        ("8gb", 8 * 10**9),
        ("1.5 GiB", 3 * 2**29),
        ("64KiB", 65536),
        ("100B", 100),
        ("2TB", 2 * 10**12),
    ],
)
def test_memory_sizes_parse(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["eight gigs", "-1GiB", "0GiB", "8", "GiB", "8 GiBs", "8G", "1e9B", "", "8GiB8"])
def test_bad_memory_sizes_name_the_field(text):
    with pytest.raises(InvalidMemorySize) as info:
        parse_memory_size(text)
    assert info.value.field == "memory"


def test_bandwidth_and_compute_parse():
    assert parse_bandwidth("50GB/s") == 50e9
    assert parse_bandwidth("100GiB/s") == 100 * 2**30
    assert parse_compute("10TFLOPS") == 10e12
    with pytest.raises(InvalidHardware):
        parse_bandwidth("fast")
    with pytest.raises(InvalidHardware):
        parse_compute("-3TFLOPS")


def test_golden_kv_bytes_smollm2_135m():
    # 30 layers, 3 KV heads, head dim 64: K and V, 2 bytes each in fp16.
    base = smollm2_base()
    assert kv_bytes_per_token(base, "float16") == 2 * 30 * 3 * 64 * 2 == 23_040
    assert kv_bytes_per_token(base, "float32") == 46_080
    estimate = estimate_memory(base, "merged", 0, device="cuda", dtype="float16", context=2048, batch=4)
    assert estimate.kv_cache == 23_040 * 2048 * 4 == 188_743_680
    assert estimate.weights == 134_515_008 * 2


def test_estimate_is_the_sum_of_its_parts():
    base = smollm2_base()
    e = estimate_memory(base, "chain", 1_000_000, device="cpu", dtype="float32", context=1024, batch=2)
    assert e.weights == base.parameter_count * 4
    assert e.adapters == 1_000_000 * 4
    assert e.kv_cache == kv_bytes_per_token(base, "float32") * 1024 * 2
    assert e.overhead == RUNTIME_OVERHEAD["cpu"] + (e.weights + e.adapters) // 10
    assert e.total == e.weights + e.adapters + e.kv_cache + e.overhead
    merged = estimate_memory(base, "merged", 1_000_000, device="cpu", dtype="float32", context=1024, batch=2)
    assert merged.adapters == 0  # merged variants carry no adapters
    int8 = estimate_memory(base, "merged-int8", 0, device="cpu", dtype="float32", context=1024, batch=2)
    assert int8.weights == weight_bytes(base, "merged-int8", "float32")
    assert int8.total < merged.total


def test_every_variant_kind_keeps_its_own_number_format():
    base = smollm2_base()  # 134,515,008 parameters, 106,168,320 of them in linear layers
    n, q = base.parameter_count, base.quantizable_parameter_count

    def weights(kind, dtype="float32"):
        return weight_bytes(base, kind, dtype)

    assert weights("merged") == weights("flat") == weights("chain") == n * 4
    assert weights("merged", "float16") == n * 2
    assert weights("merged-fp16") == weights("merged-bf16") == weights("gguf-f16") == weights("gguf-lora") == n * 2
    assert weights("merged-int8") == -(-n * 34 // 32)  # Q8_0: 34 bytes per block of 32, embeddings too
    assert weights("gguf-q4_0") == -(-q * 18 // 32) + -(-(n - q) * 34 // 32)  # Q4_0 linears, Q8_0 embeddings
    lora = estimate_memory(base, "gguf-lora", 1_000, device="cpu", dtype="float32", context=16, batch=1)
    assert lora.adapters == 4_000  # LoRA GGUF files are float32
    assert estimate_memory(base, "gguf-q4_0", 1_000, device="cpu", dtype="float32", context=16, batch=1).adapters == 0


@pytest.mark.parametrize(
    "percent_used, band",
    [(59, "perfect"), (60, "perfect"), (61, "good"), (85, "good"), (86, "marginal"), (98, "marginal"), (99, None)],
)
def test_fit_bands_at_their_edges(percent_used, band):
    available = 1_000_000
    assert classify_fit(available * percent_used // 100, available) == band


def test_fit_band_edges_are_exact_to_the_byte():
    available = 8 * 2**30
    edge = available * 60 // 100  # exactly 60%
    assert classify_fit(edge, available) == "perfect"
    assert classify_fit(edge + 1, available) == "good"
    assert classify_fit(available * 85 // 100 + 1, available) == "marginal"
    assert classify_fit(available * 98 // 100 + 1, available) is None


def test_max_context_that_fits_is_the_exact_limit():
    base = smollm2_base()
    memory = 2 * 2**30
    e = estimate_memory(base, "merged", 0, device="cpu", dtype="float32", context=1, batch=3)
    limit = max_context_that_fits(e, memory)
    at = estimate_memory(base, "merged", 0, device="cpu", dtype="float32", context=limit, batch=3)
    over = estimate_memory(base, "merged", 0, device="cpu", dtype="float32", context=limit + 1, batch=3)
    assert classify_fit(at.total, memory) == "marginal"
    assert classify_fit(over.total, memory) is None


def test_speed_is_bandwidth_over_bytes_read_and_capped_by_compute():
    base = smollm2_base()
    e = estimate_memory(base, "merged", 0, device="cuda", dtype="float16", context=2048, batch=1)
    tps = estimate_speed(e, parameters=base.parameter_count, bandwidth=100e9)
    assert tps == pytest.approx(100e9 / (e.weights + e.kv_cache))
    capped = estimate_speed(e, parameters=base.parameter_count, bandwidth=100e9, compute=1e9)
    assert capped == pytest.approx(1e9 / (2 * base.parameter_count))
    assert estimate_speed(e, parameters=base.parameter_count, bandwidth=None) is None


def test_reasons_name_the_format_the_weights_are_held_in():
    from registry.memory import weights_format

    assert weights_format("merged-int8", "float32") == "GGUF Q8_0"
    assert weights_format("merged", "float16") == "float16" and weights_format("chain", "float32") == "float32"
