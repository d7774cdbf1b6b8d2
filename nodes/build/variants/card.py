"""The model card (README.md) every variant carries: Hugging Face front matter, the chain, how to load it."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from nodes.build.variants.kinds import VariantKind
from nodes.build.variants.source import VariantSource

__all__ = ["model_card"]


def _relation(kind: VariantKind, source: VariantSource) -> str | None:
    if source.is_base:
        return "quantized" if kind.is_gguf and kind.dtype != "F16" else None
    return "adapter" if kind.family in ("peft", "gguf-lora") else "finetune"


def _front_matter(front: Mapping[str, Any]) -> list[str]:
    lines = ["---"]
    for key, value in front.items():
        if value is None:
            continue
        if isinstance(value, list):
            lines.append(f"{key}:" + ("" if value else " []"))
            lines += [f"- {json.dumps(item)}" for item in value]
        else:
            lines.append(f"{key}: {json.dumps(value)}")
    return [*lines, "---", ""]


def _usage(kind: VariantKind, load: Mapping[str, Sequence[str]], requires: str | None) -> list[str]:
    if kind.family == "hf":
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("DIR")',
            'tokenizer = AutoTokenizer.from_pretrained("DIR")',
            "```",
        ]
    if kind.family == "peft":
        return [
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("BASE_DIR")  # {requires}',
            'model = PeftModel.from_pretrained(base, "DIR")',
            "```",
        ]
    if kind.family == "gguf":
        file = load["gguf"][0]
        return [
            "```bash",
            f"llama-cli -m DIR/{file}",
            "```",
            "",
            "```python",
            "from llama_cpp import Llama",
            f'llm = Llama(model_path="DIR/{file}")',
            "",
            "from transformers import AutoModelForCausalLM  # de-quantized on load",
            f'model = AutoModelForCausalLM.from_pretrained("DIR", gguf_file="{file}")',
            "```",
        ]
    loras = " ".join(f"--lora DIR/{f}" for f in load["lora"])
    return [
        "```bash",
        f"llama-cli -m BASE.gguf {loras}  # BASE.gguf: {requires}",
        "```",
        "",
        "Every file is applied at scale 1.0; together they are the node's chain.",
    ]


def model_card(
    kind: VariantKind,
    source: VariantSource,
    load: Mapping[str, Sequence[str]],
    requires: str | None = None,
) -> str:
    """README.md for one variant of ``source`` (``requires`` describes the base it runs over)."""
    tree = source.tree
    node = source.chain[-1] if source.chain else None
    hub_id = tree.raw.get("base", {}).get("hub_id") or tree.base_model or str(tree.base_dir)
    tags = ["treelm", f"treelm-{node.level.value}" if node else "treelm-base", kind.name]
    tags += ["gguf", "llama.cpp"] if kind.is_gguf else []
    tags += ["lora"] if kind.family in ("peft", "gguf-lora") else []
    if node:
        tags += [t for t in (node.domain, node.subdomain) if t] + list(node.tags)
    front = {
        "base_model": hub_id,
        "base_model_relation": _relation(kind, source),
        "language": [node.language] if node and node.language else [],
        "library_name": kind.library,
        "pipeline_tag": "text-generation",
        "tags": list(dict.fromkeys(tags)),
    }
    lines = _front_matter(front)
    lines += [f"# {source.node_id} ({kind.name})", ""]
    description = (node.raw.get("description") if node else tree.raw.get("description")) or ""
    if description:
        lines += [str(description), ""]
    level = node.level.value if node else "base"
    lines += [
        f"A TreeLM node: level `{level}` of tree `{tree.name}`, version {source.version}, as `{kind.name}` "
        f"({kind.summary}).",
        "",
    ]
    if source.chain:
        lines += ["| chain | version | rank | alpha | adapter sha256 |", "|---|---|---|---|---|"]
        lines += [
            f"| {n.node_id} | {n.version} | {n.lora.get('r')} | {n.lora.get('alpha')} | {n.adapter_digest[:16]} |"
            for n in source.chain
        ]
        lines.append("")
    metrics = node.metrics if node else {}
    if isinstance(metrics.get("eval_ppl"), (int, float)) and isinstance(metrics.get("parent_eval_ppl"), (int, float)):
        lines += ["| metric | value |", "|---|---|"]
        lines.append(
            f"| perplexity on own eval text (node / parent) | {metrics['eval_ppl']:.3f} / {metrics['parent_eval_ppl']:.3f} |"
        )
        lines.append("")
    lines += [f"Base: `{tree.base_model}` (digest `{tree.base_digest[:16]}`); licence: the base model's."]
    if node and node.visibility == "private":
        lines += ["", f"**Private node** owned by tenant `{node.owner}`: do not redistribute."]
    lines += ["", "## Load", "", *_usage(kind, load, requires), ""]
    return "\n".join(lines)
