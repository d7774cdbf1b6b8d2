"""Incremental detokenisation with stop strings, safe for streaming.

Each token decodes only a short window (the tokens since the last released
text), as Hugging Face's TextStreamer and vLLM do, so a step costs the same at
token 10 and token 1000. Text is released only when it can no longer change: a
trailing partial UTF-8 character (decoded as U+FFFD) and a tail that could
still grow into a stop string are held back until the next token decides.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TextStream"]


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = (), *, incremental: bool = True):
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._incremental = incremental or bool(self._stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._ids: list[int] = []
        self._prefix = 0  # window start (token index) for the next decode
        self._read = 0  # tokens whose text is already in self._decoded
        self._decoded = ""  # text of ids[:read]
        self._released = 0  # characters of the text handed out so far
        self._final: str | None = None
        self.stopped = False

    @property
    def text(self) -> str:
        """The completion text so far (cut before a stop string once one appeared)."""
        if self._final is not None:
            return self._final
        if not self._incremental:
            return self._decode(self._ids)
        return self._decoded

    def push(self, token_id: int) -> str:
        """Add one generated token; return the newly released text (maybe empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        if not self._incremental:
            return ""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before) :]
            self._decoded += delta
            self._prefix, self._read = self._read, len(self._ids)
        else:
            return ""  # an incomplete character: wait for the next token
        if self._stop:
            window = max(0, len(self._decoded) - len(delta) - self._hold)
            cut = min((i for i in (self._decoded.find(s, window) for s in self._stop) if i >= 0), default=-1)
            if cut >= 0:
                self.stopped = True
                self._final = self._decoded[:cut]
                return self._release(cut)
        return self._release(len(self._decoded) - self._hold)

    def flush(self) -> str:
        """Release everything that is left (the stream is over)."""
        if self._final is None:
            text = self.text
            if self._incremental and self._read < len(self._ids):  # a pending partial character
                before = self._decode(self._ids[self._prefix : self._read])
                text += self._decode(self._ids[self._prefix :])[len(before) :]
            self._final = text
        return self._release(len(self._final))

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _release(self, upto: int) -> str:
        text = self._final if self._final is not None else self._decoded
        if upto <= self._released:
            return ""
        out = text[self._released : upto]
        self._released = upto
        return out
