"""Matching a task and a device to nodes and variants: a pure function over candidate rows.

:mod:`registry.candidates` fetches the rows with one indexed query; here we
only compute. For every matching node's accepted ``stable`` version and each of
its variants we estimate memory (:mod:`registry.memory`), classify the fit,
estimate speed and score:

    score = 0.60 specificity + 0.20 evaluation + 0.15 fit + 0.05 speed

specificity: how much of the task the node covers (1.0 = the deepest node asked
for); evaluation: the version's ``eval_score`` in [0, 1]; fit: perfect 1.0,
good 0.67, marginal 0.33; speed: tokens/s relative to the fastest candidate
(0 when unknown). Ties go to the variant that serves most faithfully
(merged, flat, chain, half precision, GGUF F16 and LoRA, then Q8_0 and Q4_0) and then
to the smaller one.

A context the user did not ask for adapts to each model (the smaller of
:data:`~registry.matchtypes.DEFAULT_CONTEXT` and the model's limit); only an
explicit context rules a model out. A path task (``en/medical/radiology``) also
matches nodes that declare its segments as language, domain and sub-domain, so a
tree that names its nodes ``en/med/radio`` is found as well. Every candidate
carries the reasons behind its place; when nothing fits, suggestions say what
would (a shorter context, a smaller variant, a shallower node, remote serving).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from registry.matchtypes import DEFAULT_CONTEXT, CandidateRow, Hardware, MatchRequest, TaskQuery
from registry.memory import (
    MemoryEstimate,
    classify_fit,
    estimate_memory,
    estimate_speed,
    format_bytes,
    max_context_that_fits,
    weights_format,
)
from registry.records import VariantFacts
from registry.vocab import VARIANT_KINDS

__all__ = [
    "WEIGHTS",
    "Candidate",
    "MatchResult",
    "Suggestion",
    "evaluation_score",
    "match_candidates",
    "specificity",
]

WEIGHTS = {"specificity": 0.60, "evaluation": 0.20, "fit": 0.15, "speed": 0.05}
FIT_VALUE = {"perfect": 1.0, "good": 0.67, "marginal": 0.33}
# Lower is preferred when everything else ties: the most faithful way to serve the node first.
# Perplexity of the version on its own eval text: the tree builder writes ``eval_ppl``.
PERPLEXITY_KEYS = ("eval_ppl", "perplexity")
VARIANT_PREFERENCE = {
    "merged": 0,
    "flat": 1,
    "chain": 2,
    "merged-bf16": 3,
    "merged-fp16": 4,
    "gguf-f16": 5,
    "gguf-lora": 6,
    "merged-int8": 7,
    "gguf-q4_0": 8,
}
# float16 safetensors on a CPU: torch computes fp16 matmuls slowly there, and the GGUF
# variants (llama.cpp: CPU, CUDA, Metal) serve CPUs in 16 or fewer bits instead.
GPU_ONLY_VARIANTS = frozenset({"merged-fp16"})
# Offered for a node only when none of its other variants fits: 4-bit weights cost a small model
# far more than 8-bit ones (SmolLM2-135M: eval perplexity x1.6 in Q4_0, x1.007 in Q8_0; see
# benchmarks/variants_bench.py), and their speed would otherwise rank them first.
LAST_RESORT_VARIANTS = frozenset({"gguf-q4_0"})


@dataclass(frozen=True)
class Candidate:
    """One (node, version, variant) that fits the device, with its score and the reasons for it."""

    node_id: str
    version: int
    variant: str
    fit: str  # perfect | good | marginal
    memory: MemoryEstimate
    utilisation: float  # memory.total / available memory
    tokens_per_second: float | None
    score: float
    specificity: float
    evaluation: float | None
    variant_bytes: int
    bytes_estimated: bool
    reasons: tuple[str, ...]

    @property
    def memory_bytes(self) -> int:
        return self.memory.total

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node_id,
            "version": self.version,
            "variant": self.variant,
            "fit": self.fit,
            "memory_bytes": self.memory.total,
            "score": self.score,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Suggestion:
    """Something that would fit when nothing does: kind is shorter-context, smaller-variant,
    shallower-node or remote."""

    kind: str
    message: str
    node_id: str | None = None
    variant: str | None = None
    context: int | None = None
    fit: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "node": self.node_id,
            "variant": self.variant,
            "context": self.context,
            "fit": self.fit,
        }


@dataclass(frozen=True)
class MatchResult:
    request: MatchRequest
    candidates: tuple[Candidate, ...]
    suggestions: tuple[Suggestion, ...]
    target: str | None = None  # the most specific node the task reached
    notes: tuple[str, ...] = field(default=())  # nodes skipped on the way and why

    def to_json(self) -> dict[str, Any]:
        return {
            "candidates": [c.to_json() for c in self.candidates],
            "suggestions": [s.to_json() for s in self.suggestions],
        }


def evaluation_score(metrics: Mapping[str, Any]) -> float | None:
    """A version's evaluation in [0, 1]: its ``eval_score``, else 1 / (1 + ln perplexity) on its own eval text."""
    value = metrics.get("eval_score")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return min(1.0, max(0.0, float(value)))
    ppl = next((metrics[k] for k in PERPLEXITY_KEYS if metrics.get(k) is not None), None)
    if isinstance(ppl, (int, float)) and not isinstance(ppl, bool) and math.isfinite(ppl) and ppl >= 1.0:
        return 1.0 / (1.0 + math.log(ppl))
    return None


