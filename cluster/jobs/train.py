"""Train one fine-tuning job's node: a LoRA child over its parent's served chain, gated on held-out text.

    trained = train_job(tree_dir, job, training_bytes, None, policy.customize, out_dir,
                        on_event=lambda message, data: ..., should_stop=lambda: False)
    trained.held_out_ppl < trained.parent_held_out_ppl   # else JobError("gate", ...) was raised

The training file's records become text (chat records through the base tokenizer's chat
template, or ``role: content`` lines when the base has none; plain documents as they are). When
the job has no validation file, ``policy.held_out`` of the records is held out. The child is
trained with the tree builder's own code (:mod:`nodes.build.training`): its ancestors (the
parent's chain as the snapshot serves it now) applied and frozen, a fresh LoRA of the job's rank
on the parent's layer kinds, and the forgetting guard: ``policy.replay`` of every batch drawn
from the parent's own training text (for a child of the base: its first-level nodes' texts),
plus ``policy.kl_weight`` x KL(child || parent) on those rows. Steps: ``n_epochs`` passes over
the training tokens, at most ``policy.max_steps``.

The gate: the child's perplexity on the held-out text must be below the parent's (both measured
on the same first :data:`MAX_GATE_TOKENS` tokens), otherwise ``JobError("gate", ...)`` with both
figures. Nothing is written outside ``out_dir``: the adapter (PEFT files) in ``out_dir/adapter``
and the rendered texts (``train.txt``, ``eval.txt``: the node's probe text for its later updates).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cluster.errors import BadArgument, JobCancelled, JobError
from cluster.jobs.data import ParsedFile, TrainingRecord, parse_training_file, split_held_out
from cluster.jobs.spec import Hyperparameters
from cluster.updates.policy import CustomizePolicy
from hierarchy.ids import NodeId
from hierarchy.spec import GuardSettings, LoraSettings, TrainSettings
from nodes.base.model import LoadedBase, load_base
from nodes.build.gate import node_text
from nodes.build.training import ChainPatch, perplexity, resolve_precision, tokenize_text, train_adapter
from nodes.errors import GateTextMissing, NodesError
from nodes.store.adapters import read_adapter, write_adapter
from nodes.store.tree import BuiltNode, BuiltTree
from nodes.store.versions import links_of, open_served_tree
from registry.jobs import JobRecord

__all__ = ["MAX_GATE_TOKENS", "EventSink", "TrainedNode", "render_records", "train_job"]

EventSink = Callable[[str, Mapping[str, Any]], None]  # (message, data) -> a job event
MAX_GATE_TOKENS = 32_768  # held-out tokens the gate measures (both models on the same ones)
_MAX_FORGETTING_TOKENS = 8_192  # of the parent's own text, for the forgetting figure
_MAX_REPLAY_CHARS = 2_000_000  # of the parent's training text, tokenized for replay
_MIN_SEQ_LEN = 8
_EVENT_EVERY_S = 1.0
_EVENT_EVERY_STEPS = 10
ADAPTER_DIR = "adapter"
TRAIN_TEXT = "train.txt"
EVAL_TEXT = "eval.txt"


@dataclass(frozen=True)
class TrainedNode:
    """A trained, gated child and its figures (plain values: it crosses processes as a dict)."""

    node: str
    parent: str
    out_dir: str  # holds adapter/ (PEFT files), train.txt and eval.txt
    over: tuple[Mapping[str, Any], ...]  # the parent's served chain it was trained over (ChainLink dicts)
    held_out_ppl: float
    parent_held_out_ppl: float
    steps: int
    tokens: int  # training tokens seen (own + replay)
    train_tokens: int  # tokens of the training text
    held_out_tokens: int  # tokens the gate measured
    train_loss_first: float
    train_loss_last: float
    train_seconds: float
    gate_seconds: float
    precision: str
    lora: Mapping[str, Any]
    training: Mapping[str, Any]
    data: Mapping[str, Any]  # sha256 of the uploaded files, held-out source, replay source
    forgetting: float | None = None  # relative perplexity rise on the parent's own text (not gated)
    parent_text_ppl: float | None = None
    parent_text_parent_ppl: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def adapter_dir(self) -> Path:
        return Path(self.out_dir) / ADAPTER_DIR

    def metrics(self) -> dict[str, Any]:
        """What node.json's ``metrics`` and the job's result record."""
        return {
            "held_out_ppl": self.held_out_ppl,
            "parent_held_out_ppl": self.parent_held_out_ppl,
            "specialisation_gain": 1.0 - self.held_out_ppl / self.parent_held_out_ppl,
            "forgetting": self.forgetting,
            "parent_text_ppl": self.parent_text_ppl,
            "parent_text_parent_ppl": self.parent_text_parent_ppl,
            "train_loss_first": self.train_loss_first,
            "train_loss_last": self.train_loss_last,
            "steps": self.steps,
            "tokens": self.tokens,
            "train_seconds": round(self.train_seconds, 3),
            "gate_seconds": round(self.gate_seconds, 3),
            "precision": self.precision,
        }

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["over"] = [dict(x) for x in self.over]
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> TrainedNode:
        values = dict(obj)
        values["over"] = tuple(dict(x) for x in values.get("over", ()))
        return cls(**values)


# -- texts -------------------------------------------------------------------------------------------
def _plain_chat(messages: Sequence[Mapping[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def render_records(tokenizer: Any, records: Sequence[TrainingRecord]) -> list[str]:
    """Each record as one training document: chats through the tokenizer's chat template (or
    ``role: content`` lines without one), plain documents as they are."""
    template = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for record in records:
        if record.text is not None:
            out.append(record.text)
            continue
        messages = [{"role": m.role, "content": m.content} for m in record.messages]
        text = None
        if template:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception:  # a template that refuses this shape of chat (e.g. no system role)
                text = None
        out.append(text if isinstance(text, str) and text.strip() else _plain_chat(messages))
    return out


def _tokens(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """The documents as one stream, [n] int64, each followed by EOS (a chat is never split)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer(doc, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(int(eos))
    return torch.tensor(ids, dtype=torch.long)


def _parent_texts(tree: BuiltTree, parent: NodeId, kind: str) -> tuple[str, list[str]]:
    """(label, texts): the parent's own ``kind`` text; for the base, its first-level nodes' texts."""
    nodes: list[BuiltNode] = (
        [n for n in tree.nodes if n.parent_id.is_base] if parent.is_base else [tree.chain(parent)[-1]]
    )
    texts, labels = [], []
    for node in nodes:
        try:
            text = node_text(tree, node, kind)
        except GateTextMissing:
            try:  # moved since the build: its probe text stands in, as the update desk does
                text = node_text(tree, node, "eval")
            except GateTextMissing:
                continue
        texts.append(text.text)
        labels.append(str(node.node_id))
    return ",".join(labels), texts


# -- progress ----------------------------------------------------------------------------------------
class _Progress:
    """Step events at most every second or every 10 steps (and the last), cancellation between steps."""

    def __init__(self, on_event: EventSink | None, should_stop: Callable[[], bool] | None):
        self._on_event = on_event
        self._should_stop = should_stop
        self._last = 0.0

    def event(self, message: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(message, data)

    def check(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise JobCancelled("the job was cancelled while it trained")

    def step(self, step: int, total: int, loss: float) -> None:
        now = time.monotonic()
        if step == total or step % _EVENT_EVERY_STEPS == 0 or now - self._last >= _EVENT_EVERY_S:
            self._last = now
            self.event(
                f"Step {step}/{total}: training loss={loss:.4f}",
                phase="training",
                step=step,
                total_steps=total,
                loss=loss,
            )
        self.check()


# -- the job -----------------------------------------------------------------------------------------
def _parse(content: bytes, name: str, what: str) -> ParsedFile:
    try:
        return parse_training_file(content, name)
    except BadArgument as exc:
        raise JobError("data", f"{what}: {exc}") from None


def _lora(tree: BuiltTree, chain: Sequence[BuiltNode], rank: int) -> LoraSettings:
    """The job's rank on the parent's layer kinds and scale (alpha / r); a child of the base takes
    its first-level nodes' settings."""
    model = chain[-1] if chain else next((n for n in tree.nodes if n.parent_id.is_base), None)
    settings = dict(model.lora) if model is not None and model.lora else {}
    scale = float(settings.get("alpha", 16.0)) / float(settings.get("r", 8) or 8)
    targets = tuple(settings.get("target_modules") or LoraSettings().target_modules)
    return LoraSettings(r=rank, alpha=scale * rank, dropout=0.0, target_modules=targets)


def train_job(
    tree_dir: str | Path,
    job: JobRecord,
    training: bytes,
    validation: bytes | None,
    policy: CustomizePolicy,
    out_dir: str | Path,
    *,
    training_name: str = "",
    validation_name: str = "",
    on_event: EventSink | None = None,
    should_stop: Callable[[], bool] | None = None,
    base: LoadedBase | None = None,
    seed: int = 0,
) -> TrainedNode:
    """Train, measure and gate ``job``'s node (see the module docstring); JobError with a code otherwise.

    ``should_stop`` is asked between steps (JobCancelled when it says yes); ``base``: an already
    loaded base (patched in place for the duration; the caller keeps others off it)."""
    progress = _Progress(on_event, should_stop)
    hyper = Hyperparameters.from_dict(job.hyperparameters)
    train_file = _parse(training, training_name, "training_file")
    held_file = _parse(validation, validation_name, "validation_file") if validation is not None else None
    if held_file is None:
        try:
            train_records, held_records = split_held_out(train_file.records, policy.held_out)
        except BadArgument as exc:
            raise JobError("data", f"training_file: {exc}") from None
    else:
        train_records, held_records = list(train_file.records), list(held_file.records)

    try:
        tree = open_served_tree(tree_dir)
        parent = NodeId.parse(job.parent)
        chain = tree.chain(parent)
    except NodesError as exc:
        raise JobError("parent", f"the parent {job.parent} is not served from {tree_dir}: {exc}") from None
    progress.event(f"loading the base of {tree.name}", phase="loading")
    progress.check()
    try:
        loaded = base or load_base(tree.base_dir, digest=tree.base_digest)
        ancestors = [read_adapter(n.directory, expected_sha256=n.sha256) for n in chain]
    except NodesError as exc:
        raise JobError("training", f"cannot load the parent's chain: {exc}") from None
    tokenizer, model = loaded.tokenizer, loaded.model
    train_docs, held_docs = render_records(tokenizer, train_records), render_records(tokenizer, held_records)
    own = _tokens(tokenizer, train_docs)
    held = _tokens(tokenizer, held_docs)[:MAX_GATE_TOKENS]
    seq_len = min(policy.max_seq_len, int(own.numel()) - 1)
    if seq_len < _MIN_SEQ_LEN or held.numel() < 2:
        raise JobError(
            "data",
            f"the training text has {own.numel()} tokens and the held-out text {held.numel()}: too little to "
            "train and gate a node; upload more text",
        )
    replay_label, replay_texts = _parent_texts(tree, parent, "train")
    replay_text = "\n\n".join(replay_texts)[:_MAX_REPLAY_CHARS]
    replay = tokenize_text(tokenizer, replay_text) if replay_text.strip() else None
    ref_label, ref_texts = _parent_texts(tree, parent, "eval")
    reference = tokenize_text(tokenizer, "\n\n".join(ref_texts))[:_MAX_FORGETTING_TOKENS] if ref_texts else None
    per_step = hyper.batch_size * seq_len
    steps = max(1, min(policy.max_steps, math.ceil(hyper.n_epochs * int(own.numel()) / per_step)))
    settings = TrainSettings(
        steps=steps, lr=hyper.learning_rate, batch_size=hyper.batch_size, max_seq_len=seq_len, seed=seed
    )
    guard = GuardSettings(replay=policy.replay, kl_weight=policy.kl_weight)
    lora = _lora(tree, chain, hyper.lora_rank)
    precision = resolve_precision("auto", model)

    with ChainPatch(model, ancestors, lora, seed=seed) as patch:
        progress.event("measuring the parent on the held-out text", phase="measuring")
        gate_started = time.perf_counter()
        patch.set_own_enabled(False)
        parent_ppl = perplexity(model, held, seq_len)
        parent_ref = perplexity(model, reference, seq_len) if reference is not None and reference.numel() > 1 else None
        patch.set_own_enabled(True)
        gate_s = time.perf_counter() - gate_started
        progress.check()
        progress.event(f"training {steps} steps over {own.numel()} tokens", phase="training", step=0, total_steps=steps)
        try:
            result = train_adapter(
                model, patch, own, replay, settings, guard, precision=precision, on_step=progress.step
            )
        except NodesError as exc:
            raise JobError("training", str(exc)) from None
        progress.event("evaluating on the held-out text", phase="evaluating")
        gate_started = time.perf_counter()
        child_ppl = perplexity(model, held, seq_len)
        child_ref = perplexity(model, reference, seq_len) if parent_ref is not None and reference is not None else None
        gate_s += time.perf_counter() - gate_started
        adapter = patch.own_adapter()
    figures = {"held_out_ppl": child_ppl, "parent_held_out_ppl": parent_ppl, "steps": result.steps}
    progress.event(f"held-out perplexity {child_ppl:.4f}, the parent's {parent_ppl:.4f}", phase="evaluated", **figures)
    if not child_ppl < parent_ppl:
        raise JobError(
            "gate",
            f"the new node does not beat its parent on the held-out text: perplexity {child_ppl:.4f}, the "
            f"parent's {parent_ppl:.4f} ({held.numel()} tokens); nothing was served or stored. Upload more "
            "or more consistent data, or change the hyperparameters",
            figures | {"held_out_tokens": int(held.numel())},
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_adapter(adapter, out / ADAPTER_DIR, base_model_name_or_path=str(tree.base_dir))
    (out / TRAIN_TEXT).write_text("\n\n".join(train_docs) + "\n")
    (out / EVAL_TEXT).write_text("\n\n".join(held_docs) + "\n")
    forgetting = None if child_ref is None or parent_ref is None else child_ref / parent_ref - 1.0
    return TrainedNode(
        node=job.node,
        parent=job.parent,
        out_dir=str(out),
        over=tuple(x.to_dict() for x in links_of(chain)),
        held_out_ppl=child_ppl,
        parent_held_out_ppl=parent_ppl,
        steps=result.steps,
        tokens=result.tokens,
        train_tokens=int(own.numel()),
        held_out_tokens=int(held.numel()),
        train_loss_first=result.first_loss,
        train_loss_last=result.last_loss,
        train_seconds=result.seconds,
        gate_seconds=gate_s,
        precision=result.precision,
        lora=lora.to_dict(),
        training=settings.to_dict() | {"n_epochs": hyper.n_epochs, "precision": result.precision},
        data={
            "training_file": {"id": job.training_file, "sha256": train_file.sha256, "records": len(train_records)},
            "validation_file": (
                {"id": job.validation_file, "sha256": held_file.sha256, "records": len(held_records)}
                if held_file is not None
                else None
            ),
            "held_out": {"records": len(held_records), "share": None if held_file is not None else policy.held_out},
            "replay": replay_label or None,
            "reference": ref_label or None,
        },
        forgetting=forgetting,
        parent_text_ppl=child_ref,
        parent_text_parent_ppl=parent_ref,
    )
