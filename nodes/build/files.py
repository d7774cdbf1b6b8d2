"""Disk and data helpers of the tree builder: text files, digests, atomic writes.

Everything here either fully happens or leaves no trace: JSON records are
written to a temp file then renamed; a node is written to a hidden temp dir
next to its final dir, then swapped in by rename. Hidden ``.tmp-``/``.old-``
entries a killed build left behind are never listed in tree.json and are
removed by the next build.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hierarchy.ids import NodePath
from hierarchy.spec import NodeSpec, TreeSpec
from nodes.store.adapters import AdapterWeights, write_adapter
from nodes.store.digest import sha256_bytes
from nodes.store.tree import NODE_RECORD, node_dir

__all__ = [
    "TextFile",
    "clean_leftovers",
    "commit_node",
    "node_metadata",
    "read_node_record",
    "read_text",
    "share_permissions",
    "spec_digest",
    "write_json_atomic",
]

_LEFTOVER_MARKERS = (".tmp-", ".old-")


@dataclass(frozen=True)
class TextFile:
    label: str  # how errors and node.json name it (path relative to the spec's folder when possible)
    text: str
    sha256: str


def read_text(node: NodeSpec, fld: str, file: Path | None, spec_dir: Path, problems: list[str]) -> TextFile | None:
    where = f"node '{node.path}': field '{fld}'"
    if file is None:
        problems.append(f"{where}: no {fld} text; set `{fld}: <file>` in the spec")
        return None
    try:
        label = file.relative_to(spec_dir).as_posix()
    except ValueError:
        label = str(file)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        problems.append(f"{where}: file not found: {file}")
        return None
    except OSError as exc:
        problems.append(f"{where}: cannot read {file}: {exc}")
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problems.append(f"{where}: {file} is not UTF-8 text ({exc})")
        return None
    if not text.strip():
        problems.append(f"{where}: {file} is empty")
        return None
    return TextFile(label=label, text=text, sha256=sha256_bytes(raw))


def spec_digest(spec: TreeSpec, texts: Mapping[tuple[str, str], TextFile] | None = None) -> str:
    """sha256 of the spec's content (settings and data digests), independent of formatting."""
    nodes = []
    for n in spec.nodes:
        entry = node_metadata(n) | {
            "path": str(n.path),
            "lora": n.lora.to_dict(),
            "training": n.training.to_dict(),
            "guard": n.guard.to_dict(),
        }
        if texts is not None:
            entry["data"] = {k: texts[(str(n.path), k)].sha256 for k in ("train", "eval") if (str(n.path), k) in texts}
        nodes.append(entry)
    base = spec.base
    payload = {"name": spec.name, "base": {k: getattr(base, k) for k in base.__dataclass_fields__}, "nodes": nodes}
    return sha256_bytes(json.dumps(payload, sort_keys=True, default=str).encode())


def node_metadata(n: NodeSpec) -> dict[str, Any]:
    return {
        "level": n.level.value,
        "language": n.language,
        "domain": n.domain,
        "subdomain": n.subdomain,
        "tags": list(n.tags),
        "description": n.description,
        "visibility": n.visibility,
        "owner": n.owner,
    }


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean_leftovers(out: Path) -> None:
    """Remove temp/old dirs a killed build left behind (never listed in tree.json)."""
    for path in sorted(out.rglob(".*"), key=lambda p: -len(p.parts)):
        if any(marker in path.name for marker in _LEFTOVER_MARKERS) and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def read_node_record(root: Path, path: NodePath) -> dict[str, Any] | None:
    file = node_dir(root, path) / NODE_RECORD
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def share_permissions(folder: Path) -> None:
    """mkdtemp makes 0700 dirs (and safetensors 0600 files): give them the usual umask-based modes."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def commit_node(root: Path, path: NodePath, adapter: AdapterWeights, record: dict[str, Any], base_ref: str) -> dict:
    """Write the node into a temp dir, then swap it in; children folders of an old version move over."""
    final = node_dir(root, path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=final.parent))
    try:
        sha = write_adapter(adapter, tmp, base_model_name_or_path=base_ref)
        share_permissions(tmp)
        record["files"] = {
            name: {"sha256": digest, "length": (tmp / name).stat().st_size} for name, digest in sha.items()
        }
        (tmp / NODE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        old = None
        if final.exists():
            old = final.parent / f".{path.name}.old-{os.getpid()}-{time.time_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        for child in old.iterdir():
            if child.is_dir() and not child.name.startswith("."):
                os.replace(child, final / child.name)
        shutil.rmtree(old)
    return record
