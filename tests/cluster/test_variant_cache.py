"""The server's cache of built variants stays under its bound: least recently used variants are
evicted after a build, and an evicted variant is rebuilt (same key, same files) when asked again."""

from __future__ import annotations

import pytest

from cluster.errors import ServeError
from cluster.service.distribution import Distributor
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.variants import parse_variant_manifest
from nodes.build.variants import VariantStore
from tests.cluster.grpc_harness import distribution_for, make_world, serve
from treelm import Client, NodeNotFound
from treelm._pull import pull

A, B = "rt/en/medical/radiology", "rt/en/legal"
KIND = "merged-bf16"


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("variant-cache")
    w = make_world(tiny_base_dir, root)
    distributor, root_fp = distribution_for(w)
    server = serve(w, distribution=distributor)
    w.distributor, w.root_fp, w.server = distributor, root_fp, server  # type: ignore[attr-defined]
    yield w
    server.stop()
    w.engine.close()
    w.registry.close()


def offered(c: Client, node: str):
    return parse_variant_manifest(Envelope.from_bytes(c.offer(node, KIND).manifest).payload)


def test_the_cache_stays_under_its_bound_and_an_evicted_variant_is_rebuilt(world, tmp_path):
    store = VariantStore(world.tree.root)
    with Client(world.server.target, token=world.tokens["globex"], timeout=120) as c:
        first = offered(c, A)
        bound = store.size() + first.size // 2  # room for A, not for A and B
        world.distributor.cache_bytes = bound
        second = offered(c, B)  # built: A, used longest ago, goes
        assert {x.key for x in store.artifacts()} == {second.key}
        assert store.size() <= bound
        with pytest.raises(NodeNotFound):  # a download of the evicted variant: as if never built
            list(c.download(A, first.key, first.files[0].name))
        again = offered(c, A)  # rebuilt under the same key, with the same files; B goes
        assert (again.key, again.files) == (first.key, first.files)
        assert {x.key for x in store.artifacts()} == {first.key} and store.size() <= bound
        result = pull(c, A, variant=KIND, out=tmp_path / "a", hardware=None, root_keys=[world.root_fp])
        assert result.key == first.key and result.bytes_transferred == result.bytes_total
    world.distributor.cache_bytes = 20 << 30


def test_the_bound_must_be_a_positive_size(world, tmp_path):
    from cluster.service.standalone import StandaloneOptions

    with pytest.raises(ServeError, match="more than 0 bytes"):
        Distributor({}, world.catalog(), world.distributor.signing, cache_bytes=0)
    with pytest.raises(ServeError, match="--variant-cache 'big' is not a size"):
        StandaloneOptions(tmp_path, variant_cache="big")
