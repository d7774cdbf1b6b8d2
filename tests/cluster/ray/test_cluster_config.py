"""cluster.yaml validation, Ray command lines and state, and the values that cross Ray: no cluster needed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from cluster.errors import ClusterConfigError, ClusterError
from cluster.ray.app import Scaling
from cluster.ray.backend import aggregate
from cluster.ray.board import ReplicaReport
from cluster.ray.config import RayPorts, load_cluster_config, parse_cluster_config
from cluster.ray.runtime import ClusterState, RayProcess, load_state, ray_start_command, save_state
from cluster.ray.wire import TrunkInfo
from cluster.service.quota import TenantQuota
from cluster.service.trunk import CacheSnapshot
from tests.nodes.treefactory import make_random_tree

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def tree_dir(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("cfg") / "rt", tiny_base_dir).root


@pytest.fixture
def doc(tree_dir):
    return {"name": "t", "registry": "sqlite:///registry.db", "trunks": [{"tree": str(tree_dir)}]}


def parse(doc, tmp_path):
    return parse_cluster_config(doc, file="c.yaml", base=tmp_path)


def test_a_minimal_file_gets_explicit_ports_and_safe_defaults(doc, tmp_path):
    config = parse(doc, tmp_path)
    (trunk,) = config.trunks
    assert trunk.tree == "rt" and trunk.min_replicas == trunk.max_replicas == 1 and not trunk.autoscaling
    assert config.registry == f"sqlite:///{tmp_path / 'registry.db'}"  # relative to the file
    ports = config.ray.ports
    used = [
        *ports.node_ports().values(),
        ports.gcs,
        ports.client_server,
        ports.dashboard,
        ports.serve_http,
        ports.serve_grpc,
        config.ingress.port,
    ]
    assert len(set(used)) == len(used) and not {6379, 8265, 8000, 10001} & set(used)
    assert config.ray.auth == "token" and config.ingress.auth and config.ingress.on_head
    assert config.ingress.updates  # the Updates service is on unless the file turns it off
    assert not parse({**doc, "ingress": {"updates": False}}, tmp_path).ingress.updates
    assert config.ingress.http_port == 50080 and config.ingress.http_port not in used  # the OpenAI API, on by default
    assert parse({**doc, "ingress": {"http_port": None}}, tmp_path).ingress.http_port is None  # null: off
    assert parse({**doc, "ingress": {"http_port": 9001}}, tmp_path).ingress.http_port == 9001
    assert config.ingress.variant_cache_bytes == 20 << 30  # built variants kept per tree dir
    assert parse({**doc, "ingress": {"variant_cache": "3GiB"}}, tmp_path).ingress.variant_cache_bytes == 3 << 30
    assert config.ingress.metrics_host == "127.0.0.1"  # /metrics has no token: local unless widened
    assert parse({**doc, "ingress": {"metrics_host": "0.0.0.0"}}, tmp_path).ingress.metrics_host == "0.0.0.0"
    assert config.ingress.refusals_per_s == 20  # as `treelm serve`; 0 turns the refusal penalty off
    assert parse({**doc, "ingress": {"refusals_per_s": 0}}, tmp_path).ingress.refusals_per_s == 0
    quotas = config.ingress.quotas  # the same per-tenant defaults as `treelm serve`
    assert quotas.defaults == TenantQuota(max_running=16, max_queued=64, tokens_per_minute=None) and not quotas.tenants
    (tmp_path / "limits.yaml").write_text("tenants:\n  trial: {tokens_per_minute: 500}\n", encoding="utf-8")
    limited = parse({**doc, "ingress": {"tenant_limits": {"max_queued": 8, "file": "limits.yaml"}}}, tmp_path)
    assert limited.ingress.quotas.for_tenant("trial") == TenantQuota(max_queued=8, tokens_per_minute=500)
    assert limited.ingress.quotas.for_tenant("acme") == TenantQuota(max_queued=8)
    assert trunk.prefill_chunk == 32 and trunk.prefix_cache == 256 << 20  # prompt-prefix reuse: 0 or off turns it off
    assert trunk.tenant_contended_running == 4  # as `treelm serve`; 0 turns the contended share off
    # Every call a replica holds reaches the engine's fair queue (none waits in Serve's FIFO in front).
    assert trunk.max_ongoing_requests == trunk.max_batch + trunk.max_queue == 16 + 256
    small = parse({**doc, "trunks": [{**doc["trunks"][0], "engine": {"max_batch": 8, "max_queue": 32}}]}, tmp_path)
    assert small.trunks[0].max_ongoing_requests == 40
    given = parse({**doc, "trunks": [{**doc["trunks"][0], "max_ongoing_requests": 4}]}, tmp_path)
    assert given.trunks[0].max_ongoing_requests == 4
    off = parse({**doc, "trunks": [{**doc["trunks"][0], "engine": {"tenant_contended_running": 0}}]}, tmp_path)
    assert off.trunks[0].tenant_contended_running is None
    for value, want in (("64MiB", 64 << 20), (0, 0), ("off", 0)):
        changed = copy.deepcopy(doc)
        changed["trunks"][0]["engine"] = {"prefix_cache": value}
        assert parse(changed, tmp_path).trunks[0].prefix_cache == want
    assert trunk.precision == "fp32"  # exact by default; bf16/int8/auto are asked for
    for value in ("bf16", "int8", "auto"):
        changed = copy.deepcopy(doc)
        changed["trunks"][0]["engine"] = {"precision": value}
        assert parse(changed, tmp_path).trunks[0].precision == value


def test_the_examples_are_valid(tree_dir, monkeypatch):
    # The examples serve the demo tree, which exists only once `make demo` has built it:
    # validate them over the test's tree, and check where they point separately.
    def with_tree(path):
        raw = yaml.safe_load(path.read_text())
        assert raw["trunks"][0]["tree"] in ("../demo/build", "build", "examples/demo/build"), raw["trunks"][0]
        raw["trunks"][0]["tree"] = str(tree_dir)
        return parse_cluster_config(raw, file=path.name, base=path.parent)

    one = with_tree(REPO / "examples/cluster/one-machine.yaml")
    assert one.trunks[0].autoscaling and one.trunks[0].resources.memory == 2 << 30
    demo = with_tree(REPO / "examples/demo/cluster.yaml")
    assert demo.trunks[0].tree_dir == tree_dir.resolve()
    multi = yaml.safe_load((REPO / "examples/cluster/multi-machine.yaml").read_text())
    multi["trunks"][0]["tree"] = str(tree_dir)  # its tree lives on the cluster's machines
    monkeypatch.setenv("TREELM_DB_PASSWORD", "s3cret")
    config = parse_cluster_config(multi, file="multi-machine.yaml", base=REPO)
    assert config.registry == "postgresql+psycopg://treelm:s3cret@10.0.0.5:5432/treelm"
    assert config.ingress.host == "0.0.0.0" and not config.ingress.on_head
    monkeypatch.delenv("TREELM_DB_PASSWORD")
    with pytest.raises(ClusterConfigError, match="TREELM_DB_PASSWORD is not set"):
        parse_cluster_config(multi, file="multi-machine.yaml", base=REPO)


@pytest.mark.parametrize(
    "change, field, message",
    [
        (lambda d: d.pop("trunks"), "trunks", "at least one trunk"),
        (lambda d: d["trunks"][0].pop("tree"), "trunks[0].tree", "is required"),
        (lambda d: d["trunks"][0].update(tree="/nonexistent"), "trunks[0].tree", "not a built tree"),
        (lambda d: d["trunks"][0].update(replicas={"min": 3, "max": 2}), "trunks[0].replicas.max", "must be >= min"),
        (lambda d: d["trunks"][0].update(replicas=0), "trunks[0].replicas", ">= 1"),
        (
            lambda d: d["trunks"][0].update(replicas={"min": 1, "max": 2, "initial": 5}),
            "trunks[0].replicas.initial",
            "min..max",
        ),
        (lambda d: d["trunks"][0].update(resources={"memory": "lots"}), "trunks[0].resources.memory", "not a size"),
        (lambda d: d["trunks"][0].update(resources={"cpus": -1}), "trunks[0].resources.cpus", ">= 0"),
        (
            lambda d: d["trunks"][0].update(resources={"custom": {"zone-b": None}}),
            "trunks[0].resources.custom.zone-b",
            "got nothing",
        ),
        (lambda d: d.update(ray={"resources": {"big-box": None}}), "ray.resources.big-box", "got nothing"),
        (lambda d: d["trunks"][0].update(max_adapters=2), "trunks[0].max_adapters", "deepest chain"),
        (lambda d: d["trunks"][0].update(preload=["rt/xx"]), "trunks[0].preload", "not a node"),
        (lambda d: d["trunks"].append(dict(d["trunks"][0])), "trunks[1].tree", "one trunk per tree"),
        (lambda d: d["trunks"][0].update(replica=2), "trunks[0].replica", "unknown key"),
        (
            lambda d: d["trunks"][0].update(engine={"tenant_step_rows": 0}),
            "trunks[0].engine.tenant_step_rows",
            "an integer >= 1",
        ),
        (lambda d: d.update(ingress={"refusals_per_s": -1}), "ingress.refusals_per_s", "an integer >= 0"),
        (
            lambda d: d["trunks"][0].update(engine={"tenant_contended_running": -1}),
            "trunks[0].engine.tenant_contended_running",
            "an integer >= 0",
        ),
        (lambda d: d.update(ray={"ports": {"gcs": 6379}}), "ray.ports.gcs", "Redis"),
        (lambda d: d.update(ray={"ports": {"dashboard": 8265}}), "ray.ports.dashboard", "dashboard"),
        (lambda d: d.update(ray={"ports": {"node_manager": 46383}}), "ray.ports.object_manager", "also"),
        (lambda d: d.update(ray={"ports": {"workers": [1, 2]}}), "ray.ports.workers", "at least 10 ports"),
        (lambda d: d.update(ray={"ports": {"gcs": 46450}}), "ray.ports.gcs", "inside the workers range"),
        (lambda d: d.update(ray={"auth": "maybe"}), "ray.auth", "token, disabled"),
        (lambda d: d.update(ray={"address": "no-port"}), "ray.address", "HOST:PORT"),
        (lambda d: d.update(ingress={"port": 46379}), "ingress.port", "also a Ray port"),
        (lambda d: d.update(ingress={"http_port": 8000}), "ingress.http_port", "Serve's default HTTP port"),
        (lambda d: d.update(ingress={"http_port": 46388}), "ingress.http_port", "also a Ray port"),  # serve_http
        (lambda d: d.update(ingress={"http_port": 46420}), "ingress.http_port", "also a Ray port"),  # a worker's
        (lambda d: d.update(ingress={"http_port": 50051}), "ingress.http_port", "also ingress.port"),
        (lambda d: d.update(ingress={"metrics_port": 50080}), "ingress.metrics_port", "also ingress.http_port"),
        (lambda d: d.update(ingress={"http_port": "8080"}), "ingress.http_port", "an integer"),
        (lambda d: d.update(ingress={"tls_cert": "/x.crt"}), "ingress.tls_cert", "both tls_cert and tls_key"),
        (lambda d: d.update(ingress={"tls_client_ca": "/ca.crt"}), "ingress.tls_client_ca", "need TLS"),
        (lambda d: d.update(ingress={"tls_client_tenants": "/t.yaml"}), "ingress.tls_client_tenants", "tls_client_ca"),
        (
            lambda d: d.update(ingress={"variant_key_password_file": "/p"}),
            "ingress.variant_key_password_file",
            "needs variant_key",
        ),
        (lambda d: d.update(ingress={"on_head": False}), "ingress.on_head", "SQLite"),
        (lambda d: d.update(ingress={"updates": "sometimes"}), "ingress.updates", "must be true or false"),
        (lambda d: d.update(ingress={"variant_key": "/k"}), "ingress.variant_key", "and variant_delegations"),
        (lambda d: d.update(ingress={"variant_delegations": "x"}), "ingress.variant_delegations", "list of file"),
        (lambda d: d.update(ingress={"variant_cache": "big"}), "ingress.variant_cache", "not a size"),
        (lambda d: d["trunks"][0].update(engine={"prefix_cache": "-1GiB"}), "trunks[0].engine.prefix_cache", "size"),
        (lambda d: d["trunks"][0].update(engine={"prefill_chunk": -1}), "trunks[0].engine.prefill_chunk", ">= 0"),
        (lambda d: d["trunks"][0].update(engine={"precision": "fp16"}), "trunks[0].engine.precision", "bf16, int8"),
        (
            lambda d: d.update(ingress={"variant_key": "/nope/k", "variant_delegations": ["/nope/d"]}),
            "ingress.variant_key",
            "does not exist",
        ),
        (lambda d: d.update(ingress={"tenant_limits": {"max_queued": 0}}), "ingress.tenant_limits.max_queued", ">= 1"),
        (lambda d: d.update(ingress={"tenant_limits": {"burst": 3}}), "ingress.tenant_limits.burst", "unknown key"),
        (
            lambda d: d.update(ingress={"tenant_limits": {"file": "/nope.yaml"}}),
            "ingress.tenant_limits.file",
            "cannot read",
        ),
        (lambda d: d.pop("registry"), "registry", "is required"),
        (lambda d: d.update(name="Bad Name"), "name", "lowercase"),
        (lambda d: d.update(trunkz=[]), "trunkz", "unknown key"),
    ],
)
def test_bad_values_name_the_file_and_the_field(doc, tmp_path, change, field, message):
    bad = copy.deepcopy(doc)
    change(bad)
    with pytest.raises(ClusterConfigError) as info:
        parse(bad, tmp_path)
    assert info.value.field == field and info.value.file == "c.yaml"
    assert str(info.value).startswith(f"c.yaml: {field}: ") and message in str(info.value)


def test_unreadable_files_are_errors_too(tmp_path):
    with pytest.raises(ClusterConfigError, match="no such file"):
        load_cluster_config(tmp_path / "none.yaml")
    (tmp_path / "bad.yaml").write_text("trunks: [unclosed")
    with pytest.raises(ClusterConfigError, match="not valid YAML"):
        load_cluster_config(tmp_path / "bad.yaml")


def test_ray_commands_set_every_port_and_block():
    ports = RayPorts()
    head = ray_start_command(ports, Path("/tmp/r"), head=True, num_cpus=4)
    worker = ray_start_command(ports, Path("/tmp/r"), head=False, address="10.0.0.5:46379", resources={"zone-b": 1})
    for cmd in (head, worker):
        assert "--block" in cmd and cmd[cmd.index("--temp-dir") + 1] == "/tmp/r"
        for flag, port in (
            ("--node-manager-port", ports.node_manager),
            ("--object-manager-port", ports.object_manager),
            ("--dashboard-agent-listen-port", ports.dashboard_agent),
            ("--dashboard-agent-grpc-port", ports.dashboard_agent_grpc),
            ("--runtime-env-agent-port", ports.runtime_env_agent),
            ("--metrics-export-port", ports.metrics_export),
            ("--min-worker-port", ports.workers[0]),
            ("--max-worker-port", ports.workers[1]),
        ):
            assert cmd[cmd.index(flag) + 1] == str(port)
        assert not {"6379", "8265", "8000", "10001"} & set(cmd)
    assert head[head.index("--port") + 1] == "46379" and head[head.index("--include-dashboard") + 1] == "false"
    assert head[head.index("--dashboard-port") + 1] == "46381" and "--address" not in head
    assert worker[worker.index("--address") + 1] == "10.0.0.5:46379" and "--head" not in worker
    assert worker[worker.index("--resources") + 1] == '{"zone-b": 1}'


def test_cluster_state_round_trips_and_a_missing_one_says_what_to_do(tmp_path):
    state = ClusterState(
        config_file="/c.yaml",
        name="t",
        gcs_address="10.0.0.5:46379",
        namespace="treelm",
        auth="token",
        token_file="/s/ray_token",
        head=RayProcess(12, "/s/head.log", "/tmp/r"),
        endpoints=("127.0.0.1:50051",),
        overrides={"rt": {"min": 1, "max": 3}},
    )
    save_state(tmp_path, state)
    assert load_state(tmp_path) == state
    with pytest.raises(ClusterError, match="treelm cluster up"):
        load_state(tmp_path / "nowhere")


def test_a_trunk_snapshot_sums_its_replicas():
    info = TrunkInfo(tree="rt", app="a", deployment="Trunk", base_digest="d" * 64, nodes=("rt", "rt/en"), max_batch=16)

    def report(replica, loaded, queue, hits):
        return ReplicaReport(
            trunk="rt",
            replica=replica,
            machine_id="n",
            machine_ip="ip",
            pid=1,
            base_digest="d" * 64,
            loaded=loaded,
            routed=loaded,
            queue_depth=queue,
            running=1,
            ongoing=2,
            in_flight=("r1", "r2"),
            max_batch=16,
            completed=5,
            failed=0,
            requests_per_s=1.0,
            p50_ms=3.0,
            p95_ms=9.0,
            cache=CacheSnapshot(hits=hits, loads=1, active=len(loaded)),
        )

    snap = aggregate(info, [report("a", ("rt/en",), 2, 3), report("b", ("rt/en", "rt/fr"), 1, 4)])
    assert snap.loaded_adapters == ("rt/en", "rt/fr") and snap.queue_depth == 3 and snap.running == 2
    assert snap.max_batch == 32 and snap.cache.hits == 7 and snap.cache.loads == 2 and snap.cache.active == 3
    assert aggregate(info, []).max_batch == 16 and aggregate(info, []).loaded_adapters == ()


def test_scaling_values_are_checked():
    assert Scaling.fixed(2) == Scaling(2, 2) and Scaling(0, 4).as_dict() == {"min": 0, "max": 4}
    for bad in (lambda: Scaling.fixed(0), lambda: Scaling(3, 2), lambda: Scaling(0, 0), lambda: Scaling(-1, 2)):
        with pytest.raises(ClusterError):
            bad()


def test_cli_errors_exit_2_without_a_traceback_and_start_nothing(tmp_path, capsys, tree_dir):
    state = tmp_path / "state"
    assert main(["cluster", "status", "--state-dir", str(state)]) == 2
    assert "treelm cluster up" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"registry": "sqlite:///r.db", "trunks": [{"tree": str(tree_dir), "replicas": 0}]}))
    assert main(["cluster", "up", str(bad), "--state-dir", str(state)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "trunks[0].replicas" in err and "Traceback" not in err and not state.exists()
    for args, message in (
        (["--replicas", "2", "--min", "1"], "not both"),
        (["--min", "1"], "both --min and --max"),
        (["--replicas", "0"], "--replicas must be"),
        (["--min", "3", "--max", "2"], "--max (2)"),
    ):
        assert main(["cluster", "scale", "rt", *args, "--state-dir", str(state)]) == 2
        assert message in " ".join(capsys.readouterr().err.split())