def _attribute_matches(row: CandidateRow, task: TaskQuery) -> int | None:
    """How many of the task's attributes the node matches; None when it is not on the task's way.

    The node's own (deepest set) attribute must be one the task asks for; its
    shallower attributes must agree with the task where the task names them.
    """
    requested = task.attributes
    own = [(i, getattr(row, name)) for i, (name, _) in enumerate(requested) if getattr(row, name) is not None]
    if not own:
        return 0 if row.depth == 0 else None
    matched = 0
    for i, have in own:
        wanted = requested[i][1]
        if wanted is None:
            if i == own[-1][0]:
                return None
            continue
        if have != wanted:
            return None
        matched += 1
    return matched


def specificity(row: CandidateRow, task: TaskQuery) -> float | None:
    """The share of the task a node covers, in [0, 1]; None when the node does not match the task."""
    if task.tree is not None and row.tree != task.tree:
        return None
    overlap = len(set(row.tags) & set(task.tags)) / len(task.tags) if task.tags else 0.0
    if task.path is not None:
        segments = task.path.split("/")
        lineage = {"/".join(segments[:i]) for i in range(len(segments) + 1)}
        by_path = row.depth if row.path in lineage else None
        attributes = task.path_attributes()
        by_attributes = _attribute_matches(row, attributes) if attributes is not None else None
        if by_path is None and by_attributes is None:
            return None
        levels, matched = len(segments), max(m for m in (by_path, by_attributes) if m is not None)
    elif task.has_attributes:
        found = _attribute_matches(row, task)
        if found is None:
            return None
        levels, matched = sum(1 for _, v in task.attributes if v is not None), found
    else:  # tags only: the base always, other nodes when they carry a tag
        if row.depth and not overlap:
            return None
        levels, matched = 0, 0
    parts = levels + (1 if task.tags else 0)
    return (matched + overlap) / parts if parts else 0.0


def _speed(row: CandidateRow, estimate: MemoryEstimate, hw: Hardware) -> tuple[float | None, str]:
    variant = row.variant
    assert variant is not None
    if variant.tokens_per_second and variant.measured_device == hw.device:
        return variant.tokens_per_second, f"measured {variant.tokens_per_second:.1f} tokens/s on {hw.device}"
    tps = estimate_speed(
        estimate,
        parameters=row.base.parameter_count + variant.adapter_parameters,
        bandwidth=hw.bandwidth,
        compute=hw.compute,
    )
    if tps is None:
        return None, "speed unknown: pass --bandwidth (e.g. 50GB/s) to estimate it"
    read = estimate.weights + estimate.adapters + estimate.kv_cache
    basis = f"{hw.bandwidth / 1e9:.1f} GB/s / {format_bytes(read)} read per token" if hw.bandwidth else "compute bound"
    return tps, f"about {tps:.1f} tokens/s per sequence ({basis})"


