"""The error table of cluster/service/interceptors.py and bearer-token auth, unit by unit.

End-to-end codes from real calls are in tests/cluster/test_server_errors.py.
"""

from __future__ import annotations

import grpc
import pytest

from cluster.errors import BadArgument, NodeNotVisible, PermissionDenied, ShuttingDown, Unauthenticated
from cluster.service.access import NodeAccess, NodeVisibility
from cluster.service.auth import ANONYMOUS, Authenticator, Caller, bearer_token
from cluster.service.status import ERROR_FIELD_KEY, ERROR_KIND_KEY, wire_status
from hierarchy.errors import InvalidNodePath
from nodes import errors as ne
from registry import errors as re_
from registry.records import TokenGrant
from treelm import _errors as sdk

S = grpc.StatusCode


@pytest.mark.parametrize(
    "error, code, field, kind",
    [
        (NodeNotVisible("rt/x"), S.NOT_FOUND, None, "node-not-found"),
        (ne.UnknownNode("node 'rt/x' is not served here"), S.NOT_FOUND, None, "node-not-found"),
        (re_.NodeNotFound("unknown node 'rt/x'"), S.NOT_FOUND, None, "node-not-found"),
        (re_.VersionNotFound("no version 9"), S.NOT_FOUND, None, None),
        (ne.InvalidRequest("top_p", "must be in (0, 1]"), S.INVALID_ARGUMENT, "top_p", None),
        (
            re_.InvalidMemorySize("memory 'eight gigs' is not a size", field="memory"),
            S.INVALID_ARGUMENT,
            "memory",
            None,
        ),
        (re_.UnknownTask("no node matches task xx", field="task"), S.INVALID_ARGUMENT, "task", None),
        (BadArgument("prefix", "bad"), S.INVALID_ARGUMENT, "prefix", None),
        (InvalidNodePath("bad path 'A B'"), S.INVALID_ARGUMENT, "node", None),
        (Unauthenticated("no token"), S.UNAUTHENTICATED, None, None),
        (re_.InvalidToken("invalid API token"), S.UNAUTHENTICATED, None, None),
        (PermissionDenied("operators only"), S.PERMISSION_DENIED, None, None),
        (ne.QueueFull("queue at 8"), S.RESOURCE_EXHAUSTED, None, None),
        (ne.DeadlineExceeded("too late"), S.DEADLINE_EXCEEDED, None, None),
        (ne.EngineClosed("closed"), S.UNAVAILABLE, None, "shutting-down"),
        (ShuttingDown("draining"), S.UNAVAILABLE, None, "shutting-down"),
        (re_.DatabaseUnavailable("db down"), S.UNAVAILABLE, None, None),
        (ne.RequestCancelled("cancelled"), S.CANCELLED, None, None),
        (re_.SchemaOutdated("run upgrade"), S.FAILED_PRECONDITION, None, None),
        (re_.AliasError("revoked"), S.FAILED_PRECONDITION, None, None),
        (ne.IntegrityError("adapter changed on disk"), S.DATA_LOSS, None, None),
        (NotImplementedError(), S.UNIMPLEMENTED, None, None),
    ],
)
def test_each_typed_error_has_its_precise_code(error, code, field, kind):
    status = wire_status(error)
    assert (status.code, status.field, status.kind) == (code, field, kind)
    assert status.details  # never empty
    meta = dict(status.trailing_metadata())
    assert meta.get(ERROR_FIELD_KEY) == field and meta.get(ERROR_KIND_KEY) == kind


def test_no_user_mistake_becomes_internal():
    user_errors = [
        ne.InvalidRequest("x", "y"),
        ne.UnknownNode("n"),
        re_.InvalidInput("bad", field="f"),
        re_.NotFound("n"),
        re_.InvalidToken("t"),
        ne.QueueFull("q"),
        InvalidNodePath("p"),
    ]
    assert all(wire_status(e).code is not S.INTERNAL for e in user_errors)


