"""Hostile files given to the CLI: a tree.json that is not an object, a corrupt node.json, YAML
nested 100000 deep, and a fuzzed set of tree records. Each ends in exit 2 with a message naming
the file, never a traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from cluster.cli import main

pytestmark = pytest.mark.timeout(300)

TREE_RECORDS = [
    "[1, 2, 3]",
    "null",
    "42",
    '"text"',
    "{",
    '{"name": "rt"}',
    '{"base": 5, "name": "rt"}',
    '{"base": {"dir": 7, "digest": "x"}, "name": "rt"}',
    '{"base": {"dir": ".", "digest": "x"}, "name": "rt", "nodes": [5]}',
    '{"base": {"dir": ".", "digest": "x"}, "name": "rt", "nodes": "en"}',
    "[" * 100_000 + "]" * 100_000,
]
NODE_RECORDS = ['{"path": 5, "broken', "[]", '{"id": 5}', '{"id": "rt/en", "level": "nope", "parent": "rt"}', "\udcff"]


@pytest.fixture
def corrupt_tree(world, tmp_path):
    def make(tree_json: str | None = None, node_json: str | None = None):
        root = tmp_path / "tree"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(world.tree.root, root)
        record = json.loads((root / "tree.json").read_text())
        record["base"]["dir"] = str(world.tree.base_dir)  # the copy still finds the base
        (root / "tree.json").write_text(json.dumps(record))
        if tree_json is not None:
            (root / "tree.json").write_text(tree_json)
        if node_json is not None:
            (root / "nodes" / "en" / "node.json").write_text(node_json, errors="surrogateescape")
        return root

    return make


def _commands(root, tmp_path) -> list[list[str]]:
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    return [
        ["registry", "import", str(root), "--db", db],
        ["export", str(root), "rt/en"],
        ["serve", str(root), "--db", db],
    ]


def _assert_clean_refusal(code: int, err: str, file: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err and "error:" in err
    assert file in " ".join(err.split()).replace(" ", "")  # rich may wrap the path


@pytest.mark.parametrize("text", TREE_RECORDS, ids=range(len(TREE_RECORDS)))
def test_a_tree_json_that_is_not_a_tree_record_ends_in_exit_2(corrupt_tree, tmp_path, capsys, text):
    root = corrupt_tree(tree_json=text)
    for argv in _commands(root, tmp_path):
        code = main(argv)
        _assert_clean_refusal(code, capsys.readouterr().err, "tree.json")


@pytest.mark.parametrize("text", NODE_RECORDS, ids=range(len(NODE_RECORDS)))
def test_a_corrupt_node_json_ends_in_exit_2(corrupt_tree, tmp_path, capsys, text):
    root = corrupt_tree(node_json=text)
    for argv in _commands(root, tmp_path):
        code = main(argv)
        _assert_clean_refusal(code, capsys.readouterr().err, "node.json")


@pytest.mark.parametrize(
    "nesting", ["[" * 100_000 + "]" * 100_000, "a:\n" + "".join(f"{' ' * i}- \n" for i in range(1, 3000))]
)
def test_a_tree_spec_nested_100000_deep_ends_in_exit_2(tmp_path, capsys, nesting):
    spec = tmp_path / "tree.yaml"
    spec.write_text(nesting)
    for argv in (
        ["tree", "validate", str(spec)],
        ["tree", "show", str(spec)],
        ["tree", "build", str(spec), "--out", str(tmp_path / "out")],
    ):
        code = main(argv)
        captured = capsys.readouterr()
        out = captured.out + captured.err
        assert code == 2 and "Traceback" not in out and "nested" in out, out[-2000:]
    assert not (tmp_path / "out").exists()