def _memory_reason(e: MemoryEstimate, available: int, fit: str | None, kind: str) -> str:
    verdict = f"{fit} fit" if fit else "does not fit"
    return (
        f"needs {format_bytes(e.total)} of {format_bytes(available)} ({100 * e.total / available:.1f}%): {verdict}; "
        f"weights {format_bytes(e.weights)} ({weights_format(kind, e.dtype)}) + adapters {format_bytes(e.adapters)} + KV cache "
        f"{format_bytes(e.kv_cache)} ({e.context} tokens x batch {e.batch} x {format_bytes(e.kv_per_token)}/token) "
        f"+ runtime overhead {format_bytes(e.overhead)}"
    )


def _estimate(
    row: CandidateRow, variant: VariantFacts, req: MatchRequest, context: int | None = None
) -> MemoryEstimate:
    hw = req.hardware
    return estimate_memory(
        row.base,
        variant.kind,
        variant.adapter_parameters,
        device=hw.device,
        dtype=hw.serving_dtype,
        context=context or req.context_for(row.base.max_context),
        batch=req.batch,
    )


@dataclass(frozen=True)
class _Scored:
    row: CandidateRow
    spec: float
    evaluation: float | None
    estimate: MemoryEstimate
    fit: str | None
    tps: float | None
    speed_reason: str
    too_long: bool  # the context exceeds the base's maximum


def match_candidates(rows: list[CandidateRow] | tuple[CandidateRow, ...], request: MatchRequest) -> MatchResult:
    """Rank the candidate rows for the request; pure (no I/O), deterministic."""
    task, hw = request.task, request.hardware
    visible = [
        r for r in rows if r.visibility == "public" or (request.tenant is not None and r.owner == request.tenant)
    ]
    specs = {r.node_id: found for r in visible if (found := specificity(r, task)) is not None}
    if not specs:
        return MatchResult(request, (), (_remote(None, None),), None, ())
    by_node: dict[str, CandidateRow] = {}
    for r in visible:
        if r.node_id in specs:
            by_node.setdefault(r.node_id, r)
    best = max(specs.values())
    target = min(n for n in specs if specs[n] == best)  # several trees may reach the same depth
    notes: list[str] = []
    scored: list[_Scored] = []
    for node_id in sorted(specs, key=lambda n: (-specs[n], n)):
        row = by_node[node_id]
        if row.version is None:
            notes.append(f"{node_id} skipped: it has no stable version")
            continue
        if row.version_status != "accepted":
            notes.append(f"{node_id} skipped: its stable version {row.version} is {row.version_status}")
    for r in visible:
        if r.node_id not in specs or r.variant is None or r.version_status != "accepted":
            continue
        if r.variant.kind in GPU_ONLY_VARIANTS and hw.device == "cpu":
            continue
        estimate = _estimate(r, r.variant, request)
        too_long = request.exceeds(r.base.max_context)
        fit = None if too_long else classify_fit(estimate.total, hw.memory)
        tps, why = _speed(r, estimate, hw)
        scored.append(_Scored(r, specs[r.node_id], evaluation_score(r.metrics), estimate, fit, tps, why, too_long))
    for s in scored:
        if s.too_long:
            note = (
                f"context {request.context} exceeds the maximum context {s.row.base.max_context} of base "
                f"{s.row.base.model} ({s.row.tree})"
            )
            if note not in notes:
                notes.append(note)
    fitting = [s for s in scored if s.fit is not None]
    better = {s.row.node_id for s in fitting if s.row.variant and s.row.variant.kind not in LAST_RESORT_VARIANTS}
    fitting = [s for s in fitting if s.row.node_id not in better or s.row.variant.kind not in LAST_RESORT_VARIANTS]  # type: ignore[union-attr]
    fastest = max((s.tps for s in fitting if s.tps), default=None)
    candidates = sorted(
        (_candidate(s, request, best, fastest, notes, scored) for s in fitting),
        key=lambda c: (-c.score, VARIANT_PREFERENCE[c.variant], c.memory.total, c.node_id),
    )
    suggestions = () if candidates else _suggest(scored, request, by_node)
    return MatchResult(request, tuple(candidates[: request.top]), tuple(suggestions), target, tuple(notes))


