"""`treelm registry ...` end to end on a built tree, and every bad input: exit 2, no traceback, nothing written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cluster.cli import main
from registry import open_registry, resolve_token, set_version_status
from registry.db import migrate
from tests.registry.conftest import backend, db_url  # noqa: F401 (fixtures: SQLite and PostgreSQL)
from tests.registry.helpers import snapshot, write_built_tree

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built_tree(tmp_path_factory, tiny_base_dir):
    return write_built_tree(tmp_path_factory.mktemp("trees") / "demo", tiny_base_dir)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # rich wraps at 80 columns otherwise
    monkeypatch.delenv("TREELM_REGISTRY_URL", raising=False)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def imported(capsys, db_url, built_tree):  # noqa: F811
    assert cli(capsys, "registry", "--db", db_url, "init")[0] == 0
    code, _out, err = cli(capsys, "registry", "import", str(built_tree), "--db", db_url)
    assert code == 0, err
    return db_url


def test_init_import_and_reimport(capsys, db_url, built_tree):  # noqa: F811
    code, out, _ = cli(capsys, "registry", "--db", db_url, "init")
    assert code == 0 and "initialised" in out
    code, out, _ = cli(capsys, "registry", "--db", db_url, "import", str(built_tree), "--json")
    report = json.loads(out)
    assert code == 0 and report["nodes_added"] == 10 and report["tenants_added"] == ["st-marys"]
    before = snapshot(db_url)
    code, out, _ = cli(capsys, "registry", "--db", db_url, "import", str(built_tree))
    assert code == 0 and "up to date" in out
    assert snapshot(db_url) == before


def test_ls_show_versions_and_alias(capsys, imported):
    db = imported
    code, out, _ = cli(capsys, "registry", "ls", "--db", db)
    assert code == 0
    for name in ("demo", "medical", "radiology", "oncology", "private owner=st-marys", "stable=v1"):
        assert name in out
    code, out, _ = cli(capsys, "registry", "ls", "--db", db, "--tenant", "st-marys", "--json")
    ids = {n["id"] for n in json.loads(out)["nodes"]}
    assert "demo/en/medical/oncology" in ids and len(ids) == 10
    assert cli(capsys, "registry", "tenant", "add", "someone-else", "--db", db)[0] == 0
    code, out, _ = cli(capsys, "registry", "ls", "--db", db, "--tenant", "someone-else", "--json")
    assert "demo/en/medical/oncology" not in {n["id"] for n in json.loads(out)["nodes"]}
    code, out, _ = cli(capsys, "registry", "show", "demo/en/medical", "--db", db, "--json")
    shown = json.loads(out)
    assert shown["id"] == "demo/en/medical" and shown["parent"] == "demo/en" and shown["base"]["layers"] == 2
    assert {v["kind"] for v in shown["variants"]} >= {"chain", "flat", "merged", "merged-int8", "gguf-lora"}
    code, out, _ = cli(capsys, "registry", "show", "demo/en/medical", "--db", db)
    assert code == 0 and "versions" in out and "variants of v1" in out and "LlamaForCausalLM" in out
    code, out, _ = cli(capsys, "registry", "versions", "demo/en/medical", "--db", db, "--json")
    assert [(v["version"], v["status"], v["aliases"]) for v in json.loads(out)["versions"]] == [
        (1, "accepted", ["stable"])
    ]
    code, out, _ = cli(capsys, "registry", "alias", "demo/en/medical", "candidate", "1", "--db", db)
    assert code == 0 and "candidate of demo/en/medical: nowhere -> v1" in out


def test_match_json_and_explanation(capsys, imported):
    db = imported
    args = [
        "registry",
        "match",
        "--task",
        "en/medical/radiology",
        "--device",
        "cpu",
        "--memory",
        "8GiB",
        "--context",
        "256",
        "--db",
        db,
    ]
    code, out, err = cli(capsys, *args, "--json", "--top", "3")
    assert code == 0, err
    data = json.loads(out)
    assert set(data) == {"candidates", "suggestions"} and len(data["candidates"]) == 3
    best = data["candidates"][0]
    assert set(best) == {"node", "version", "variant", "fit", "memory_bytes", "score", "reasons"}
    assert best["node"] == "demo/en/medical/radiology" and best["fit"] == "perfect"
    assert any("exact match" in r for r in best["reasons"])
    code, out, _ = cli(capsys, *args, "--bandwidth", "20GB/s")
    assert code == 0 and "best: demo/en/medical/radiology" in out and "tokens/s per sequence" in out
    # Attributes instead of a path, and a private node only with its tenant.
    code, out, _ = cli(
        capsys,
        "registry",
        "match",
        "--language",
        "en",
        "--domain",
        "medical",
        "--subdomain",
        "oncology",
        "--context",
        "256",
        "--db",
        db,
        "--json",
    )
    assert json.loads(out)["candidates"][0]["node"] == "demo/en/medical"
    code, out, _ = cli(
        capsys,
        "registry",
        "match",
        "--task",
        "en/medical/oncology",
        "--tenant",
        "st-marys",
        "--context",
        "256",
        "--db",
        db,
        "--json",
    )
    assert json.loads(out)["candidates"][0]["node"] == "demo/en/medical/oncology"
    # Nothing fits: say what would.
    code, out, _ = cli(capsys, "registry", "match", "--task", "en/medical/radiology", "--memory", "200MiB", "--db", db)
    assert code == 0 and "nothing fits" in out and "what would work" in out and "remotely" in out


def test_tenants_and_tokens(capsys, imported):
    db = imported
    code, out, _ = cli(capsys, "registry", "tenant", "add", "acme", "--db", db)
    assert code == 0 and "added tenant acme" in out
    code, out, err = cli(capsys, "registry", "token", "issue", "acme", "--db", db)
    token = out.strip()
    assert code == 0 and token.startswith("tlm_") and "cannot be shown again" in err
    with open_registry(db) as reg:
        assert resolve_token(reg, token).name == "acme"
    code, out, _ = cli(capsys, "registry", "tenant", "ls", "--db", db, "--json")
    assert {t["name"] for t in json.loads(out)["tenants"]} == {"acme", "st-marys"}


BAD_INPUTS = [
    (["show", "demo/en/nothing"], "unknown node"),
    (["versions", "demo/en/nothing"], "unknown node"),
    (["match", "--task", "xx/yy"], "no node matches task"),
    (["match", "--task", "en", "--memory", "eight gigs"], "is not a size"),
    (["match", "--task", "en", "--memory", "-1GiB"], "is not a size"),
    (["match", "--task", "en", "--device", "tpu"], "device 'tpu' is not one of cpu, cuda, mps"),
    (["match", "--task", "en", "--bandwidth", "fast"], "is not a rate"),
    (["match", "--task", "en", "--tenant", "nobody"], "unknown tenant"),
    (["match", "--task", "en", "--context", "0"], "context must be a positive integer"),
    (["alias", "demo/en", "stable", "9"], "has no version 9"),
    (["alias", "demo/en/medical", "stable", "1"], "is revoked"),
    (["alias", "demo/en", "latest", "1"], "alias 'latest' is not one of stable, candidate"),
    (["token", "issue", "nobody"], "unknown tenant"),
    (["ls", "--tenant", "nobody"], "unknown tenant"),
    (["tenant", "add", "two words"], "must be 1-64"),
    (["tenant", "add", "st-marys"], "already exists"),
]


@pytest.mark.parametrize(
    "args, message", BAD_INPUTS, ids=[" ".join(a[:2]) + f" {i}" for i, (a, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_exits_2_with_a_clear_error_and_writes_nothing(capsys, imported, args, message):
    with open_registry(imported) as reg:
        set_version_status(reg, "demo/en/medical", 1, "revoked")
    before = snapshot(imported)
    code, out, err = cli(capsys, "registry", *args, "--db", imported)
    assert code == 2, out + err
    assert message in " ".join(err.split()), err
    assert "Traceback" not in out + err
    assert snapshot(imported) == before


def test_import_of_a_changed_tree_is_refused_and_writes_nothing(capsys, imported, built_tree, tmp_path):
    import shutil

    copy = shutil.copytree(built_tree, tmp_path / "changed")
    record_file = copy / "nodes" / "en" / "node.json"
    record = json.loads(record_file.read_text())
    record["files"]["adapter_model.safetensors"]["sha256"] = "e" * 64  # same version, other content
    record_file.write_text(json.dumps(record))
    before = snapshot(imported)
    code, _, err = cli(capsys, "registry", "import", str(copy), "--db", imported)
    assert code == 2 and "versions are immutable" in " ".join(err.split())
    assert snapshot(imported) == before
    code, _, err = cli(capsys, "registry", "import", str(tmp_path / "not-a-tree"), "--db", imported)
    assert code == 2 and "is not a built tree" in " ".join(err.split())
    assert snapshot(imported) == before


def test_database_problems_exit_2(capsys, tmp_path, built_tree):
    code, _, err = cli(capsys, "registry", "ls", "--db", "postgresql+psycopg://postgres@127.0.0.1:1/nothing")
    assert code == 2 and "cannot reach the registry database" in err
    code, _, err = cli(capsys, "registry", "--db", "sqlite:////proc/no-such-dir/registry.db", "init")
    assert code == 2 and "cannot create the registry's folder" in err
    missing = tmp_path / "missing.db"
    code, _, err = cli(capsys, "registry", "ls", "--db", f"sqlite:///{missing}")
    assert code == 2 and "treelm registry init" in err and not missing.exists()
    old = f"sqlite:///{tmp_path / 'old.db'}"
    migrate(old, "0001_core")
    before = snapshot(old)
    for args in (["ls"], ["match", "--task", "en"], ["import", str(built_tree)]):
        code, _, err = cli(capsys, "registry", *args, "--db", old)
        assert code == 2 and "treelm registry upgrade" in " ".join(err.split()), err
    assert snapshot(old) == before
    code, out, _ = cli(capsys, "registry", "upgrade", "--db", old)
    assert code == 0 and "from schema 0001_core to 0009_tenant_limits" in out


def test_the_console_script_prints_no_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "registry", "match", "--task", "en", "--memory", "eight gigs"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "is not a size" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "registry", "ls"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    # The default database is ~/.treelm/registry.db; looking does not create it.
    assert proc.returncode == 2 and "treelm registry init" in proc.stderr
    assert not (tmp_path / ".treelm" / "registry.db").exists()
