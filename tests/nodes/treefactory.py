"""Write a *built tree* with random adapters, in the exact on-disk layout of nodes.store.tree.

For engine tests and benchmarks: real PEFT-format adapters (safetensors +
adapter_config.json, loadable by stock peft), mixed ranks and target modules,
chains up to depth 3, a private node, node.json with sha256 of every file.

    from tests.nodes.treefactory import make_random_tree, balanced_spec
    tree = make_random_tree(tmp_path / "tree", tiny_base_dir)              # the default mixed tree
    tree = make_random_tree(out, base_dir, balanced_spec(2, 4, 16))       # 128 leaves of depth 3
    ref = MergedReference(tiny_base_dir, tree)                             # greedy tokens of merged models
    ref.tokens("rt/en/medical", prompt_ids, max_new=8)
    ref.log_softmax("rt/en/medical", prompt_ids + completion_ids)          # what logprobs must equal
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hierarchy.chain import LoraFactors
from nodes.base.model import base_digest, load_base
from nodes.build.compose import merge_chain
from nodes.store.adapters import AdapterWeights, read_adapter, write_adapter
from nodes.store.digest import sha256_file
from nodes.store.tree import NODE_RECORD, TREE_RECORD, BuiltTree, node_dir, open_tree

__all__ = ["DEFAULT_NODES", "MergedReference", "RandomNode", "RandomTreeSpec", "balanced_spec", "make_random_tree"]

_LEVELS = {1: "language", 2: "domain", 3: "subdomain"}


@dataclass(frozen=True)
class RandomNode:
    path: str  # e.g. "en/medical/radiology"; parents must come first in the spec
    r: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module kinds (last name segment)
    version: int = 1
    visibility: str = "public"
    owner: str | None = None


DEFAULT_NODES: tuple[RandomNode, ...] = (
    RandomNode("en", r=8, alpha=16.0, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    RandomNode("en/medical", r=4, alpha=4.0, targets=("q_proj", "v_proj", "up_proj"), version=3),
    RandomNode("en/medical/radiology", r=2, alpha=4.0, targets=("q_proj", "v_proj")),
    RandomNode("en/medical/cardiology", r=2, alpha=6.0, targets=("v_proj", "o_proj", "down_proj")),
    RandomNode("en/legal", r=3, alpha=6.0, targets=("k_proj", "gate_proj")),
    RandomNode("en/legal/contracts", r=5, alpha=5.0, targets=("q_proj", "v_proj"), visibility="private", owner="acme"),
    RandomNode("fr", r=4, alpha=8.0, targets=("q_proj", "v_proj")),
    RandomNode("fr/medical", r=2, alpha=2.0, targets=("q_proj", "o_proj", "up_proj")),
)


@dataclass(frozen=True)
class RandomTreeSpec:
    name: str = "rt"
    nodes: tuple[RandomNode, ...] = DEFAULT_NODES
    seed: int = 0
    init_scale: float = 0.2  # std of the random A and B entries
    base_model: str = "tiny"  # recorded in tree.json
    extra: dict = field(default_factory=dict)  # merged into tree.json


def balanced_spec(
    languages: int,
    domains: int,
    subdomains: int,
    *,
    name: str = "bench",
    ranks: tuple[int, int, int] = (16, 8, 4),
    targets: tuple[tuple[str, ...], ...] = (
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("q_proj", "v_proj", "up_proj", "down_proj"),
        ("q_proj", "v_proj"),
    ),
    seed: int = 0,
    init_scale: float = 0.2,
    base_model: str = "tiny",
) -> RandomTreeSpec:
    """languages x domains x subdomains leaves, every chain of depth 3; ranks and targets per level."""
    nodes = []
    for li in range(languages):
        lang = f"l{li}"
        nodes.append(RandomNode(lang, r=ranks[0], alpha=2.0 * ranks[0], targets=targets[0]))
        for di in range(domains):
            dom = f"{lang}/d{di}"
            nodes.append(RandomNode(dom, r=ranks[1], alpha=2.0 * ranks[1], targets=targets[1]))
            for si in range(subdomains):
                nodes.append(RandomNode(f"{dom}/s{si}", r=ranks[2], alpha=2.0 * ranks[2], targets=targets[2]))
    return RandomTreeSpec(name=name, nodes=tuple(nodes), seed=seed, init_scale=init_scale, base_model=base_model)


def _linear_shapes(base_dir: Path) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of every linear layer, without loading the weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name != "lm_head"
    }


def _random_adapter(shapes, node: RandomNode, generator: torch.Generator, init_scale: float) -> AdapterWeights:
    factors = {}
    for name, (fan_in, fan_out) in sorted(shapes.items()):
        if name.rsplit(".", 1)[-1] in node.targets:
            factors[name] = LoraFactors(
                A=torch.randn(node.r, fan_in, generator=generator) * init_scale,
                B=torch.randn(fan_out, node.r, generator=generator) * init_scale,
                scale=node.alpha / node.r,
            )
    if not factors:
        raise ValueError(f"node {node.path}: targets {node.targets} match no linear layer of the base")
    return AdapterWeights(r=node.r, alpha=node.alpha, target_modules=tuple(node.targets), factors=factors)


def make_random_tree(
    root: str | Path,
    base_dir: str | Path,
    spec: RandomTreeSpec = RandomTreeSpec(),
    on_node: Callable[[str], None] | None = None,
) -> BuiltTree:
    """Write ``spec`` as a built tree under ``root`` over the base at ``base_dir``; return it opened.

    ``on_node(path)`` is called after each node is written (a benchmark's progress bar).
    """
    root, base_dir = Path(root), Path(base_dir).resolve()
    digest = base_digest(base_dir)
    shapes = _linear_shapes(base_dir)
    generator = torch.Generator().manual_seed(spec.seed)
    records: dict[str, dict] = {}
    for node in spec.nodes:
        segments = node.path.split("/")
        if len(segments) > 3:
            raise ValueError(f"node {node.path}: depth {len(segments)} > 3")
        parent = "/".join(segments[:-1])
        if parent and parent not in records:
            raise ValueError(f"node {node.path}: parent {parent} must come earlier in the spec")
        directory = node_dir(root, node.path)
        files = write_adapter(
            _random_adapter(shapes, node, generator, spec.init_scale), directory, base_model_name_or_path=str(base_dir)
        )
        parent_record = records.get(parent)
        record = {
            "id": f"{spec.name}/{node.path}",
            "level": _LEVELS[len(segments)],
            "parent": f"{spec.name}/{parent}" if parent else spec.name,
            "version": node.version,
            "parent_version": parent_record["version"] if parent_record else None,
            "parent_adapter_digest": parent_record["files"]["adapter_model.safetensors"]["sha256"]
            if parent_record
            else None,
            "base_digest": digest,
            "visibility": node.visibility,
            "owner": node.owner,
            "lora": {"r": node.r, "alpha": node.alpha, "target_modules": list(node.targets)},
            "files": {
                name: {"sha256": sha, "length": (directory / name).stat().st_size}
                for name, sha in sorted(files.items())
            },
        }
        (directory / NODE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True))
        records[node.path] = record
        if on_node is not None:
            on_node(node.path)
    tree_record = {
        "name": spec.name,
        "base": {"dir": str(base_dir), "digest": digest, "model": spec.base_model},
        "spec_digest": "",
        "nodes": [n.path for n in spec.nodes],
        **spec.extra,
    }
    (root / TREE_RECORD).write_text(json.dumps(tree_record, indent=2, sort_keys=True))
    # Check what we wrote the way the engine will: every file matches its node.json digest.
    for node in spec.nodes:
        directory = node_dir(root, node.path)
        for name, info in records[node.path]["files"].items():
            if sha256_file(directory / name) != info["sha256"]:  # pragma: no cover - a disk fault
                raise RuntimeError(f"{directory / name} changed while the tree was written")
    return open_tree(root)


class MergedReference:
    """Greedy continuations from each node's *merged* model (nodes.build.compose.merge_chain), by stock
    ``transformers`` generate, one request at a time: what the engine must reproduce exactly."""

    def __init__(self, base_dir: str | Path, tree: BuiltTree, horizon: int = 16):
        self.base = load_base(base_dir)
        self.tree = tree
        self.horizon = horizon
        self._models: dict[str, torch.nn.Module] = {}
        self._runs: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        eos = self.base.model.generation_config.eos_token_id
        self.eos = set(eos) if isinstance(eos, (list, tuple)) else {eos, self.base.tokenizer.eos_token_id}

    def model(self, node: str) -> torch.nn.Module:
        if node not in self._models:
            model = copy.deepcopy(self.base.model)
            merge_chain(model, [read_adapter(n.directory) for n in self.tree.chain(node)])
            self._models[node] = model.eval()
        return self._models[node]

    def tokens(self, node: str, prompt_ids: Sequence[int], max_new: int) -> list[int]:
        """Up to ``max_new`` greedy tokens, cut before the end-of-sequence token."""
        key = (node, tuple(prompt_ids))
        run = self._runs.get(key)
        if run is None or (len(run) < max_new and run[-1:] != [-1]):
            ids = torch.tensor([list(prompt_ids)])
            with torch.no_grad():
                out = self.model(node).generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=max(max_new, self.horizon), do_sample=False
                )
            run = out[0, ids.shape[1] :].tolist()
            cut = next((i for i, t in enumerate(run) if t in self.eos), None)
            run = [*run[:cut], -1] if cut is not None else run  # -1 marks "ended with eos"
            self._runs[key] = run
        body = [t for t in run if t != -1]
        return body[:max_new]

    def log_softmax(self, node: str, ids: Sequence[int]) -> torch.Tensor:
        """[len(ids), V]: row t is the merged model's log-distribution of the token after ``ids[: t + 1]``."""
        with torch.no_grad():
            logits = self.model(node)(input_ids=torch.tensor([list(ids)])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    def logits(self, node: str, ids: Sequence[int]) -> torch.Tensor:
        """[V]: the merged model's raw logits for the token after ``ids``."""
        with torch.no_grad():
            return self.model(node)(input_ids=torch.tensor([list(ids)])).logits[0, -1].double()
