"""How a tree absorbs updates: when to aggregate, how hard to step, what to screen and gate, who approves.

Defaults work for any tree; ``TREE_DIR/update-policy.yaml`` (or ``--policy FILE``) overrides
any field, for example::

    min_updates: 3            # aggregate once three screened updates wait for a parent ...
    window_s: 86400           # ... or when the oldest has waited a day (checked by `treelm update tick`)
    eta: 0.5                  # candidate parent = parent + eta * merge(children's increments)
    merge: contrast           # contrast (the default: the increment shrunk where the parent's, its ancestors'
                              # and the other children's inputs lie) | project | auto (TIES when the children
                              # disagree in sign) | concat | ties | dare | dare_ties, or a mapping:
                              # {method: dare, drop: 0.5, seed: 0}, {method: project, energy: 0.9},
                              # {method: contrast, strength: 4.0} (see hierarchy.updates.aggregate.MergePolicy)
    consolidate: {steps: 0}   # > 0: distil the merged candidate towards the old parent on the parent's and
                              # siblings' texts (and towards itself on the updating child's) before the gate
    rebase: {key: keys/rebase, steps: 20, lr: 0.0003, lm_weight: 0.001, start: refit}   # with a key: children
                              # re-fit over a parent's new stable version, gated (gate.rebase), signed with the key
    gate: {parent: 0.02, probe: 0.02, canary: 0.02, repin: 0.02, rebase: 0.01}
    screen: {max_relative: 10.0, min_relative: 0.01, min_cosine: 0.0, on_too_large: reject}
    approvals: {evaluator: 1, operator: 1}
    probes: {en/medical/oncology: /secure/oncology-probe.txt}
    canary: /data/general.txt
    feedback:                 # when users' feedback becomes an update (`treelm update tick`)
      key: keys/feedback      # signs the updates the policy makes (a node key the tree trusts)
      min_corrections: 50     # make one when this many new corrections wait ...
      negative_rate_rise: 0.1 # ... or the negative-rating rate rose this much over the last update's
      max_age_s: 604800       # ... or the oldest waiting record is a week old (with min_trainable)
      nodes: {en/medical/cardiology: {min_corrections: 20}}   # per-node overrides
    customize:                # tenants' fine-tuning jobs (POST /v1/fine_tuning/jobs, cluster/jobs)
      key: keys/service       # signs each new node's version 1 (a node key the tree trusts); None: no jobs
      held_out: 0.1           # share of the training file held out when no validation file is given
      n_epochs: 3             # defaults of the job's hyperparameters
      learning_rate: 0.002
      lora_rank: 8
      max_steps: 300          # bounds any job's optimizer steps (a CPU's minutes)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from cluster.errors import PolicyError
from hierarchy.spec import TrainSettings
from hierarchy.updates.aggregate import MergePolicy
from hierarchy.updates.screening import ScreenPolicy
from hierarchy.updates.trust import Role
from nodes.build.gate import GateBounds

__all__ = [
    "DEFAULT_MERGE",
    "POLICY_FILE",
    "REBASE_STARTS",
    "CustomizePolicy",
    "DistillPolicy",
    "FeedbackPolicy",
    "RebasePolicy",
    "UpdatePolicy",
]

POLICY_FILE = "update-policy.yaml"
_DAY = 86400.0


def _number(name: str, value: Any, *, integer: bool = False, low: float = 0.0, high: float | None = None) -> None:
    """Refuse a bad field with its name: ``low <= value`` (``<= high``), an int where ``integer``."""
    kinds: tuple[type, ...] = (int,) if integer else (int, float)
    ok = not isinstance(value, bool) and isinstance(value, kinds)
    number = float(value) if ok else math.nan
    if not (math.isfinite(number) and number >= low) or (high is not None and number > high):
        span = f">= {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise PolicyError(
            f"update policy: {name} must be {'an integer' if integer else 'a number'} {span}, got {value!r}"
        )


# The update policy's merge when none is named: on the demo tree at eta 0.5 it is the one that
# passes the gate with the largest gain (siblings and canary within 1%; README "Forgetting").
DEFAULT_MERGE = "contrast"


def _merge_policy(value: Any, eta: float) -> MergePolicy:
    """``merge:`` as a method name or a mapping of :class:`MergePolicy` fields (``eta`` is top-level)."""
    if isinstance(value, MergePolicy):
        return replace(value, eta=eta) if value.eta != eta else value
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, Mapping):
        raise PolicyError(f"update policy: merge must be a method name or a mapping of fields, got {value!r}")
    value = {"method": DEFAULT_MERGE, **value}
    known = {f.name for f in fields(MergePolicy)} - {"eta"}
    unknown = sorted(set(value) - known)
    if unknown:
        raise PolicyError(
            f"update policy: unknown merge field(s) {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))};"
            " eta is a top-level field)"
        )
    try:
        return MergePolicy(**dict(value), eta=eta)
    except (ValueError, TypeError) as exc:
        raise PolicyError(f"update policy: merge.{exc}") from None


@dataclass(frozen=True)
class DistillPolicy:
    """A short distillation run (nodes.build.distill): ``consolidate`` (a merged candidate parent,
    towards the old parent on its own and its siblings' texts) and ``rebase`` (a child over its
    parent's new version, towards its old effective model). ``steps: 0`` turns it off."""

    steps: int = field(default=0, metadata={"help": "optimizer steps (0: off)"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step, shared by the texts"})
    lm_weight: float = field(default=0.5, metadata={"help": "rebase: weight of the child's own LM loss"})
    seed: int = field(default=0, metadata={"help": "data order"})

    def __post_init__(self) -> None:
        _number("steps", self.steps, integer=True, low=0, high=10_000)
        _number("lr", self.lr, low=1e-9, high=1.0)
        _number("batch_size", self.batch_size, integer=True, low=1, high=1024)
        _number("lm_weight", self.lm_weight, low=0, high=100)
        _number("seed", self.seed, integer=True, low=0)

    def settings(self, seq_len: int) -> TrainSettings:
        """The distillation run's settings over windows of ``seq_len`` tokens."""
        return TrainSettings(
            steps=self.steps, lr=self.lr, batch_size=self.batch_size, max_seq_len=seq_len, seed=self.seed
        )

    @classmethod
    def from_dict(cls, name: str, obj: Any, base_dir: Path | None = None) -> Any:
        if not isinstance(obj, Mapping):
            raise PolicyError(f"update policy: {name} must be a mapping of fields, got {obj!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(map(str, set(obj) - known))
        if unknown:
            raise PolicyError(
                f"update policy: unknown {name} field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values = dict(obj)
        if values.get("key") and base_dir is not None:
            values["key"] = str((base_dir / str(values["key"])).resolve())
        try:
            return cls(**values)
        except PolicyError as exc:
            raise PolicyError(str(exc).replace("update policy: ", f"update policy: {name}.", 1)) from None


REBASE_STARTS = ("refit", "own")


@dataclass(frozen=True)
class RebasePolicy(DistillPolicy):
    """Children re-fit over their parent's new stable version (cluster.updates.rebase); made only
    when ``key`` names the signing key of the rebased versions (a key the tree trusts)."""

    steps: int = field(default=20, metadata={"help": "optimizer steps (0: off)"})
    # Small steps: the KL towards the old model is tiny to begin with, and Adam's normalised steps
    # would otherwise walk the adapter away from it (measured on the demo tree, see the README).
    lr: float = field(default=3e-4, metadata={"help": "AdamW learning rate"})
    # Small: the KL towards the old model is ~1e-2 nats and the LM loss ~3, so at 0.01 the LM term
    # already led and took children 4-5% below their old perplexity (measured, see the README).
    lm_weight: float = field(default=0.001, metadata={"help": "weight of the child's own LM loss"})
    key: str | None = field(default=None, metadata={"help": "signing key dir/PEM; None: no rebases"})
    # refit: start from the child's adapter re-expressed over the new parent (the chains add in weight
    # space, so this is the old effective model up to a rank cut); own: from its adapter as it is.
    start: str = field(default="refit", metadata={"help": "refit | own: where the re-fit starts"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.start not in REBASE_STARTS:
            raise PolicyError(f"update policy: start must be one of {', '.join(REBASE_STARTS)}, got {self.start!r}")
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise PolicyError(f"update policy: key must be a key directory or PEM file, got {self.key!r}")

    @property
    def enabled(self) -> bool:
        return bool(self.steps and self.key)


@dataclass(frozen=True)
class CustomizePolicy:
    """Tenants' fine-tuning jobs (cluster/jobs): the key that signs the nodes they make, the held-out
    share the gate measures on, and the defaults and bounds of a job's hyperparameters."""

    key: str | None = field(default=None, metadata={"help": "signing key dir/PEM; None: no fine-tuning jobs"})
    held_out: float = field(default=0.1, metadata={"help": "share held out when no validation file is given"})
    n_epochs: int = field(default=3, metadata={"help": "default passes over the training file"})
    learning_rate: float = field(default=2e-3, metadata={"help": "default AdamW learning rate"})
    lora_rank: int = field(default=8, metadata={"help": "default LoRA rank"})
    batch_size: int = field(default=8, metadata={"help": "sequences per step"})
    max_seq_len: int = field(default=128, metadata={"help": "tokens per training sequence"})
    max_steps: int = field(default=300, metadata={"help": "the most optimizer steps any job runs"})
    max_epochs: int = field(default=20, metadata={"help": "the most passes a job may ask for"})
    max_rank: int = field(default=32, metadata={"help": "the highest LoRA rank a job may ask for"})
    replay: float = field(default=0.25, metadata={"help": "share of each batch from the parent's training text"})
    kl_weight: float = field(default=0.0, metadata={"help": "weight of KL(child || parent) on replayed text"})

    def __post_init__(self) -> None:
        if self.key is not None and (not isinstance(self.key, str) or not self.key):
            raise PolicyError(f"update policy: customize.key must be a key directory or PEM file, got {self.key!r}")
        _number("customize.held_out", self.held_out, low=0.01, high=0.5)
        for name in ("n_epochs", "lora_rank", "batch_size", "max_seq_len", "max_steps", "max_epochs", "max_rank"):
            _number(f"customize.{name}", getattr(self, name), integer=True, low=1)
        _number("customize.learning_rate", self.learning_rate, low=1e-8, high=1.0)
        _number("customize.replay", self.replay, high=0.9)
        _number("customize.kl_weight", self.kl_weight)

    @property
    def enabled(self) -> bool:
        return bool(self.key)

    @classmethod
    def from_dict(cls, obj: Any, base_dir: Path | None = None) -> CustomizePolicy:
        if not isinstance(obj, Mapping):
            raise PolicyError(f"update policy: customize must be a mapping of fields, got {obj!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise PolicyError(
                f"update policy: unknown field(s) customize.{', customize.'.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        values = dict(obj)
        if values.get("key") and base_dir is not None:
            values["key"] = str((base_dir / str(values["key"])).resolve())
        return cls(**values)


@dataclass(frozen=True)
class FeedbackPolicy:
    """When a node's feedback becomes an update (see the module docstring); per tenant and node."""

    key: str | None = field(default=None, metadata={"help": "signing key dir/PEM; None: the policy makes none"})
    min_corrections: int = field(default=50, metadata={"help": "make an update when this many corrections wait"})
    negative_rate_rise: float | None = field(
        default=0.1, metadata={"help": "or when the negative rate rose this much over the last update's"}
    )
    min_ratings: int = field(default=20, metadata={"help": "ratings needed before the negative rate counts"})
    max_age_s: float | None = field(default=7 * _DAY, metadata={"help": "or when the oldest waiting is this old"})
    min_trainable: int = field(default=8, metadata={"help": "records with a target needed to make any update"})
    held_out: float = field(default=0.2, metadata={"help": "share of the feedback the gate measures on"})
    steps: int = field(default=10, metadata={"help": "fine-tuning steps"})
    lr: float = field(default=1e-3, metadata={"help": "fine-tuning learning rate"})
    replay: float = field(
        default=0.5, metadata={"help": "share of training documents from the node's own training text"}
    )
    every_s: float = field(default=60.0, metadata={"help": "how often a cluster's desk evaluates it"})
    nodes: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, metadata={"help": "per-node overrides"})

    def __post_init__(self) -> None:
        for name in ("min_corrections", "min_ratings", "min_trainable", "steps"):
            _number(f"feedback.{name}", getattr(self, name), integer=True, low=1)
        if self.negative_rate_rise is not None:
            _number("feedback.negative_rate_rise", self.negative_rate_rise, low=0, high=1)
        if self.max_age_s is not None:
            _number("feedback.max_age_s", self.max_age_s, low=1)
        _number("feedback.held_out", self.held_out, low=0.01, high=0.9)
        _number("feedback.replay", self.replay, low=0, high=0.9)
        _number("feedback.lr", self.lr, low=1e-9)
        _number("feedback.every_s", self.every_s, low=1)
        known = {f.name for f in fields(self)} - {"nodes", "key"}
        nodes = {}
        for path, override in dict(self.nodes).items():
            if not isinstance(override, Mapping) or set(override) - known:
                bad = sorted(set(override) - known) if isinstance(override, Mapping) else override
                raise PolicyError(
                    f"update policy: feedback.nodes[{path!r}] may set {', '.join(sorted(known))}; got {bad!r}"
                )
            nodes[str(path).strip("/")] = dict(override)
        object.__setattr__(self, "nodes", nodes)
        for path in nodes:  # each override must itself be valid
            self.for_node(path)

    def for_node(self, path: str) -> FeedbackPolicy:
        """The policy for node ``path`` (a tree-relative path such as ``en/medical``)."""
        override = self.nodes.get(path.strip("/"))
        return replace(self, nodes={}, **override) if override else self

    @classmethod
    def from_dict(cls, obj: Any, base_dir: Path | None) -> FeedbackPolicy:
        if not isinstance(obj, Mapping):
            raise PolicyError(f"update policy: feedback must be a mapping of fields, got {obj!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise PolicyError(
                f"update policy: unknown feedback field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values = dict(obj)
        if values.get("key") and base_dir is not None:
            values["key"] = str((base_dir / str(values["key"])).resolve())
        return cls(**values)


@dataclass(frozen=True)
class UpdatePolicy:
    """Every knob of the coordinator; validated in ``__post_init__`` (ValueError names the field)."""

    min_updates: int = field(default=1, metadata={"help": "m: aggregate when this many screened updates wait"})
    window_s: float | None = field(default=None, metadata={"help": "or when the oldest has waited this long"})
    eta: float = field(default=0.5, metadata={"help": "server step: candidate = parent + eta * merge"})
    merge: MergePolicy = field(
        default_factory=lambda: MergePolicy(method=DEFAULT_MERGE),
        metadata={"help": "a merge method's name, or a mapping of MergePolicy fields"},
    )
    screen: ScreenPolicy = field(default_factory=ScreenPolicy)
    gate: GateBounds = field(default_factory=GateBounds)
    approvals: Mapping[str, int] = field(default_factory=lambda: {"evaluator": 1, "operator": 1})
    reference_steps: int = field(default=10, metadata={"help": "steps of the parent's own reference fine-tune"})
    reference_lr: float = field(default=3e-3, metadata={"help": "learning rate of the reference fine-tune"})
    reference_seed: int = field(default=1234, metadata={"help": "seed of the reference fine-tune"})
    max_rank: int | None = field(default=64, metadata={"help": "refuse update adapters of a higher rank"})
    approval_ttl_s: float = field(default=7 * _DAY, metadata={"help": "a candidate's manifest expires after this"})
    probes: Mapping[str, str] = field(default_factory=dict, metadata={"help": "node path -> probe text file"})
    canary: str | None = field(default=None, metadata={"help": "general canary text file (default: languages)"})
    max_package_bytes: int = field(default=256 << 20, metadata={"help": "largest package accepted"})
    feedback: FeedbackPolicy = field(default_factory=FeedbackPolicy)
    customize: CustomizePolicy = field(
        default_factory=CustomizePolicy, metadata={"help": "tenants' fine-tuning jobs (needs key)"}
    )
    consolidate: DistillPolicy = field(
        default_factory=DistillPolicy, metadata={"help": "distil a merged candidate towards the old parent"}
    )
    rebase: RebasePolicy = field(
        default_factory=RebasePolicy,
        metadata={"help": "re-fit each child over its parent's new stable version (needs key)"},
    )
    gate_max_tokens: int | None = field(
        default=None,
        metadata={"help": "measure each gate text on its first N tokens (bounds the gate's cost; default: all)"},
    )

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PolicyError(f"update policy: {name} must be an integer >= 1, got {value!r}")

        for name in ("min_updates", "reference_steps", "max_package_bytes"):
            positive_int(name)
        for name in ("max_rank", "gate_max_tokens"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.window_s is not None and not (isinstance(self.window_s, (int, float)) and self.window_s > 0):
            raise PolicyError(f"update policy: window_s must be > 0 seconds, got {self.window_s!r}")
        for name in ("eta", "reference_lr", "approval_ttl_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise PolicyError(f"update policy: {name} must be a number > 0, got {value!r}")
        object.__setattr__(self, "merge", _merge_policy(self.merge, self.eta))
        approvals = {}
        for role, count in dict(self.approvals).items():
            parsed = Role.parse(role)
            if parsed not in (Role.EVALUATOR, Role.OPERATOR, Role.ROOT):
                raise PolicyError(f"update policy: approvals may need evaluator, operator or root keys, not {role!r}")
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                raise PolicyError(f"update policy: approvals[{role!r}] must be an integer >= 0, got {count!r}")
            if count:
                approvals[parsed.value] = count
        if not approvals:
            raise PolicyError("update policy: approvals must require at least one signature")
        object.__setattr__(self, "approvals", approvals)
        object.__setattr__(self, "probes", {str(k).strip("/"): str(v) for k, v in dict(self.probes).items()})

    @property
    def required_approvals(self) -> dict[Role, int]:
        return {Role.parse(r): n for r, n in self.approvals.items()}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any], base_dir: Path | None = None) -> UpdatePolicy:
        try:
            return cls._from_dict(obj, base_dir)
        except PolicyError:
            raise
        except (ValueError, TypeError) as exc:
            raise PolicyError(str(exc) if str(exc).startswith("update policy") else f"update policy: {exc}") from None

    @classmethod
    def _from_dict(cls, obj: Mapping[str, Any], base_dir: Path | None) -> UpdatePolicy:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise PolicyError(
                f"update policy: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values = dict(obj)
        if "screen" in values:
            values["screen"] = ScreenPolicy(**dict(values["screen"]))
        if "gate" in values:
            values["gate"] = GateBounds(**dict(values["gate"]))
        if "feedback" in values:
            values["feedback"] = FeedbackPolicy.from_dict(values["feedback"], base_dir)
        if "customize" in values:
            values["customize"] = CustomizePolicy.from_dict(values["customize"], base_dir)
        if "consolidate" in values:
            values["consolidate"] = DistillPolicy.from_dict("consolidate", values["consolidate"])
        if "rebase" in values:
            values["rebase"] = RebasePolicy.from_dict("rebase", values["rebase"], base_dir)
        # Text files are relative to the policy file.
        if base_dir is not None:
            values["probes"] = {k: str((base_dir / v).resolve()) for k, v in dict(values.get("probes", {})).items()}
            if values.get("canary"):
                values["canary"] = str((base_dir / values["canary"]).resolve())
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> UpdatePolicy:
        path = Path(path)
        try:
            obj = yaml.safe_load(path.read_text()) or {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise PolicyError(f"cannot read update policy {path}: {exc}") from None
        except RecursionError:  # PyYAML recurses once per nesting level
            raise PolicyError(f"cannot read update policy {path}: nested too deeply") from None
        if not isinstance(obj, dict):
            raise PolicyError(f"update policy {path} must be a mapping of fields")
        return cls.from_dict(obj, path.parent)

    @classmethod
    def for_tree(cls, root: str | Path, override: str | Path | None = None) -> UpdatePolicy:
        """``override``, else ``ROOT/update-policy.yaml`` when present, else the defaults."""
        if override is not None:
            return cls.from_file(override)
        file = Path(root) / POLICY_FILE
        return cls.from_file(file) if file.is_file() else cls()

    def with_(self, **changes: Any) -> UpdatePolicy:
        return replace(self, **changes)
