"""Quote a user-supplied string for a message or a log line without copying all of it.

A request field can be megabytes long; an error message or log line that echoes it whole turns
one bad request into megabytes of memory and disk. ``clip`` keeps the start and says how long
the rest was.
"""

from __future__ import annotations

__all__ = ["CLIP_CHARS", "clip"]

CLIP_CHARS = 80  # enough to recognise an id or the start of a prompt


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """``repr(value)`` of at most ``limit`` characters of it, plus the full length when cut."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"
