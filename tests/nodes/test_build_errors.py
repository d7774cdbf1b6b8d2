"""Bad input to `treelm tree build`: a typed error that says what to do, exit code 2 from the CLI,
and nothing half-written (a fresh output dir is not created; an existing tree is unchanged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cluster.cli import main
from hierarchy.spec import load_spec
from nodes.build.builder import build_tree
from nodes.errors import BaseModelError, BuildError, IntegrityError
from nodes.store.tree import open_tree
from tests.nodes.test_build import TINY_NODES, write_spec

SMALL = {"en": TINY_NODES["en"], "en/medical": TINY_NODES["en/medical"]}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    folder = tmp_path_factory.mktemp("small")
    spec = write_spec(folder, SMALL)
    assert build_tree(load_spec(spec), folder / "out").ok
    return spec, folder / "out"


def _set_node(spec: Path, path: str, **values) -> None:
    body = yaml.safe_load(spec.read_text())
    body["nodes"][path].update(values)
    spec.write_text(yaml.safe_dump(body))


@pytest.mark.parametrize(
    "change, fragment",
    [
        (lambda folder: {"train": None}, "field 'train': no train text"),
        (lambda folder: {"eval": None}, "field 'eval': no eval text"),
        (lambda folder: {"train": str(_write(folder / "empty.txt", "  \n\n"))}, "empty.txt is empty"),
        (lambda folder: {"train": str(_write(folder / "short.txt", "Too short."))}, "fewer than one training sequence"),
        (lambda folder: {"eval": str(_write(folder / "bad.txt", b"\xff\xfe\x00"))}, "is not UTF-8"),
    ],
)
def test_bad_data_is_a_build_error_and_creates_nothing(tmp_path, change, fragment):
    spec = write_spec(tmp_path, SMALL)
    values = change(tmp_path)
    body = yaml.safe_load(spec.read_text())
    for key, value in values.items():
        if value is None:
            body["nodes"]["en/medical"].pop(key)
        else:
            body["nodes"]["en/medical"][key] = value
    spec.write_text(yaml.safe_dump(body))
    with pytest.raises(BuildError, match=fragment) as info:
        build_tree(load_spec(spec), tmp_path / "out")
    assert "node 'en/medical'" in str(info.value)
    assert not (tmp_path / "out").exists()


def _write(path: Path, content) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def test_bad_data_leaves_an_existing_tree_unchanged_and_cli_exits_2(small_tree, tmp_path, capsys):
    _spec, out = small_tree
    changed = write_spec(tmp_path, SMALL)
    _set_node(changed, "en/medical", train=str(_write(tmp_path / "short.txt", "Too short.")))
    before = snapshot(out)
    code = main(["tree", "build", str(changed), "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert code == 2 and "fewer than one training sequence" in err and "Traceback" not in err
    assert snapshot(out) == before


def test_corrupted_adapter_is_an_integrity_error_until_forced(tmp_path):
    spec = write_spec(tmp_path, SMALL)
    out = tmp_path / "out"
    build_tree(load_spec(spec), out)
    weights = out / "nodes" / "en" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = snapshot(out)
    with pytest.raises(IntegrityError, match=r"adapter_model.safetensors has sha256 .*--force en"):
        build_tree(load_spec(spec), out)
    assert snapshot(out) == before
    report = build_tree(load_spec(spec), out, force=["en"])
    assert [o.status for o in report.outcomes] == ["trained", "trained"]
    assert open_tree(out).node("tt/en").adapter_digest != ""  # verified and rewritten


def test_base_that_changed_on_disk_is_refused(small_tree, tmp_path):
    spec, out = small_tree
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = copy / "base" / "config.json"
    record = json.loads(config.read_text())
    record["rms_norm_eps"] = 1e-3
    config.write_text(json.dumps(record))
    before = snapshot(copy)
    with pytest.raises(BaseModelError, match="built over"):
        build_tree(load_spec(spec), copy)
    assert snapshot(copy) == before


def test_other_base_name_or_removed_node_is_refused(small_tree, tmp_path, tiny_base_dir):
    spec, out = small_tree
    before = snapshot(out)
    other_base = write_spec(tmp_path / "a", SMALL, base={"model": str(tiny_base_dir)})
    with pytest.raises(BaseModelError, match="build into a new --out"):
        build_tree(load_spec(other_base), out)
    other_name = write_spec(tmp_path / "b", SMALL, name="other")
    with pytest.raises(BuildError, match="holds tree 'tt'"):
        build_tree(load_spec(other_name), out)
    fewer = write_spec(tmp_path / "c", {"en": TINY_NODES["en"]})
    with pytest.raises(BuildError, match="no longer in the spec: en/medical"):
        build_tree(load_spec(fewer), out)
    with pytest.raises(BuildError, match="--force 'nope'"):
        build_tree(load_spec(spec), out, force=["nope"])
    assert snapshot(out) == before


def test_parent_changed_under_a_built_child(tmp_path):
    """A parent replaced under its built child: the child no longer exports, and the next build retrains it."""
    from nodes.build.export import export_node

    spec = write_spec(tmp_path, SMALL)
    out = tmp_path / "out"
    build_tree(load_spec(spec), out)
    # The same tree with another seed for en (same data, so the same tiny base).
    reseeded = write_spec(tmp_path / "other", SMALL | {"en": TINY_NODES["en"] | {"training": {"seed": 7}}})
    build_tree(load_spec(reseeded), tmp_path / "other" / "out")
    assert open_tree(tmp_path / "other" / "out").base_digest == open_tree(out).base_digest
    src = tmp_path / "other" / "out" / "nodes" / "en"
    for name in ("adapter_model.safetensors", "adapter_config.json", "node.json"):
        (out / "nodes" / "en" / name).write_bytes((src / name).read_bytes())
    with pytest.raises(IntegrityError, match="trained over a different version of tt/en"):
        export_node(out, "tt/en/medical", "flat", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    # The builder sees en/medical's parent changed (its digest covers the parent's adapter) and retrains it.
    report = build_tree(load_spec(reseeded), out)
    assert {str(o.path): o.status for o in report.outcomes} == {"en": "reused", "en/medical": "trained"}
    tree = open_tree(out)
    assert tree.node("tt/en/medical").parent_adapter_digest == tree.node("tt/en").adapter_digest


def test_leftovers_of_a_killed_build_are_cleaned(small_tree, tmp_path):
    spec, out = small_tree
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "nodes" / ".en.tmp-123").mkdir()
    (copy / "nodes" / ".en.tmp-123" / "adapter_model.safetensors").write_bytes(b"half")
    (copy / ".tree.json.tmp-9").write_text("{")
    report = build_tree(load_spec(spec), copy)
    assert [o.status for o in report.outcomes] == ["reused", "reused"]
    assert not [p for p in copy.rglob("*") if ".tmp-" in p.name]


def test_a_second_build_into_the_same_directory_is_refused_while_one_runs(small_tree):
    import fcntl

    spec, out = small_tree
    with open(out / ".build.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running build holds it
        before = snapshot(out)
        with pytest.raises(BuildError, match="another `treelm tree build` is writing"):
            build_tree(load_spec(spec), out)
        assert snapshot(out) == before
    assert build_tree(load_spec(spec), out).ok  # released: builds again
