"""Structured output: constrained decoding of JSON (``json_object`` / ``json_schema``), per row.

The grammar library is llguidance (Rust, no Python dependencies, strict JSON): a schema becomes a
grammar, the grammar a matcher over the tokenizer's vocabulary; each step a constrained row's
matcher writes a bitmask of the tokens it allows, and the masked-out logits become -inf. Rows
without a response format never reach this module.

xgrammar was tried first: its length-bounded strings (``maxLength``) admitted raw control
characters (invalid JSON that ``json.loads`` refuses) and it pulls triton on Linux; llguidance
passes the same tests strictly.

:class:`Grammars` (one per engine) holds the llguidance tokenizer (built on first use: ~1.6 s for
SmolLM2's 49k tokens, so the engine builds it off the event loop) and an LRU of compiled
matchers keyed by the response format (kind + canonical schema text); each row gets a deep copy.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from nodes.errors import InvalidRequest
from nodes.runtime.requests import ResponseFormat

__all__ = ["Grammars", "RowGrammar", "apply_bitmask", "bitmask_words"]

_ANY_OBJECT = '{"type":"object"}'  # json_object: any JSON object, as OpenAI's JSON mode
# Compact JSON (no free whitespace): a model cannot stall in endless spaces, and output is canonical.
_JSON_OPTIONS: Any = {"whitespace_flexible": False}


def bitmask_words(vocab_size: int) -> int:
    """int32 words in one row's token bitmask (one bit per token)."""
    return (vocab_size + 31) // 32


class RowGrammar:
    """One row's matcher: the tokens allowed next, and the tokens consumed so far."""

    def __init__(self, matcher: Any) -> None:
        self._matcher = matcher
        self.error: str | None = None

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed-token bits into ``bitmask[row]`` ([G, W] int32, contiguous)."""
        target = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * target.element_size())

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            self.error = self._matcher.get_error() or f"token {token} is not allowed here"

    @property
    def done(self) -> bool:
        """The value is complete and nothing but end-of-sequence may follow."""
        return bool(self._matcher.is_stopped())


def apply_bitmask(scores: torch.Tensor, positions: Sequence[int], bitmask: torch.Tensor) -> None:
    """Set to -inf every token that ``bitmask[g]`` forbids in row ``positions[g]`` of ``scores`` [P, V]."""
    vocab = scores.shape[1]
    # Token 32 * w + b is bit b of word w: the words' little-endian bytes, unpacked least significant bit first.
    words = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
    forbidden = torch.from_numpy(np.unpackbits(words, axis=1, bitorder="little")[:, :vocab]) == 0
    if list(positions) == list(range(scores.shape[0])):
        scores.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor(list(positions), dtype=torch.long)
    scores.index_copy_(0, index, scores.index_select(0, index).masked_fill(forbidden, float("-inf")))


class Grammars:
    """Compiled response formats of one engine (thread-safe: submissions compile, the model thread copies)."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int], max_cached: int = 256):
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_ids)
        self._max_cached = max_cached
        self._lock = threading.Lock()  # the cache (held for microseconds)
        self._build_lock = threading.Lock()  # one build at a time, so each format compiles once
        self._ll_tokenizer = None
        self._cache: collections.OrderedDict[ResponseFormat, object] = collections.OrderedDict()
        self.compiled = 0
        self.hits = 0

    def ready(self, fmt: ResponseFormat) -> bool:
        """True when ``fmt`` is compiled already (then ``matchers`` is quick enough for any thread)."""
        return fmt in self._cache

    def compile(self, fmt: ResponseFormat):
        """The compiled matcher of ``fmt``; InvalidRequest naming the field if the schema is refused."""
        found = self._lookup(fmt)
        if found is not None:
            return found
        with self._build_lock:
            found = self._lookup(fmt)  # built by another caller while this one waited
            if found is not None:
                return found
            matcher = self._build(fmt)
            with self._lock:
                self._cache[fmt] = matcher
                self.compiled += 1
                while len(self._cache) > self._max_cached:
                    self._cache.popitem(last=False)
            return matcher

    def _lookup(self, fmt: ResponseFormat):
        with self._lock:
            found = self._cache.get(fmt)
            if found is not None:
                self._cache.move_to_end(fmt)
                self.hits += 1
            return found

    def matchers(self, fmt: ResponseFormat, n: int) -> list[RowGrammar]:
        template = self.compile(fmt)
        return [RowGrammar(template.deep_copy()) for _ in range(n)]

    def _build(self, fmt: ResponseFormat):
        import llguidance

        field = "response_format.schema" if fmt.kind == "json_schema" else "response_format"
        schema = fmt.schema if fmt.kind == "json_schema" and fmt.schema is not None else _ANY_OBJECT
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        except ValueError as exc:
            raise InvalidRequest(field, f"is not a usable JSON schema: {exc}") from None
        tokenizer = self._llg_tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer)
        if is_error:
            raise InvalidRequest(field, f"is not a usable JSON schema: {messages[0] if messages else 'invalid'}")
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(field, f"is not a usable JSON schema: {matcher.get_error()}")
        return matcher

    def _llg_tokenizer(self):
        if self._ll_tokenizer is None:
            import llguidance.hf
            from transformers import PreTrainedTokenizerFast

            if not isinstance(self._tokenizer, PreTrainedTokenizerFast):
                raise InvalidRequest("response_format", "this base's tokenizer is not a fast tokenizer")
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                self._tokenizer, n_vocab=self.vocab_size, eos_token=self._eos
            )
        return self._ll_tokenizer
