"""Operator statements: the exact bytes an operator signs to move an alias back or repin a node.

A statement is canonical JSON (sorted keys, no spaces) signed like an update, Ed25519 over the
DSSE PAE with its own payload type, so a rollback signature can never pass as an approval, an
update or a key rotation. It names the version it moves *from*: once the alias has moved, the
same signature no longer matches anything (no replay).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["REPIN_PAYLOAD_TYPE", "ROLLBACK_PAYLOAD_TYPE", "repin_statement", "rollback_statement"]

ROLLBACK_PAYLOAD_TYPE = "application/vnd.treelm.rollback.v1+json"
REPIN_PAYLOAD_TYPE = "application/vnd.treelm.repin.v1+json"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def rollback_statement(node: str, from_version: int, to_version: int, alias: str = "stable") -> bytes:
    """What a rollback of ``node``'s ``alias`` from ``from_version`` to ``to_version`` signs."""
    return _canonical({"alias": alias, "from": int(from_version), "node": str(node), "to": int(to_version)})


def repin_statement(node: str, chain: Sequence[Mapping[str, Any]]) -> bytes:
    """What forcing ``node`` onto ``chain`` (its parent's served chain plus itself) signs."""
    return _canonical({"node": str(node), "repin": [dict(x) for x in chain]})
