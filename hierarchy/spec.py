"""Tree spec: a YAML file describing one tree, parsed into frozen dataclasses.

Every problem found is collected (not just the first), each naming the file,
the node and the field, so that `treelm tree validate` can list them all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hierarchy.errors import InvalidNodePath, SpecError, SpecProblem
from hierarchy.ids import SEGMENT_PATTERN, Level, NodeId, NodePath

__all__ = [
    "LLAMA_LINEAR_MODULES",
    "BaseSpec",
    "GuardSettings",
    "LoraSettings",
    "NodeSpec",
    "TrainSettings",
    "TreeSpec",
    "Visibility",
    "load_spec",
    "parse_spec",
]

# Linear layers of Llama-family models (the tiny test base and SmolLM2 are both Llama).
LLAMA_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Visibility:
    PUBLIC = "public"
    PRIVATE = "private"
    ALL = (PUBLIC, PRIVATE)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters of one node's adapter."""

    r: int = field(default=8, metadata={"help": "rank of the adapter (> 0)"})
    alpha: float = field(default=16.0, metadata={"help": "scaling numerator; scale = alpha / r (> 0)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input while training, in [0, 1)"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"), metadata={"help": "names of the linear layers to adapt"}
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 0:
            raise ValueError(f"alpha must be a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "target_modules": list(self.target_modules)}


@dataclass(frozen=True)
class TrainSettings:
    """How a node's adapter is trained. Runs are reproducible for a given seed."""

    steps: int = field(default=60, metadata={"help": "optimizer steps (used when epochs is not set)"})
    epochs: float | None = field(default=None, metadata={"help": "passes over the training text; overrides steps"})
    lr: float = field(default=3e-3, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    max_seq_len: int = field(default=64, metadata={"help": "tokens per training sequence"})
    seed: int = field(default=0, metadata={"help": "seed for initialisation and data order"})

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.epochs is not None and (not isinstance(self.epochs, (int, float)) or not self.epochs > 0):
            raise ValueError(f"epochs must be a positive number, got {self.epochs!r}")
        if not isinstance(self.lr, (int, float)) or not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "epochs": self.epochs,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "seed": self.seed,
        }


@dataclass(frozen=True)
class GuardSettings:
    """Forgetting guard: keep a child close to its parent outside its own domain."""

    replay: float = field(default=0.25, metadata={"help": "share of each batch drawn from the parent's training text"})
    kl_weight: float = field(default=0.0, metadata={"help": "weight of KL(child || parent) on replayed text"})
    max_forgetting: float = field(
        default=0.10, metadata={"help": "max relative perplexity rise on the parent's eval text"}
    )

    def __post_init__(self) -> None:
        if not isinstance(self.replay, (int, float)) or not 0.0 <= self.replay < 1.0:
            raise ValueError(f"replay must be in [0, 1), got {self.replay!r}")
        if not isinstance(self.kl_weight, (int, float)) or self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight!r}")
        if not isinstance(self.max_forgetting, (int, float)) or self.max_forgetting < 0:
            raise ValueError(f"max_forgetting must be >= 0, got {self.max_forgetting!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"replay": self.replay, "kl_weight": self.kl_weight, "max_forgetting": self.max_forgetting}


@dataclass(frozen=True)
class BaseSpec:
    """The root model. ``model`` is ``tiny``, ``smollm2``, ``gguf:<file>`` or a local HF model dir."""

    model: str
    # Sizes of the on-the-fly random Llama when model == "tiny".
    hidden: int = 64
    layers: int = 2
    vocab: int = 512
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 128
    max_position: int = 512
    seed: int = 0
    description: str = ""

    @property
    def kind(self) -> str:
        if self.model == "tiny":
            return "tiny"
        if self.model == "smollm2":
            return "smollm2"
        if self.model.startswith("gguf:"):
            return "gguf"
        return "hf"

    @property
    def is_llama(self) -> bool:
        return self.kind in ("tiny", "smollm2", "gguf")


@dataclass(frozen=True)
class NodeSpec:
    """One non-root node. Language/domain/subdomain are inherited from ancestors when unset."""

    path: NodePath
    level: Level
    language: str | None = None
    domain: str | None = None
    subdomain: str | None = None
    tags: tuple[str, ...] = ()
    description: str = ""
    train: Path | None = None
    eval: Path | None = None
    probe: Path | None = None
    lora: LoraSettings = LoraSettings()
    training: TrainSettings = TrainSettings()
    guard: GuardSettings = GuardSettings()
    visibility: str = Visibility.PUBLIC
    owner: str | None = None

    @property
    def parent(self) -> NodePath:
        return self.path.parent

    @property
    def is_private(self) -> bool:
        return self.visibility == Visibility.PRIVATE


@dataclass(frozen=True)
class TreeSpec:
    """A whole tree: its name, base, and nodes ordered parents-first."""

    name: str
    base: BaseSpec
    nodes: tuple[NodeSpec, ...]
    source: Path | None = None
    description: str = ""

    def node(self, path: NodePath | str) -> NodeSpec:
        key = NodePath(str(path))
        for node in self.nodes:
            if node.path == key:
                return node
        raise KeyError(f"tree {self.name!r} has no node {str(key)!r}")

    def has(self, path: NodePath | str) -> bool:
        key = NodePath(str(path))
        return any(node.path == key for node in self.nodes)

    def node_id(self, path: NodePath | str) -> NodeId:
        return NodeId(self.name, NodePath(str(path)))

    def children(self, path: NodePath | str) -> tuple[NodeSpec, ...]:
        key = NodePath(str(path))
        return tuple(n for n in self.nodes if n.path.parent == key)

    def chain(self, path: NodePath | str) -> tuple[NodeSpec, ...]:
        """Specs from the first child of the base down to ``path`` (empty for the base)."""
        key = NodePath(str(path))
        return tuple(self.node(p) for p in key.lineage())

    def subtree(self, path: NodePath | str) -> tuple[NodeSpec, ...]:
        key = NodePath(str(path))
        return tuple(n for n in self.nodes if n.path == key or key.is_ancestor_of(n.path))

    def level_of(self, path: NodePath | str) -> Level:
        key = NodePath(str(path))
        return Level.BASE if key.is_root else self.node(key).level

    def to_json(self) -> dict[str, Any]:
        """The shape printed by ``treelm tree show --json``."""
        nodes: list[dict[str, Any]] = [{"id": self.name, "path": "", "level": Level.BASE.value, "parent": None}]
        for n in self.nodes:
            nodes.append(
                {
                    "id": str(self.node_id(n.path)),
                    "path": str(n.path),
                    "level": n.level.value,
                    "parent": str(self.node_id(n.parent)),
                    "language": n.language,
                    "domain": n.domain,
                    "subdomain": n.subdomain,
                    "visibility": n.visibility,
                    "owner": n.owner,
                    "lora": n.lora.to_dict(),
                }
            )
        return {"name": self.name, "base": {"model": self.base.model}, "nodes": nodes}


# --------------------------------------------------------------------------- parsing

_TOP_KEYS = {"name", "description", "base", "defaults", "nodes"}
_BASE_KEYS = {f for f in BaseSpec.__dataclass_fields__}
_NODE_KEYS = {
    "level",
    "language",
    "domain",
    "subdomain",
    "tags",
    "description",
    "train",
    "eval",
    "probe",
    "lora",
    "training",
    "guard",
    "visibility",
    "owner",
}
_DEFAULT_KEYS = {"lora", "training", "guard"}
_Settings = TypeVar("_Settings", LoraSettings, TrainSettings, GuardSettings)
# Reports one problem: (node label, field, message); node and field are None when not about one.
_Problem = Callable[[str | None, str | None, str], None]


MAX_SPEC_NESTING = 64  # lists and mappings inside each other; a spec needs a handful


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that reports duplicate mapping keys instead of silently keeping the last, and
    refuses nesting deeper than MAX_SPEC_NESTING (PyYAML recurses once per level)."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_SPEC_NESTING:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_SPEC_NESTING} levels",
                    self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_spec(path: str | Path, *, check_files: bool = True) -> TreeSpec:
    """Read and validate a tree spec file; raises :class:`SpecError` listing every problem."""
    path = Path(path)
    fname = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([SpecProblem(fname, None, None, "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([SpecProblem(fname, None, None, f"cannot read: {exc}")]) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except RecursionError:  # a scanner state deeper than the composer's cap (flow collections)
        raise SpecError([SpecProblem(fname, None, None, "malformed YAML: nested too deeply")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError([SpecProblem(fname, None, None, f"malformed YAML{where}: {problem}")]) from None
    return parse_spec(raw, source=path, check_files=check_files)


def parse_spec(raw: Any, *, source: Path | None = None, check_files: bool = True) -> TreeSpec:
    """Validate an already-parsed spec mapping. Relative paths resolve against ``source``'s folder."""
    fname = str(source) if source else "<spec>"
    root_dir = source.parent if source else Path.cwd()
    problems: list[SpecProblem] = []

    def problem(node: str | None, fld: str | None, message: str) -> None:
        problems.append(SpecProblem(fname, node, fld, message))

    if not isinstance(raw, Mapping):
        raise SpecError([SpecProblem(fname, None, None, "the spec must be a YAML mapping with name, base and nodes")])
    for key in sorted(set(raw) - _TOP_KEYS, key=str):
        problem(None, str(key), f"unknown key (expected one of: {', '.join(sorted(_TOP_KEYS))})")

    name = raw.get("name")
    if not isinstance(name, str) or not name:
        problem(None, "name", "missing tree name")
        name = "tree"
    else:
        try:
            NodeId(name, NodePath.root())
        except InvalidNodePath:
            problem(None, "name", f"bad tree name {name!r}: must match {SEGMENT_PATTERN}")

    base = _parse_base(raw.get("base"), problem)
    defaults = _parse_defaults(raw.get("defaults"), problem)

    raw_nodes = raw.get("nodes")
    if raw_nodes is None:
        raw_nodes = {}
    if not isinstance(raw_nodes, Mapping):
        problem(None, "nodes", "must be a mapping from node path to node settings")
        raw_nodes = {}

    parsed: dict[NodePath, NodeSpec] = {}
    for raw_path, body in raw_nodes.items():
        label = str(raw_path)
        try:
            path = NodePath(label)
        except InvalidNodePath as exc:
            problem(label, None, str(exc))
            continue
        if path.is_root:
            problem(label, None, "the empty path is the base; configure it under 'base'")
            continue
        if path in parsed:
            problem(label, None, "duplicate path")
            continue
        spec = _parse_node(path, body, defaults, root_dir, check_files, problem)
        if spec is not None:
            parsed[path] = spec

    ordered = _check_structure(parsed, problem)
    if base is not None and base.is_llama:
        for spec in ordered:
            unknown = [m for m in spec.lora.target_modules if m not in LLAMA_LINEAR_MODULES]
            if unknown:
                problem(
                    str(spec.path),
                    "lora.target_modules",
                    f"the base has no module(s) {unknown} (it has: {', '.join(LLAMA_LINEAR_MODULES)})",
                )
    if problems or base is None:  # a missing base is always among the problems
        raise SpecError(problems)
    return TreeSpec(
        name=name, base=base, nodes=tuple(ordered), source=source, description=str(raw.get("description") or "")
    )


def _parse_base(raw: Any, problem: _Problem) -> BaseSpec | None:
    if raw is None:
        problem(None, "base", "missing 'base' (e.g. base: {model: tiny})")
        return None
    if isinstance(raw, str):
        raw = {"model": raw}
    if not isinstance(raw, Mapping):
        problem(None, "base", "must be a mapping with a 'model' key")
        return None
    for key in sorted(set(raw) - _BASE_KEYS, key=str):
        problem(None, f"base.{key}", "unknown key")
    model = raw.get("model")
    if not isinstance(model, str) or not model.strip():
        problem(None, "base.model", "missing model ('tiny', 'smollm2', 'gguf:<file>' or a local model dir)")
        return None
    try:
        return BaseSpec(**{k: v for k, v in raw.items() if k in _BASE_KEYS})
    except TypeError as exc:
        problem(None, "base", str(exc))
        return None


def _parse_defaults(raw: Any, problem: _Problem) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        problem(None, "defaults", "must be a mapping with lora / training / guard")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        if key not in _DEFAULT_KEYS:
            problem(None, f"defaults.{key}", f"unknown key (expected one of: {', '.join(sorted(_DEFAULT_KEYS))})")
        elif not isinstance(value, Mapping):
            problem(None, f"defaults.{key}", "must be a mapping")
        else:
            out[key] = dict(value)
    return out


def _settings(
    kind: str,
    cls: type[_Settings],
    raw: Any,
    defaults: dict[str, dict[str, Any]],
    label: str | None,
    problem: _Problem,
) -> _Settings:
    merged = dict(defaults.get(kind, {}))
    if raw is not None:
        if not isinstance(raw, Mapping):
            problem(label, kind, "must be a mapping")
            return cls()
        merged.update(raw)
    allowed = set(cls.__dataclass_fields__)
    bad = sorted(set(merged) - allowed, key=str)
    for key in bad:
        problem(label, f"{kind}.{key}", f"unknown key (expected one of: {', '.join(sorted(allowed))})")
    if bad:
        return cls()
    if "target_modules" in merged and isinstance(merged["target_modules"], list):
        merged["target_modules"] = tuple(merged["target_modules"])
    try:
        return cls(**merged)
    except (TypeError, ValueError) as exc:
        field_name = kind
        text = str(exc)
        for fname in allowed:
            if text.startswith(fname + " "):
                field_name = f"{kind}.{fname}"
        problem(label, field_name, text)
        return cls()


def _parse_node(
    path: NodePath,
    body: Any,
    defaults: dict[str, dict[str, Any]],
    root_dir: Path,
    check_files: bool,
    problem: _Problem,
) -> NodeSpec | None:
    label = str(path)
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        problem(label, None, "node settings must be a mapping")
        return None
    for key in sorted(set(body) - _NODE_KEYS, key=str):
        problem(label, str(key), f"unknown key (expected one of: {', '.join(sorted(_NODE_KEYS))})")
    level: Level | None = None
    if "level" not in body:
        problem(label, "level", "missing level (language | domain | subdomain)")
    else:
        try:
            level = Level.parse(body["level"])
            if level is Level.BASE:
                problem(label, "level", "only the root is level 'base'")
                level = None
        except ValueError as exc:
            problem(label, "level", str(exc))

    files: dict[str, Path | None] = {}
    for key in ("train", "eval", "probe"):
        value = body.get(key)
        if value is None:
            files[key] = None
            continue
        if not isinstance(value, str) or not value:
            problem(label, key, "must be a file path")
            files[key] = None
            continue
        resolved = (root_dir / value).resolve() if not Path(value).is_absolute() else Path(value)
        if check_files and not resolved.is_file():
            problem(label, key, f"data file not found: {resolved}")
        files[key] = resolved

    strings: dict[str, str | None] = {}
    for key in ("language", "domain", "subdomain", "owner"):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problem(label, key, "must be a non-empty string")
            value = None
        strings[key] = value
    visibility = body.get("visibility", Visibility.PUBLIC)
    if visibility not in Visibility.ALL:
        problem(label, "visibility", f"must be one of {', '.join(Visibility.ALL)}, got {visibility!r}")
        visibility = Visibility.PUBLIC
    if visibility == Visibility.PRIVATE and not strings["owner"]:
        problem(label, "owner", "a private node needs an owner tenant")
    tags = body.get("tags", ())
    if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
        problem(label, "tags", "must be a list of strings")
        tags = ()

    lora = _settings("lora", LoraSettings, body.get("lora"), defaults, label, problem)
    training = _settings("training", TrainSettings, body.get("training"), defaults, label, problem)
    guard = _settings("guard", GuardSettings, body.get("guard"), defaults, label, problem)
    if level is None:
        return None
    return NodeSpec(
        path=path,
        level=level,
        language=strings["language"],
        domain=strings["domain"],
        subdomain=strings["subdomain"],
        tags=tuple(tags),
        description=str(body.get("description") or ""),
        train=files["train"],
        eval=files["eval"],
        probe=files["probe"],
        lora=lora,
        training=training,
        guard=guard,
        visibility=visibility,
        owner=strings["owner"],
    )


def _check_structure(parsed: dict[NodePath, NodeSpec], problem: _Problem) -> list[NodeSpec]:
    """Parents exist, levels deepen, attributes inherit; returns nodes parents-first."""
    ok: dict[NodePath, NodeSpec] = {}
    for path in sorted(parsed, key=lambda p: (p.depth, p.value)):
        spec = parsed[path]
        parent_path = path.parent
        if parent_path.is_root:
            parent_level, parent = Level.BASE, None
        elif parent_path in ok:
            parent = ok[parent_path]
            parent_level = parent.level
        else:
            if parent_path in parsed:
                continue  # the parent is itself invalid; its problem is already reported
            problem(str(path), None, f"missing parent node '{parent_path}' (declare it in 'nodes')")
            continue
        if spec.level.rank <= parent_level.rank:
            problem(
                str(path),
                "level",
                f"level '{spec.level.value}' must be deeper than its parent's level '{parent_level.value}'",
            )
            continue
        if parent is not None:
            spec = replace(
                spec,
                language=spec.language or parent.language,
                domain=spec.domain or parent.domain,
                subdomain=spec.subdomain or parent.subdomain,
            )
            if parent.is_private and not spec.is_private:
                problem(str(path), "visibility", f"a child of private node '{parent_path}' must be private too")
        ok[path] = spec
    return [ok[p] for p in sorted(ok, key=lambda p: (p.depth, p.value))]
