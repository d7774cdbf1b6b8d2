"""Coalescing streamed chunks: the tokens a slow reader has not taken yet, sent as one chunk.

A stream's reader that crosses a process boundary (a Ray replica's generator: one object per
item) pays per chunk, not per token. When it falls behind the model, the chunks waiting for it
are merged, per choice, so the reader catches up
and a fast reader still gets every token on its own (nothing waits to be merged).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from nodes.runtime.requests import TokenChunk

__all__ = ["merge_chunks"]


def merge_chunks(items: Sequence[object]) -> list[object]:
    """``items`` in order, the TokenChunks of each choice merged between any other items.

    Choices interleave (one token of each per step), so chunks merge per choice, each merged
    chunk where its first one was: order within a choice is kept. A merged chunk keeps its
    first ``index`` (the engine numbers the chunks it sends again) and ``echo`` and takes the last one's ``finish_reason``,
    ``node_version``, ``usage`` and ``timings``; texts, token ids and logprobs are concatenated.
    Anything that is not a TokenChunk (the final result, an error) is kept as it is and ends
    the merging before it.
    """
    out: list[object] = []
    open_by_choice: dict[int, int] = {}  # choice -> position in ``out`` of its merged chunk
    for item in items:
        if not isinstance(item, TokenChunk):
            out.append(item)
            open_by_choice.clear()
            continue
        at = open_by_choice.get(item.choice)
        last = out[at] if at is not None else None
        if (
            isinstance(last, TokenChunk)
            and last.finish_reason is None
            and item.echo is None
            and (last.logprobs is None) == (item.logprobs is None)
        ):
            out[at] = replace(  # type: ignore[index]
                last,
                text=last.text + item.text,
                token_ids=last.token_ids + item.token_ids,
                finish_reason=item.finish_reason,
                node_version=item.node_version,
                usage=item.usage,
                timings=item.timings,
                logprobs=None if last.logprobs is None else last.logprobs + (item.logprobs or ()),
            )
        else:
            open_by_choice[item.choice] = len(out)
            out.append(item)
    return out
