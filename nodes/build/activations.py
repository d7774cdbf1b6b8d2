"""What a chain feeds its adapted layers: input covariances on a text (for projection merges).

    cov = input_covariances(model, chain, tokens, seq_len, modules)   # module -> [in, in], sum x x^T / n

The merge that protects siblings (``hierarchy.updates.merges.project_away``) removes from a
parent's increment every direction of these inputs that holds most of their energy, so the
protected nodes' layer outputs do not move.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from nodes.build.training import ChainPatch
from nodes.errors import BuildError
from nodes.store.adapters import AdapterWeights

__all__ = ["input_covariances"]


@torch.no_grad()
def input_covariances(
    model: torch.nn.Module,
    chain: Sequence[AdapterWeights],
    tokens: torch.Tensor,
    seq_len: int,
    modules: Iterable[str],
    *,
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """Mean ``x x^T`` (float64, [in, in]) of every ``modules`` layer's input over ``tokens`` ([n]),
    under the base with ``chain`` applied; the text is cut in windows of ``seq_len`` tokens."""
    wanted = sorted(set(modules))
    n = int(tokens.numel())
    if n < 2:
        raise BuildError("the text has fewer than 2 tokens")
    windows = [tokens[i : i + seq_len] for i in range(0, n - 1, seq_len)]
    full = [w for w in windows if w.numel() == seq_len]
    groups = [torch.stack(full[i : i + batch_size]) for i in range(0, len(full), batch_size)]
    groups += [w.unsqueeze(0) for w in windows if w.numel() != seq_len]
    sums: dict[str, torch.Tensor] = {}
    count = 0
    with ChainPatch(model, list(chain)) as patch:
        missing = [m for m in wanted if m not in patch.layers]
        if missing:
            raise BuildError(f"the chain does not adapt {missing[:3]}: no inputs to collect there")

        def hook(name: str):
            def collect(_module, args) -> None:
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums[name] + x.T @ x if name in sums else x.T @ x

            return collect

        handles = [patch.layers[m].register_forward_pre_hook(hook(m)) for m in wanted]
        was_training = model.training
        model.eval()
        try:
            for group in groups:
                model(input_ids=group, use_cache=False)
                count += group.numel()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
    return {m: s / count for m, s in sums.items()}
