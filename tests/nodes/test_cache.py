"""The tiered adapter cache: tiers, LRU by bytes, pinning, sha256 verification, counters."""

from __future__ import annotations

import pytest

from nodes.base.model import load_base
from nodes.errors import CacheFull, IntegrityError
from nodes.runtime.bank import AdapterBank, prepare_adapter
from nodes.runtime.cache import AdapterCache
from nodes.store.adapters import read_adapter
from tests.nodes.treefactory import RandomNode, RandomTreeSpec, make_random_tree


@pytest.fixture(scope="module")
def base(tiny_base_dir):
    return load_base(tiny_base_dir)


@pytest.fixture
def world(tiny_base_dir, tmp_path, base):
    tree = make_random_tree(tmp_path / "tree", tiny_base_dir)
    bank = AdapterBank(base.model)
    yield tree, bank
    bank.unwrap()


def chain(tree, path):
    return tree.chain(f"{tree.name}/{path}")


def corrupt(node) -> None:
    file = node.directory / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last weight changes; the file still parses
    file.write_bytes(bytes(data))


def adapter_bytes(tree, bank, path) -> int:
    return prepare_adapter(
        path, read_adapter(tree.node(f"{tree.name}/{path}").directory), bank.shapes, bank.dtype
    ).nbytes


def test_tiers_move_adapters_and_count_it(world):
    tree, bank = world
    cache = AdapterCache(bank, max_active=3, host_bytes=10**9)
    keys = cache.acquire(chain(tree, "en/medical/radiology"))
    assert keys == ("en", "en/medical", "en/medical/radiology")
    assert all(cache.tier_of(k) == "active" and k in bank for k in keys)
    assert cache.stats().loads == 3 and cache.stats().pinned == 3
    cache.release(keys)
    assert cache.stats().pinned == 0

    # A chain of two more adapters evicts the two least recently used ones to host memory.
    cache.acquire(chain(tree, "fr/medical"))
    s = cache.stats()
    assert (s.active, s.host, s.evictions_active, s.loads) == (3, 2, 2, 5)
    assert cache.tier_of("en") == "host" and cache.tier_of("en/medical") == "host"
    assert cache.tier_of("en/medical/radiology") == "active" and "en" not in bank
    assert s.host_bytes == adapter_bytes(tree, bank, "en") + adapter_bytes(tree, bank, "en/medical")
    assert s.active_bytes == bank.nbytes

    # Coming back from host memory reads no file.
    cache.release(("fr", "fr/medical"))
    cache.acquire(chain(tree, "en/medical"))
    s = cache.stats()
    assert (s.hits_host, s.loads) == (2, 5)
    assert cache.tier_of("en") == "active" and cache.tier_of("fr") == "host"


def test_host_memory_is_bounded_by_bytes_least_recently_used_first(world):
    tree, bank = world
    cache = AdapterCache(bank, max_active=1, host_bytes=0)
    for path in ("en", "fr", "en"):
        cache.release(cache.acquire(chain(tree, path)))
    s = cache.stats()
    # With no host budget every eviction drops to disk, so "en" is read (and verified) twice.
    assert (s.loads, s.evictions_active, s.evictions_host, s.host, s.host_bytes) == (3, 2, 2, 0, 0)


def test_host_lru_drops_the_least_recently_used_first(tiny_base_dir, tmp_path, base):
    spec = RandomTreeSpec(name="flat", nodes=tuple(RandomNode(p, r=2) for p in ("a", "b", "c", "d")))
    tree = make_random_tree(tmp_path / "flat", tiny_base_dir, spec)
    bank = AdapterBank(base.model)
    try:
        size = adapter_bytes(tree, bank, "a")
        cache = AdapterCache(bank, max_active=1, host_bytes=2 * size)  # room for two in host memory
        for path in ("a", "b", "c", "a", "d"):
            cache.release(cache.acquire(chain(tree, path)))
        # When d arrives, host memory holds b, c and a: b, the least recently used, is dropped.
        s = cache.stats()
        assert [cache.tier_of(k) for k in "abcd"] == ["host", "disk", "host", "active"]
        assert s.host_bytes == 2 * size and s.evictions_host == 1 and s.hits_host == 1 and s.loads == 4
    finally:
        bank.unwrap()


