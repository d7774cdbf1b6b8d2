"""One real Ray cluster for every Ray test of the session, started and stopped through `treelm cluster`.

Ray gets explicit ports from a free block (never 6379, 8265 or 8000), token
auth, and a temp dir of its own; teardown runs `treelm cluster down` (Serve's
applications deleted, the `ray start` we started stopped by pid) and stops any
extra node a test started.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from cluster.updates.keys import register_key, write_key_files
from hierarchy.updates.distribution import SignerDelegation, sign_delegation
from hierarchy.updates.keys import SigningKey
from nodes.base.model import TinyBaseConfig, make_tiny_base
from registry.access import create_tenant
from tests.cluster.grpc_harness import make_world
from tests.cluster.jobs_world import CUSTOMIZE
from tests.cluster.ray.cluster_harness import KB_SPEC, RayWorld, cluster_yaml, free_port_block
from tests.nodes.treefactory import RandomTreeSpec, make_random_tree


@pytest.fixture(scope="session")
def ray_world(tiny_base_dir, tmp_path_factory):
    from cluster.ray.runtime import connect, load_state
    from cluster.tree_import import import_tree

    root = tmp_path_factory.mktemp("ray-cluster")
    world = make_world(tiny_base_dir, root)  # tree rt over the session base, registry, tenants acme + globex
    long_base = make_tiny_base(
        root / "long-base",
        TinyBaseConfig(hidden=48, layers=2, vocab=400, heads=4, kv_heads=2, max_position=8192, seed=1),
    )
    kb = make_random_tree(root / "kb", long_base, KB_SPEC)
    # A tree the registry knows but the cluster does not serve.
    import_tree(world.registry, make_random_tree(root / "zz", tiny_base_dir, RandomTreeSpec(name="zz")).root)
    # Variants for devices: a root key in the registry and a variant key it delegates, per tree.
    root_key, variant_key = SigningKey.generate(), SigningKey.generate()
    register_key(world.registry, root_key, "root")
    keys = write_key_files(root / "keys" / "variants", variant_key)
    delegations = []
    for tree in (world.tree.name, kb.name):
        envelope = sign_delegation(SignerDelegation(tree, (variant_key.public,)), [root_key])
        delegations.append(root / "keys" / f"{tree}.dsse")
        delegations[-1].write_bytes(envelope.to_bytes())
    # Fine-tuning jobs on rt (test_ray_customize.py): a role-wide node key the registry trusts signs
    # the nodes the desk's runner makes; each job is a Ray task of one CPU.
    service = SigningKey.generate()
    register_key(world.registry, service, "node", signers=[root_key])
    service_dir = write_key_files(root / "keys" / "service", service).private.parent
    policy = world.tree.root / "update-policy.yaml"
    customize = {"key": str(service_dir), **CUSTOMIZE}
    existing = yaml.safe_load(policy.read_text()) if policy.is_file() else {}
    policy.write_text(yaml.safe_dump({**(existing or {}), "customize": customize}))
    # Tenant "flood" gets tiny limits (test_fair_ray.py): its replica refuses it first.
    create_tenant(world.registry, "flood")
    limits = root / "tenant-limits.yaml"
    limits.write_text("tenants:\n  flood: {max_running: 1, max_queued: 1}\n", encoding="utf-8")
    base = free_port_block()
    temp_dir = Path(tempfile.mkdtemp(prefix="tl-ray-"))  # short: Ray's socket paths must stay under 108 bytes
    config = cluster_yaml(
        root / "cluster.yaml",
        base=base,
        registry_url=world.db_url,
        temp_dir=temp_dir,
        trees={
            # A small max_ongoing_requests: a busy replica spills requests to others sooner (see test_ray_serving).
            world.tree.root: {
                "replicas": 1,
                "max_adapters": 8,
                "max_ongoing_requests": 4,
                "resources": {"cpus": 0.5},
                "health_check_period_s": 1,
            },
            kb.root: {"replicas": 1, "max_adapters": 3, "resources": {"cpus": 0.5}, "health_check_period_s": 1},
        },
        ingress={
            "variant_key": str(keys.private),
            "variant_delegations": [str(d) for d in delegations],
            "tenant_limits": {"file": str(limits)},
        },
    )
    rw = RayWorld(
        world=world,
        kb_tree=kb,
        config=config,
        state_dir=root / "state",
        base=base,
        target=f"127.0.0.1:{base + 20}",
        temp_dir=temp_dir,
        http_url=f"http://127.0.0.1:{base + 22}/v1",
        root_key=root_key.keyid,
    )
    try:
        assert rw.cli("up", str(config), "--timeout", "240") == 0, "treelm cluster up failed (see the output above)"
        connect(load_state(rw.state_dir))  # the test process stays a driver (kills, the board, Serve details)
        yield rw
    finally:
        rw.stop_extra_nodes()
        if (rw.state_dir / "state.json").exists():
            rw.cli("down")
        world.engine.close()
        world.registry.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(str(temp_dir) + "-w", ignore_errors=True)


@pytest.fixture(scope="session")
def kb_engine(ray_world):
    """A local engine over trunk kb's tree: the tokens its replicas must produce."""
    from nodes.runtime.engine import Engine, EngineConfig

    engine = Engine(ray_world.kb_tree.base_dir, ray_world.kb_tree.root, EngineConfig(max_batch_size=8))
    yield engine
    engine.close()
