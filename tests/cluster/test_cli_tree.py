"""`treelm tree validate|show` and `treelm base tiny` through the real console script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TREELM = [sys.executable, "-m", "cluster.cli"]


def run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([*TREELM, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_demo_tree_validates_and_shows_as_json():
    ok = run("tree", "validate", "examples/demo/tree.yaml")
    assert ok.returncode == 0, ok.stderr
    shown = run("tree", "show", "examples/demo/tree.yaml", "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert data["name"] == "demo"
    ids = {n["id"]: n for n in data["nodes"]}
    assert ids["demo"]["parent"] is None and ids["demo"]["level"] == "base"
    assert ids["demo/en/medical/radiology"]["parent"] == "demo/en/medical"
    assert ids["demo/en/medical/radiology"]["level"] == "subdomain"
    assert {"id", "path", "level", "parent"} <= set(ids["demo/en"])


def test_show_renders_a_tree():
    shown = run("tree", "show", "examples/demo/tree.yaml")
    assert shown.returncode == 0
    assert "radiology" in shown.stdout and "private" in shown.stdout


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("name: demo\nbase: {model: tiny\n", "malformed YAML"),
        ("name: demo\nbase: tiny\nnodes:\n  en/medical: {level: domain}\n", "missing parent node 'en'"),
        ("name: demo\nbase: tiny\nnodes:\n  x: {level: domain}\n  x/y: {level: language}\n", "must be deeper"),
        ("name: demo\nbase: tiny\nnodes:\n  x: {level: domain, train: nope.txt}\n", "data file not found"),
        ("name: demo\nbase: tiny\nnodes:\n  x: {level: domain, lora: {r: 0}}\n", "r must be a positive"),
        ("name: demo\nbase: tiny\nnodes:\n  x: {level: domain, lora: {alpha: 0}}\n", "alpha must be a positive"),
        ("name: demo\nbase: tiny\nnodes:\n  x: {level: domain, lora: {target_modules: [qkv]}}\n", "qkv"),
    ],
)
def test_bad_specs_exit_2_without_traceback(tmp_path, text, fragment):
    spec = tmp_path / "tree.yaml"
    spec.write_text(text)
    for cmd in (("tree", "validate", str(spec)), ("tree", "show", str(spec), "--json")):
        proc = run(*cmd)
        assert proc.returncode == 2, proc
        assert fragment in proc.stderr
        assert "Traceback" not in proc.stderr + proc.stdout
        assert str(spec) in proc.stderr  # the problem names the file


def test_base_tiny_writes_a_stock_loadable_model(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the heart pumps blood through the arteries and veins. " * 50)
    proc = run(
        "base", "tiny", str(tmp_path / "tiny"), "--hidden", "32", "--layers", "1", "--vocab", "320", "--text", str(text)
    )
    assert proc.returncode == 0, proc.stderr
    check = (
        "import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'tiny')!r}, local_files_only=True);"
        f"t = AutoTokenizer.from_pretrained({str(tmp_path / 'tiny')!r}, local_files_only=True);"
        "ids = t('the heart pumps', return_tensors='pt').input_ids;"
        "out = m(input_ids=ids).logits; assert out.shape[-1] == 320, out.shape;"
        "assert t.decode(ids[0]) == 'the heart pumps'; print('ok')"
    )
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0 and "ok" in loaded.stdout, loaded.stderr


def test_base_tiny_rejects_bad_sizes(tmp_path):
    proc = run("base", "tiny", str(tmp_path / "t"), "--hidden", "30", "--heads", "4")
    assert proc.returncode == 2 and "divisible" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "t").exists()
