"""The upload limits as operators set them: `treelm serve --upload-*` and the Ray ingress's
``upload_*`` keys in cluster.yaml, with documented defaults and clear refusals of bad values."""

from __future__ import annotations

import pytest

from cluster.cli import main
from cluster.errors import ClusterConfigError, ServeError
from cluster.ray.config import parse_cluster_config
from cluster.service.uploads import UploadLimits, upload_limits
from tests.nodes.treefactory import make_random_tree

MIB = 1 << 20


@pytest.fixture(scope="module")
def tree_dir(tiny_base_dir, tmp_path_factory):
    return make_random_tree(tmp_path_factory.mktemp("upload-cfg") / "rt", tiny_base_dir).root


def test_the_defaults_and_the_cli_spelling():
    assert UploadLimits() == UploadLimits(
        max_file_bytes=256 * MIB, max_spool_bytes=1024 * MIB, per_tenant=2, idle_s=30.0
    )
    assert upload_limits("8MiB", "2GiB", 3, 5) == UploadLimits(8 * MIB, 2048 * MIB, 3, 5.0)
    with pytest.raises(ServeError, match="upload max file 'big' is not a size"):
        upload_limits("big", "1GiB", 2, 30)
    with pytest.raises(ServeError, match="per-tenant must be an integer >= 1"):
        UploadLimits(per_tenant=0)
    with pytest.raises(ServeError, match="idle timeout must be > 0"):
        UploadLimits(idle_s=0)


def test_treelm_serve_refuses_a_bad_upload_limit_before_serving(tree_dir, capsys):
    assert main(["serve", str(tree_dir), "--upload-spool", "lots"]) == 2
    assert "upload spool 'lots' is not a size" in capsys.readouterr().err


def test_the_ray_ingress_reads_its_upload_keys(tree_dir, tmp_path):
    doc = {"name": "t", "registry": "sqlite:///registry.db", "trunks": [{"tree": str(tree_dir)}]}
    ingress = parse_cluster_config(doc, file="c.yaml", base=tmp_path).ingress
    assert (ingress.upload_max_file_bytes, ingress.upload_spool_bytes) == (256 * MIB, 1024 * MIB)
    assert (ingress.upload_per_tenant, ingress.upload_idle_s) == (2, 30.0)
    keys = {"upload_max_file": "16MiB", "upload_spool": "128MiB", "upload_per_tenant": 4, "upload_idle_s": 5}
    ingress = parse_cluster_config({**doc, "ingress": keys}, file="c.yaml", base=tmp_path).ingress
    assert (ingress.upload_max_file_bytes, ingress.upload_spool_bytes) == (16 * MIB, 128 * MIB)
    assert (ingress.upload_per_tenant, ingress.upload_idle_s) == (4, 5.0)
    for key, value, message in [
        ("upload_spool", "lots", "not a size"),
        ("upload_per_tenant", 0, "an integer >= 1"),
        ("upload_idle_s", 0, "a number > 0"),
    ]:
        with pytest.raises(ClusterConfigError, match=message) as info:
            parse_cluster_config({**doc, "ingress": {key: value}}, file="c.yaml", base=tmp_path)
        assert f"ingress.{key}" in str(info.value)
