"""Log-probabilities of the node's effective model, computed in the batch, and the tokens' text/bytes.

A logprob is ``log_softmax`` of the row's raw logits (the bank's output: base plus the row's
chain), taken before temperature, penalties, logit bias or a grammar change them: what a
harness scoring text needs. One ``log_softmax`` and one ``topk`` cover every logprobs row of a
step; the other rows are never touched.

Records stay raw on the model thread (``(token_id, logprob, ((id, logprob), ...))``) and become
:class:`~nodes.runtime.requests.TokenLogprob` values only when delivered.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from nodes.runtime.requests import TokenLogprob

__all__ = ["LogprobRecord", "TokenTable", "prompt_logprobs", "step_logprobs"]

# (token id, its logprob or None, the top alternatives as (id, logprob), best first)
LogprobRecord = tuple[int, float | None, tuple[tuple[int, float], ...]]

_PROMPT_CHUNK = 256  # prompt positions per lm_head call: bounds the [positions, vocab] logits in memory


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable character that stands for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TokenTable:
    """Each token id's own text and exact bytes, worked out on first use and remembered.

    Byte-level BPE tokens (GPT-2, SmolLM2, the tiny test tokenizer) map back to bytes through the
    byte alphabet; SentencePiece pieces through ``▁`` and ``<0xNN>``; special tokens are their text.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._added = {int(i): str(t) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        self._memo: dict[int, tuple[str, bytes]] = {}

    def entry(self, token_id: int) -> tuple[str, bytes]:
        found = self._memo.get(token_id)
        if found is None:
            raw = self._bytes(token_id)
            found = self._memo[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:
            return self._added[token_id].encode()
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # an id past the tokenizer's vocabulary (a padded embedding row)
            return b""
        if self._byte_level:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        else:
            return piece.replace("▁", " ").encode()
        return self._tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def logprob(self, record: LogprobRecord) -> TokenLogprob:
        token_id, value, top = record
        text, raw = self.entry(token_id)
        alternatives = tuple(
            TokenLogprob(token_id=i, token=self.entry(i)[0], token_bytes=self.entry(i)[1], logprob=lp) for i, lp in top
        )
        return TokenLogprob(token_id=token_id, token=text, token_bytes=raw, logprob=value, top=alternatives)

    def logprobs(self, records: Sequence[LogprobRecord]) -> tuple[TokenLogprob, ...]:
        return tuple(self.logprob(r) for r in records)


def step_logprobs(
    logits: torch.Tensor, rows: torch.Tensor | None, tokens: torch.Tensor, tops: Sequence[int]
) -> list[LogprobRecord]:
    """One record per row in ``rows`` ([L] int64 into ``logits`` [B, V]; None: every row) for its chosen token.

    ``tokens`` [L] are the chosen tokens of those rows; ``tops`` how many alternatives each row wants.
    """
    lp = torch.log_softmax((logits if rows is None else logits.index_select(0, rows)).float(), dim=-1)
    chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    k = max(tops)
    values: list[list[float]] = []
    ids: list[list[int]] = []
    if k:
        top_values, top_ids = lp.topk(k, dim=-1)
        values, ids = top_values.tolist(), top_ids.tolist()
    token_list = tokens.tolist()
    return [
        (token_list[i], chosen[i], tuple(zip(ids[i][: tops[i]], values[i][: tops[i]], strict=True)) if k else ())
        for i in range(len(token_list))
    ]


def prompt_logprobs(
    head: torch.nn.Module, hidden: torch.Tensor, prompt: Sequence[int], top: int
) -> list[LogprobRecord]:
    """Records for every prompt token; ``hidden`` [L, H] are the final hidden states at its L positions.

    Position t's logits score token t + 1; the first token has nothing before it (logprob None).
    """
    records: list[LogprobRecord] = [(int(prompt[0]), None, ())]
    targets = torch.tensor(list(prompt[1:]), dtype=torch.long)
    for start in range(0, len(targets), _PROMPT_CHUNK):
        stop = min(start + _PROMPT_CHUNK, len(targets))
        logits = head(hidden[start:stop])
        records += step_logprobs(logits, None, targets[start:stop], [top] * (stop - start))
    return records
