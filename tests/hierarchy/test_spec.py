"""Tree spec parsing and validation: every problem is found and located."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hierarchy import Level, SpecError, load_spec

GOOD = """
name: demo
base:
  model: tiny
nodes:
  en:
    level: language
    language: en
    train: data/en.txt
    lora: {r: 8, alpha: 16, target_modules: [q_proj, v_proj]}
  en/medical:
    level: domain
    domain: medical
  en/medical/radiology:
    level: subdomain
    subdomain: radiology
    visibility: private
    owner: st-marys
  code:
    level: domain
    domain: code
"""


def write(tmp_path: Path, text: str, files: tuple[str, ...] = ("data/en.txt",)) -> Path:
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("hello world\n")
    spec = tmp_path / "tree.yaml"
    spec.write_text(textwrap.dedent(text))
    return spec


def problems(tmp_path: Path, text: str, files=("data/en.txt",)):
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text, files))
    return info.value.problems


def test_good_spec_parses_parents_first_with_inheritance(tmp_path):
    tree = load_spec(write(tmp_path, GOOD))
    assert tree.name == "demo"
    assert [str(n.path) for n in tree.nodes] == ["code", "en", "en/medical", "en/medical/radiology"]
    rad = tree.node("en/medical/radiology")
    assert rad.level is Level.SUBDOMAIN
    assert (rad.language, rad.domain, rad.subdomain) == ("en", "medical", "radiology")  # inherited
    assert rad.is_private and rad.owner == "st-marys"
    assert tree.node("en").train == (tmp_path / "data/en.txt").resolve()  # relative to the spec's folder
    assert tree.node("en").lora.scale == 2.0
    assert [str(n.path) for n in tree.chain("en/medical/radiology")] == ["en", "en/medical", "en/medical/radiology"]
    js = tree.to_json()
    assert js["nodes"][0] == {"id": "demo", "path": "", "level": "base", "parent": None}
    assert {"id": "demo/en/medical", "parent": "demo/en"}.items() <= js["nodes"][3].items()


def test_defaults_apply_and_node_overrides(tmp_path):
    spec = GOOD.replace("nodes:", "defaults:\n  lora: {r: 4, alpha: 4}\n  training: {steps: 7}\nnodes:", 1)
    tree = load_spec(write(tmp_path, spec))
    assert tree.node("en").lora.r == 8 and tree.node("en/medical").lora.r == 4
    assert tree.node("code").training.steps == 7


CASES = [
    # (description, mutation of GOOD, expected (node, field, message fragment))
    ("unknown top key", lambda s: s + "colour: blue\n", (None, "colour", "unknown key")),
    (
        "unknown node key",
        lambda s: s.replace("domain: medical", "domain: medical\n    size: big"),
        ("en/medical", "size", "unknown key"),
    ),
    (
        "missing parent",
        lambda s: s.replace("  en/medical:\n    level: domain\n    domain: medical\n", ""),
        ("en/medical/radiology", None, "missing parent node 'en/medical'"),
    ),
    (
        "level out of order",
        lambda s: s.replace("level: subdomain", "level: language"),
        ("en/medical/radiology", "level", "must be deeper"),
    ),
    ("bad path characters", lambda s: s.replace("  code:", "  Code Gen:"), ("Code Gen", None, "bad path")),
    ("cycle-like path", lambda s: s.replace("  code:", "  en/../code:"), ("en/../code", None, "bad path")),
    ("missing data file", lambda s: s.replace("data/en.txt", "data/nope.txt"), ("en", "train", "not found")),
    ("r <= 0", lambda s: s.replace("r: 8", "r: 0"), ("en", "lora.r", "r must be a positive integer")),
    ("alpha <= 0", lambda s: s.replace("alpha: 16", "alpha: -1"), ("en", "lora.alpha", "alpha must be a positive")),
    (
        "unknown target module",
        lambda s: s.replace("[q_proj, v_proj]", "[q_proj, attn_qkv]"),
        ("en", "lora.target_modules", "attn_qkv"),
    ),
    (
        "private without owner",
        lambda s: s.replace("    owner: st-marys\n", ""),
        ("en/medical/radiology", "owner", "needs an owner"),
    ),
    (
        "bad level name",
        lambda s: s.replace("level: domain\n    domain: code", "level: planet\n    domain: code"),
        ("code", "level", "unknown level"),
    ),
    ("missing base", lambda s: s.replace("base:\n  model: tiny\n", ""), (None, "base", "missing 'base'")),
    ("duplicate path", lambda s: s + "  code:\n    level: domain\n", (None, None, "duplicate key 'code'")),
    (
        "bad training value",
        lambda s: s.replace("domain: medical", "domain: medical\n    training: {lr: -1}"),
        ("en/medical", "training.lr", "lr must be"),
    ),
]


@pytest.mark.parametrize("label, mutate, expected", CASES, ids=[c[0] for c in CASES])
def test_each_problem_is_located(tmp_path, label, mutate, expected):
    node, field, fragment = expected
    found = problems(tmp_path, mutate(GOOD))
    matches = [p for p in found if fragment in p.message and (node is None or p.node == node)]
    assert matches, f"no problem containing {fragment!r} for node {node!r} in {found}"
    if field is not None:
        assert any(p.field == field for p in matches), matches
    assert all(p.file.endswith("tree.yaml") for p in found)


def test_all_problems_are_reported_at_once(tmp_path):
    text = GOOD.replace("r: 8", "r: 0").replace("level: subdomain", "level: language") + "colour: blue\n"
    found = problems(tmp_path, text)
    assert len(found) >= 3


def test_malformed_yaml_names_the_line(tmp_path):
    found = problems(tmp_path, "name: demo\nbase: {model: tiny\nnodes: {}\n")
    assert len(found) == 1 and "malformed YAML" in found[0].message and "line" in found[0].message


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "absent.yaml")
