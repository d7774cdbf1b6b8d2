"""Forgetting, measured: what one update of a child does to its parent, siblings and ancestors.

    figures = measure_update(bench, policy, view, "en/medical/oncology", new_adapter, update_text)
    figures.parent_gain              # the parent's relative perplexity fall on the update's own text
    figures.max_sibling_regression   # the largest rise of a sibling's own-probe perplexity
    figures.max_ancestor_change      # the largest |change| of the parent chain on an ancestor's text

The candidate is the one the protocol would make (``build_candidate``: same merge, eta, gate), so
these figures are what the gate sees, plus the two it does not measure: the gain on the update's
text and the ancestors' texts under the new parent. Relative changes: 0.02 = 2%.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cluster.updates.pins import TreeView
from cluster.updates.policy import UpdatePolicy
from cluster.updates.rounds import CandidateBuild, build_candidate
from cluster.updates.workbench import Workbench
from nodes.build.finetune import increment
from nodes.build.gate import Comparison, EvalText
from nodes.store.adapters import AdapterWeights

__all__ = ["UpdateFigures", "measure_update"]


@dataclass(frozen=True)
class UpdateFigures:
    """One update of one child at one merge setting: what its candidate parent does."""

    method: str  # the merge policy's method (as configured: auto is not resolved here)
    eta: float
    parent_gain: float  # 1 - ppl_after / ppl_before of the parent chain on the update's text
    max_sibling_regression: float  # max over siblings of their probe's relative change (>0: worse)
    max_ancestor_change: float  # max |relative change| of the parent chain on an ancestor's eval text
    parent_own_change: float  # relative change on the parent's own held-out text
    gate_passed: bool
    siblings: Mapping[str, float] = field(default_factory=dict)  # sibling path -> relative change
    ancestors: Mapping[str, float] = field(default_factory=dict)  # ancestor path -> relative change
    build: CandidateBuild | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "eta": self.eta,
            "parent_gain": self.parent_gain,
            "max_sibling_regression": self.max_sibling_regression,
            "max_ancestor_change": self.max_ancestor_change,
            "parent_own_change": self.parent_own_change,
            "gate_passed": self.gate_passed,
            "siblings": dict(self.siblings),
            "ancestors": dict(self.ancestors),
        }


def measure_update(
    bench: Workbench,
    policy: UpdatePolicy,
    view: TreeView,
    path: str,
    new: AdapterWeights,
    update_text: EvalText,
) -> UpdateFigures:
    """The candidate parent ``policy`` makes from node ``path``'s update to ``new``, measured
    (screening is left out: an honest update passes it, and clipping is not what is measured)."""
    parent = view.parent(path)
    if not parent:
        raise ValueError(f"{path} is a first-level node: no parent absorbs its updates")
    current = view.pins[path].link
    delta = increment(bench.adapter(current), new)
    # The gate caches perplexities by these keys: one per adapter and merge setting.
    key = f"measure-{path}-{id(new)}-{policy.merge}-{policy.consolidate}-{policy.eta}"
    build = build_candidate(
        bench,
        policy,
        view,
        parent,
        [(key, delta, 1.0)],
        override=(path, new, key),
        own_check=(path, current),
        sources=(path,),
    )
    parent_chain = view.chain(parent)
    before = bench.adapters(parent_chain)
    after = [*bench.adapters(parent_chain[:-1]), build.adapter]
    after_key = ("candidate", tuple(parent_chain), (key,))
    comparisons = [Comparison("update text", "parent", update_text, before, after, tuple(parent_chain), after_key)]
    ancestors = [a for a in _ancestors(view, parent)]
    comparisons += [
        Comparison(f"ancestor {a}", "parent", bench.probe(a), before, after, tuple(parent_chain), after_key)
        for a in ancestors
    ]
    extra = bench.measure(f"forgetting of {view.node_id(parent)}", comparisons)
    gain = -extra.checks[0].change
    anc = {a: c.change for a, c in zip(ancestors, extra.checks[1:], strict=True)}
    siblings = {}
    own = 0.0
    for check in build.report.checks:
        if check.kind == "parent":
            own = check.change
        elif check.name.startswith("probe "):
            child = view.path_of(check.name.removeprefix("probe "))
            if child != path:
                siblings[child] = check.change
    return UpdateFigures(
        method=policy.merge.method,
        eta=policy.eta,
        parent_gain=gain,
        max_sibling_regression=max(siblings.values(), default=0.0),
        max_ancestor_change=max((abs(v) for v in anc.values()), default=0.0),
        parent_own_change=own,
        gate_passed=build.report.passed,
        siblings=siblings,
        ancestors=anc,
        build=build,
    )


def _ancestors(view: TreeView, path: str) -> list[str]:
    out = []
    node = view.parent(path)
    while node:
        out.append(node)
        node = view.parent(node)
    return out