def test_pinned_adapters_are_never_evicted(world):
    tree, bank = world
    cache = AdapterCache(bank, max_active=4, host_bytes=10**9)
    held = cache.acquire(chain(tree, "en/medical/radiology"))  # 3 pinned
    with pytest.raises(CacheFull):
        cache.acquire(chain(tree, "fr/medical"))  # needs 2 slots, only 1 is free
    s = cache.stats()
    assert s.pinned == 3 and s.active == 3 and all(cache.tier_of(k) == "active" for k in held)
    assert cache.pinned("fr") == 0 and cache.tier_of("fr") == "disk"
    # Sharing is fine: a sibling needs one new slot, and its ancestors are pinned twice.
    sibling = cache.acquire(chain(tree, "en/medical/cardiology"))
    assert cache.pinned("en") == 2 and cache.pinned("en/medical/cardiology") == 1
    cache.release(held)
    assert cache.pinned("en") == 1 and cache.pinned("en/medical/radiology") == 0
    cache.release(sibling)
    cache.acquire(chain(tree, "fr/medical"))  # now radiology and cardiology can make room
    assert cache.tier_of("en/medical/radiology") == "host"


def test_a_changed_adapter_file_is_refused_before_use(world):
    tree, bank = world
    cache = AdapterCache(bank, max_active=8, host_bytes=10**9)
    corrupt(tree.node(f"{tree.name}/en/medical"))
    with pytest.raises(IntegrityError, match="changed on disk"):
        cache.acquire(chain(tree, "en/medical/radiology"))
    s = cache.stats()
    assert s.integrity_failures == 1 and s.pinned == 0 and "en/medical" not in bank
    assert cache.tier_of("en/medical/radiology") == "disk"
    # Other chains are unaffected (the verified parent "en" stays usable).
    assert cache.acquire(chain(tree, "en/legal/contracts")) == ("en", "en/legal", "en/legal/contracts")
    assert cache.stats().hits_active >= 1


def test_a_verified_copy_is_used_until_evicted_then_reverified(world):
    tree, bank = world
    cache = AdapterCache(bank, max_active=1, host_bytes=0)
    cache.release(cache.acquire(chain(tree, "fr")))
    cache.release(cache.acquire(chain(tree, "en")))  # "fr" is evicted and dropped (no host budget)
    corrupt(tree.node(f"{tree.name}/fr"))
    with pytest.raises(IntegrityError):
        cache.acquire(chain(tree, "fr"))
    assert cache.stats().integrity_failures == 1 and cache.tier_of("en") == "active"


def slow_reads(monkeypatch, seconds: dict[str, float]) -> None:
    """Make reading a node's adapter take at least ``seconds[node path]`` (a slow disk)."""
    import time

    import nodes.runtime.cache as cache_module

    real = cache_module.read_adapter

    def read(directory, **kw):
        time.sleep(next((s for path, s in seconds.items() if directory.as_posix().endswith(f"/nodes/{path}")), 0.0))
        return real(directory, **kw)

    monkeypatch.setattr(cache_module, "read_adapter", read)


def test_disk_loads_are_timed_and_hits_are_not(world, monkeypatch):
    tree, bank = world
    slow_reads(monkeypatch, {"en": 0.02, "en/medical": 0.02, "en/medical/radiology": 0.02, "fr": 0.2})
    cache = AdapterCache(bank, max_active=3, host_bytes=10**9)
    assert (cache.stats().load_p50_s, cache.stats().load_p99_s, cache.stats().load_seconds) == (0.0, 0.0, 0.0)
    cache.release(cache.acquire(chain(tree, "en/medical/radiology")))  # three loads of >= 20 ms
    cache.release(cache.acquire(chain(tree, "fr")))  # one of >= 200 ms; "en" goes to host memory
    s = cache.stats()
    assert s.loads == 4 and 0.02 <= s.load_p50_s < 0.2 <= s.load_p99_s
    assert s.load_seconds >= 0.26
    cache.release(cache.acquire(chain(tree, "en/medical")))  # from host memory and the bank: no disk
    after = cache.stats()
    assert (after.hits_host, after.loads, after.load_seconds) == (1, 4, s.load_seconds)
    assert after.as_dict()["load_p99_s"] == s.load_p99_s


def test_load_percentiles_cover_only_the_most_recent_loads(world, monkeypatch):
    import nodes.runtime.cache as cache_module

    tree, bank = world
    monkeypatch.setattr(cache_module, "LOAD_WINDOW", 2)
    slow_reads(monkeypatch, {"en": 0.2, "fr": 0.2})
    cache = AdapterCache(bank, max_active=3, host_bytes=0)
    for path in ("en", "fr", "en/legal", "en/medical"):  # two slow loads, then two fast ones
        cache.release(cache.acquire(chain(tree, path)))
    s = cache.stats()
    assert s.loads == 4 and s.load_p99_s < 0.2  # the window forgot the slow ones ...
    assert s.load_seconds >= 0.4  # ... the total did not