def test_an_unexpected_exception_is_internal_and_leaks_nothing(caplog):
    status = wire_status(KeyError("secret-column-name"))
    assert status.code is S.INTERNAL
    assert "secret-column-name" not in status.details and "incident" in status.details
    assert "secret-column-name" in caplog.text  # but the operator's log has it


def test_the_sdk_decodes_the_servers_metadata_keys():
    assert (sdk.ERROR_FIELD_KEY, sdk.ERROR_KIND_KEY) == (ERROR_FIELD_KEY, ERROR_KIND_KEY)


@pytest.mark.parametrize(
    "metadata, token",
    [
        ((("authorization", "Bearer abc"),), "abc"),
        ((("Authorization", "bearer  abc "),), "abc"),
        ((("x-other", "1"),), None),
        ((), None),
    ],
)
def test_bearer_token_parsing(metadata, token):
    assert bearer_token(metadata) == token


@pytest.mark.parametrize("value", ["Basic abc", "Bearer", "abc"])
def test_malformed_authorization_is_unauthenticated(value):
    with pytest.raises(Unauthenticated):
        bearer_token((("authorization", value),))


class _Tokens:
    def __init__(self):
        self.lookups = 0
        self.valid = {"tlm_good": "acme"}

    def __call__(self, token: str) -> TokenGrant:
        self.lookups += 1
        if token not in self.valid:
            raise re_.InvalidToken("invalid API token")
        return TokenGrant(self.valid[token], "tenant", token)


async def test_authenticator_requires_a_valid_token_and_caches_by_hash():
    tokens, now = _Tokens(), [0.0]
    auth = Authenticator(tokens, cache_ttl_s=10, clock=lambda: now[0])
    with pytest.raises(Unauthenticated, match="needs a bearer token"):
        await auth.authenticate(())
    with pytest.raises(Unauthenticated, match="not valid"):
        await auth.authenticate((("authorization", "Bearer tlm_bad"),))
    good = (("authorization", "Bearer tlm_good"),)
    assert await auth.authenticate(good) == Caller("acme")
    assert await auth.authenticate(good) == Caller("acme")
    assert tokens.lookups == 2  # the second good call was cached
    assert "tlm_good" not in repr(auth._cache)  # keyed by hash, not by the secret
    tokens.valid.clear()  # revoked: takes effect when the cache entry expires
    now[0] = 11.0
    with pytest.raises(Unauthenticated):
        await auth.authenticate(good)


async def test_auth_off_lets_anonymous_callers_in_but_still_checks_sent_tokens():
    auth = Authenticator(_Tokens(), required=False)
    assert await auth.authenticate(()) is ANONYMOUS
    assert await auth.authenticate((("authorization", "Bearer tlm_good"),)) == Caller("acme")
    with pytest.raises(Unauthenticated):
        await auth.authenticate((("authorization", "Bearer tlm_bad"),))


async def test_node_access_hides_private_nodes_from_everyone_but_the_owner():
    table = {
        "rt/en": NodeVisibility("rt/en", "public", None),
        "rt/en/legal/contracts": NodeVisibility("rt/en/legal/contracts", "private", "acme"),
    }
    calls = []

    def lookup(node):
        calls.append(node)
        return table.get(node)

    access = NodeAccess(lookup, ttl_s=60)
    for caller in (ANONYMOUS, Caller("acme"), Caller("globex")):
        assert (await access.check("rt/en", caller)).visibility == "public"
    assert (await access.check("rt/en/legal/contracts", Caller("acme"))).owner == "acme"
    messages = []
    for caller, node in (
        (Caller("globex"), "rt/en/legal/contracts"),
        (ANONYMOUS, "rt/en/legal/contracts"),
        (Caller("acme"), "rt/nope"),
    ):
        with pytest.raises(NodeNotVisible) as info:
            await access.check(node, caller)
        messages.append(str(info.value).replace(node, "<id>"))
    assert len(set(messages)) == 1  # indistinguishable
    assert sorted(set(calls)) == ["rt/en", "rt/en/legal/contracts", "rt/nope"]  # each looked up once (cached)
