"""An end device pulls its model through the Ray cluster's ingress: the same Distribution service as a
single process, variants built beside the ingress from the trunks' tree dirs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import treelm
from tests.cluster.grpc_harness import PRIVATE
from treelm._pull import PULL_RECORD, check

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]


def test_a_2gib_cpu_pulls_through_the_ingress_and_generates_the_clusters_tokens(ray_world, tmp_path):
    tokens = ray_world.world.tokens
    prompt = "The patient was admitted with chest pain."
    with treelm.Client(ray_world.target, token=tokens["globex"], timeout=180) as client:
        result = client.pull(
            "rt/en/medical/radiology", out=tmp_path / "rad", hardware="cpu:2GiB", root_keys=[ray_world.root_key]
        )
        assert result.variant == "merged" and result.bytes_transferred == result.bytes_total
        served = client.generate("rt/en/medical/radiology", prompt=prompt, max_new_tokens=12, temperature=0)
        assert not check(client, result.directory).newer
        with pytest.raises(treelm.NodeNotFound):
            client.offer(PRIVATE, "flat")  # the ingress resolves tenants and private nodes first
    ids = ray_world.world.engine.tokenizer(prompt).input_ids
    model = AutoModelForCausalLM.from_pretrained(result.directory).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=len(served.token_ids), do_sample=False, pad_token_id=0)
    assert out[0, len(ids) :].tolist() == list(served.token_ids)
    assert json.loads((result.directory / PULL_RECORD).read_text())["node"] == "rt/en/medical/radiology"


def test_the_second_trunks_tree_has_its_own_delegation(ray_world, tmp_path):
    with treelm.Client(ray_world.target, token=ray_world.world.tokens["acme"], timeout=180) as client:
        result = client.pull(
            "kb/de/law/tax", variant="gguf-lora", out=tmp_path / "tax", hardware=None, root_keys=[ray_world.root_key]
        )
    assert result.base_dir is not None and any(p.suffix == ".gguf" for p in result.base_dir.iterdir())
    assert len([p for p in result.directory.iterdir() if p.name.endswith("LoRA-F32.gguf")]) == 3


def test_the_ingress_serves_the_download_api_over_http_too(ray_world):
    import hashlib
    import urllib.parse

    from tests.cluster.http_harness import call

    token = ray_world.world.tokens["globex"]
    query = urllib.parse.urlencode({"node": "rt/en/medical/radiology", "variant": "merged"})
    offer = call(ray_world.http_url, "GET", f"/distribution/offer?{query}", token=token)
    assert offer.status == 200, offer.body
    entry = max(offer.json()["files"], key=lambda f: f["size"])
    path = entry["url"].removeprefix("/v1")
    head = call(ray_world.http_url, "GET", path, token=token, headers={"Range": "bytes=0-999"})
    rest = call(ray_world.http_url, "GET", path, token=token, headers={"Range": "bytes=1000-"})
    assert (head.status, rest.status) == (206, 206) and len(rest.body) == entry["size"] - 1000
    assert hashlib.sha256(head.body + rest.body).hexdigest() == entry["sha256"]
    hidden = call(ray_world.http_url, "GET", f"/distribution/offer?node={PRIVATE}&variant=flat", token=token)
    assert hidden.status == 404
