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

    Choices interleave (one token of each per step), so chunks merge per choice; each merged
    chunk takes the place of its last member, so the order within a choice is kept and the
    request's last chunk (the one with usage) stays last. A merged chunk keeps its first
    ``index`` (the engine numbers the chunks it sends again) and ``echo``, and takes the last
    one's ``finish_reason``, ``node_version``, ``usage`` and ``timings``; texts, token ids and
    logprobs are concatenated. Anything that is not a TokenChunk (the final result, an error)
    is kept as it is and ends the merging before it.
    """
    out: list[object] = []
    runs: list[tuple[int, TokenChunk]] = []  # (position of the run's last member, merged chunk)
    open_by_choice: dict[int, int] = {}  # choice -> its open run in ``runs``

    def flush() -> None:
        out.extend(chunk for _, chunk in sorted(runs, key=lambda run: run[0]))
        runs.clear()
        open_by_choice.clear()

    for position, item in enumerate(items):
        if not isinstance(item, TokenChunk):
            flush()
            out.append(item)
            continue
        at = open_by_choice.get(item.choice)
        last = runs[at][1] if at is not None else None
        if (
            at is not None
            and last is not None  # (known when ``at`` is; for the type checker)
            and last.finish_reason is None
            and item.echo is None
            and (last.logprobs is None) == (item.logprobs is None)
        ):
            runs[at] = (
                position,
                replace(
                    last,
                    text=last.text + item.text,
                    token_ids=last.token_ids + item.token_ids,
                    finish_reason=item.finish_reason,
                    node_version=item.node_version,
                    usage=item.usage,
                    timings=item.timings,
                    logprobs=None if last.logprobs is None else last.logprobs + (item.logprobs or ()),
                ),
            )
        else:
            open_by_choice[item.choice] = len(runs)
            runs.append((position, item))
    flush()
    return out
