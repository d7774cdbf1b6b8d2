"""`treelm registry match` defaults, through the registry's own typer app: the issue's two examples."""

from __future__ import annotations

import json
from dataclasses import replace

from typer.testing import CliRunner

from registry import register_tree
from registry.cli import registry_app
from tests.registry.helpers import demo_tree, smollm2_base


def run(db_url: str, *args: str):
    result = CliRunner().invoke(registry_app, ["--db", db_url, "match", *args], env={"COLUMNS": "250"})
    return result.exit_code, result.output


def test_match_without_a_context_fits_a_model_whose_limit_is_512(reg, db_url):
    register_tree(reg, demo_tree(base=replace(smollm2_base(), max_context=512)))
    code, out = run(db_url, "--task", "en/medical/radiology", "--device", "cpu", "--memory", "8GiB", "--json")
    assert code == 0, out
    best = json.loads(out)["candidates"][0]
    assert best["node"] == "demo/en/medical/radiology"
    assert any("context 512: the limit of base" in r for r in best["reasons"])
    code, out = run(db_url, "--task", "en/medical/radiology", "--memory", "8GiB", "--context", "2048")
    assert code == 0 and "nothing fits this device locally" in out and "exceeds the maximum context 512" in out


def test_match_finds_a_node_by_the_attributes_it_declares(reg, db_url):
    nodes = {
        "en": ("language", "en", None, None, (), "public", None, 20.0),
        "en/med": ("domain", "en", "medical", None, (), "public", None, 12.0),
        "en/med/radio": ("subdomain", "en", "medical", "radiology", (), "public", None, 8.0),
    }
    register_tree(reg, demo_tree(nodes=nodes))
    code, out = run(db_url, "--task", "en/medical/radiology", "--device", "cpu", "--memory", "8GiB")
    assert code == 0, out
    assert "best: demo/en/med/radio v1" in out and "exact match for task en/medical/radiology" in out