def _candidate(
    s: _Scored, req: MatchRequest, best: float, fastest: float | None, notes: list[str], scored: list[_Scored]
) -> Candidate:
    row, variant = s.row, s.row.variant
    assert variant is not None and s.fit is not None and row.version is not None
    speed_share = (s.tps / fastest) if (s.tps and fastest) else 0.0
    score = (
        WEIGHTS["specificity"] * s.spec
        + WEIGHTS["evaluation"] * (s.evaluation or 0.0)
        + WEIGHTS["fit"] * FIT_VALUE[s.fit]
        + WEIGHTS["speed"] * speed_share
    )
    reasons = [_match_reason(row, s.spec, req.task, best)]
    if s.spec < best:  # a fallback: say why the more specific nodes are not above it
        reasons.extend(notes)
        for node_id in sorted({o.row.node_id for o in scored if o.spec == best}):
            deeper = [o for o in scored if o.row.node_id == node_id]
            if deeper and all(o.fit is None for o in deeper):
                smallest = min(deeper, key=lambda o: o.estimate.total)
                reasons.append(
                    f"{node_id} does not fit: its smallest variant ({smallest.row.variant.kind}) needs "  # type: ignore[union-attr]
                    f"{format_bytes(smallest.estimate.total)}"
                )
    pinned = f", pinned to parent version {row.parent_version}" if row.parent_version is not None else ""
    evaluation = f"eval score {s.evaluation:.2f}" if s.evaluation is not None else "no evaluation score recorded"
    reasons.append(f"stable version {row.version} (accepted{pinned}); {evaluation}")
    if req.context is None and s.estimate.context < DEFAULT_CONTEXT:
        reasons.append(
            f"context {s.estimate.context}: the limit of base {row.base.model} (the default is {DEFAULT_CONTEXT}; "
            "pass --context to ask for a length)"
        )
    reasons.append(_memory_reason(s.estimate, req.hardware.memory, s.fit, variant.kind))
    reasons.append(s.speed_reason)
    origin = "estimated from the architecture" if variant.bytes_estimated else "measured"
    reasons.append(f"variant {variant.kind}: {format_bytes(variant.bytes)} to download ({origin})")
    reasons.append(
        f"score {score:.3f} = 0.60 x specificity {s.spec:.2f} + 0.20 x eval {s.evaluation or 0.0:.2f} "
        f"+ 0.15 x fit {FIT_VALUE[s.fit]:.2f} + 0.05 x speed {speed_share:.2f}"
    )
    return Candidate(
        node_id=row.node_id,
        version=row.version,
        variant=variant.kind,
        fit=s.fit,
        memory=s.estimate,
        utilisation=s.estimate.total / req.hardware.memory,
        tokens_per_second=s.tps,
        score=round(score, 4),
        specificity=s.spec,
        evaluation=s.evaluation,
        variant_bytes=variant.bytes,
        bytes_estimated=variant.bytes_estimated,
        reasons=tuple(reasons),
    )


def _match_reason(row: CandidateRow, spec: float, task: TaskQuery, best: float) -> str:
    tags = sorted(set(row.tags) & set(task.tags))
    tag_text = f"; tags matched: {', '.join(tags)}" if tags else ""
    if spec >= 1.0:
        return f"exact match for task {task.describe()}{tag_text}"
    if spec == best:
        return f"most specific node for task {task.describe()} (covers {spec:.0%} of it){tag_text}"
    return f"fallback to a shallower node: {row.node_id} covers {spec:.0%} of task {task.describe()}{tag_text}"


def _hypothetical(row: CandidateRow, kind: str, adapter_parameters: int) -> CandidateRow:
    """The row as if ``kind`` were exported (sizes estimated from the architecture)."""
    return replace(
        row, variant=VariantFacts(kind=kind, bytes=0, bytes_estimated=True, adapter_parameters=adapter_parameters)
    )


