"""Training files as tenants upload them: checked when uploaded, rendered to text when trained on.

Two formats (``POST /v1/files``, purpose ``fine-tune``):

- **JSON Lines** of chat records, OpenAI's fine-tuning format: one object per line,
  ``{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}`` with at
  least one assistant message; ``{"text": "..."}`` lines are plain documents.
- **Plain text** (UTF-8): documents separated by blank lines.

Bounds (documented in the README): at most :data:`MAX_FILE_BYTES` bytes and
:data:`MAX_RECORDS` records; at least :data:`MIN_TEXT_CHARS` characters of text in all (a
smaller file cannot teach a node anything measurable, nor leave a held-out part to gate on).
Every refusal is a :class:`~cluster.errors.BadArgument` naming ``file`` and, for JSON Lines, the
line: "file: line 3: ...".
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.errors import BadArgument

__all__ = [
    "FILE_PURPOSES",
    "MAX_FILE_BYTES",
    "MAX_RECORDS",
    "MIN_TEXT_CHARS",
    "ChatMessage",
    "ParsedFile",
    "TrainingRecord",
    "parse_training_file",
    "split_held_out",
]

MAX_FILE_BYTES = 8 << 20  # what a CPU trains on in minutes is far less; larger corpora: `treelm tree build`
MAX_RECORDS = 50_000
MIN_TEXT_CHARS = 1_000
FILE_PURPOSES = ("fine-tune",)
ROLES = ("system", "user", "assistant")
_BLANK_LINES = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class TrainingRecord:
    """One chat conversation (rendered through the base's chat template) or one plain document."""

    messages: tuple[ChatMessage, ...] = ()
    text: str | None = None

    @property
    def chars(self) -> int:
        return len(self.text) if self.text is not None else sum(len(m.content) for m in self.messages)


@dataclass(frozen=True)
class ParsedFile:
    format: str  # jsonl | text
    records: tuple[TrainingRecord, ...]
    sha256: str
    bytes: int

    @property
    def chars(self) -> int:
        return sum(r.chars for r in self.records)


def _bad(message: str) -> BadArgument:
    return BadArgument("file", message)


def _decode(content: bytes) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise _bad(f"line {line}: not UTF-8 text (byte {exc.start}); upload UTF-8 JSON Lines or text") from None


def _is_jsonl(filename: str, text: str) -> bool:
    if filename.lower().endswith((".jsonl", ".json")):
        return True
    if filename.lower().endswith((".txt", ".md", ".text")):
        return False
    return text.lstrip().startswith("{")


def _chat(obj: dict, line: int) -> TrainingRecord:
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad(f"line {line}: 'messages' must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"line {line}: messages[{i}] must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise _bad(f"line {line}: messages[{i}].role must be one of {', '.join(ROLES)}, got {str(role)[:40]!r}")
        if not isinstance(content, str):
            raise _bad(f"line {line}: messages[{i}].content must be a string")
        out.append(ChatMessage(role, content))
    if not any(m.role == "assistant" and m.content.strip() for m in out):
        raise _bad(f"line {line}: a chat record needs an assistant message to learn from")
    return TrainingRecord(messages=tuple(out))


def _jsonl(text: str) -> list[TrainingRecord]:
    records = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise _bad(f"line {line_no}: not valid JSON ({str(exc)[:120]})") from None
        if not isinstance(obj, dict):
            raise _bad(f"line {line_no}: expected a JSON object, found a JSON {type(obj).__name__}")
        if "messages" in obj:
            records.append(_chat(obj, line_no))
        elif isinstance(obj.get("text"), str):
            records.append(TrainingRecord(text=obj["text"]))
        else:
            raise _bad(f"line {line_no}: a record needs 'messages' (a chat) or 'text' (a document)")
        if len(records) > MAX_RECORDS:
            raise _bad(f"more than {MAX_RECORDS} records; split the data or build the node with `treelm tree build`")
    return records


def parse_training_file(content: bytes, filename: str = "") -> ParsedFile:
    """The records of an upload, or BadArgument("file", ...) saying what is wrong and where."""
    if not content.strip():
        raise _bad("the file is empty")
    if len(content) > MAX_FILE_BYTES:
        raise _bad(f"the file has {len(content)} bytes, the limit is {MAX_FILE_BYTES} ({MAX_FILE_BYTES >> 20} MiB)")
    text = _decode(content)
    if "\x00" in text:
        raise _bad(f"line {text[: text.index(chr(0))].count(chr(10)) + 1}: a NUL character; upload text")
    if _is_jsonl(filename, text):
        fmt, records = "jsonl", _jsonl(text)
    else:
        fmt = "text"
        records = [TrainingRecord(text=d.strip()) for d in _BLANK_LINES.split(text) if d.strip()]
        if len(records) > MAX_RECORDS:
            raise _bad(f"more than {MAX_RECORDS} documents; split the data or build the node with `treelm tree build`")
    parsed = ParsedFile(fmt, tuple(records), hashlib.sha256(content).hexdigest(), len(content))
    if parsed.chars < MIN_TEXT_CHARS:
        raise _bad(
            f"only {parsed.chars} characters of training text; a node needs at least {MIN_TEXT_CHARS} "
            "(and more to beat its parent on held-out text)"
        )
    return parsed


def split_held_out(
    records: Sequence[TrainingRecord], share: float
) -> tuple[list[TrainingRecord], list[TrainingRecord]]:
    """(train, held out): about ``share`` of the records, spread over the whole file. A single plain
    document is cut at a line (or space) near its end instead."""
    if len(records) == 1 and records[0].text is not None:
        text = records[0].text
        cut = int(len(text) * (1 - share))
        at = text.rfind("\n", 0, cut)
        at = at if at > len(text) // 2 else text.rfind(" ", 0, cut)
        if at <= 0:
            raise _bad("the document cannot be split into training and held-out parts; give a validation_file")
        return [TrainingRecord(text=text[:at])], [TrainingRecord(text=text[at:].strip())]
    if len(records) < 2:
        raise _bad("a single chat record cannot be split into training and held-out parts; give a validation_file")
    n = len(records)
    k = min(n - 1, max(1, round(n * share)))
    held = {min(n - 1, int((i + 1) * n / k) - 1) for i in range(k)}
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]