def _suggest(scored: list[_Scored], req: MatchRequest, by_node: dict[str, CandidateRow]) -> list[Suggestion]:
    """What would fit when nothing does, most specific first, then remote serving."""
    out: list[Suggestion] = []
    if not scored:
        return [_remote(None, None)]
    best_spec = max(s.spec for s in scored)
    deepest = [s for s in scored if s.spec == best_spec]
    # 1. a shorter context for the most specific node's most compact variant
    options = []
    for s in deepest:
        limit = min(max_context_that_fits(s.estimate, req.hardware.memory), s.row.base.max_context)
        options.append((limit, -VARIANT_PREFERENCE[s.row.variant.kind], s))  # type: ignore[union-attr]
    limit, _, s = max(options, key=lambda o: (o[0], o[1]))
    variant = s.row.variant
    if limit >= 1 and variant is not None:
        context = limit - limit % 128 if limit >= 256 else limit
        fit = classify_fit(_estimate(s.row, variant, req, context).total, req.hardware.memory)
        out.append(
            Suggestion(
                "shorter-context",
                f"use --context {context} (or less) with {s.row.node_id} {variant.kind}: {fit} fit",
                s.row.node_id,
                variant.kind,
                context,
                fit,
            )
        )
    # 2. a smaller variant not yet exported, for the most specific node first, then shallower ones
    registered: dict[str, set[str]] = {}
    adapters: dict[str, int] = {}
    for o in scored:
        registered.setdefault(o.row.node_id, set()).add(o.row.variant.kind)  # type: ignore[union-attr]
        if o.row.variant.kind in ("chain", "flat"):  # type: ignore[union-attr]
            adapters[o.row.node_id] = o.row.variant.adapter_parameters  # type: ignore[union-attr]
    seen_nodes = sorted(
        {o.row.node_id for o in scored}, key=lambda n: -max(x.spec for x in scored if x.row.node_id == n)
    )
    for node_id in seen_nodes:
        row = by_node[node_id]
        if req.exceeds(row.base.max_context):
            continue
        for kind in sorted(set(VARIANT_KINDS) - registered[node_id], key=lambda k: VARIANT_PREFERENCE[k]):
            if kind in GPU_ONLY_VARIANTS and req.hardware.device == "cpu":
                continue
            hypo = _hypothetical(row, kind, adapters.get(node_id, 0))
            estimate = _estimate(hypo, hypo.variant, req)  # type: ignore[arg-type]
            fit = classify_fit(estimate.total, req.hardware.memory)
            if fit is None:
                continue
            spec = max(x.spec for x in scored if x.row.node_id == node_id)
            shallower = spec < best_spec
            out.append(
                Suggestion(
                    "shallower-node" if shallower else "smaller-variant",
                    f"export {kind} for {'the shallower node ' if shallower else ''}{node_id} "
                    f"(`treelm export TREE_DIR {node_id} --variant {kind}`, then `treelm registry import TREE_DIR`): "
                    f"about {format_bytes(estimate.total)}, {fit} fit",
                    node_id,
                    kind,
                    estimate.context,
                    fit,
                )
            )
            break
        if any(o.kind in ("smaller-variant", "shallower-node") for o in out):
            break
    target_row = deepest[0].row
    out.append(_remote(target_row.node_id, target_row.endpoint))
    return out


def _remote(node_id: str | None, endpoint: str | None) -> Suggestion:
    if node_id and endpoint:
        message = (
            f"serve {node_id} remotely: the cluster serves it at {endpoint} "
            f"(Python: treelm.Client('{endpoint}').generate('{node_id}', ...))"
        )
    elif node_id:
        message = f"serve {node_id} remotely on the cluster (`treelm serve TREE_DIR`) and call it with the treelm SDK"
    else:
        message = "serve the tree remotely on the cluster (`treelm serve TREE_DIR`) and call it with the treelm SDK"
    return Suggestion("remote", message, node_id, None, None, None)
