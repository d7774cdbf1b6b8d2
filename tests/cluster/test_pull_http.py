"""The download API over HTTP (/v1/distribution/...): a real server's HTTP port, the standard
library as the device's client, the manifest verified with the SDK's own verification."""

from __future__ import annotations

import hashlib
import http.client
import json
import time
import urllib.parse

import pytest

from hierarchy.updates.distribution import verify_variant
from hierarchy.updates.envelope import Envelope
from hierarchy.updates.keys import PublicKey
from hierarchy.updates.variants import VariantManifest
from tests.cluster.grpc_harness import PRIVATE, distribution_for, make_world, serve
from tests.cluster.http_harness import Answer, call
from treelm import Client

NODE = "rt/en/medical/radiology"
PREFIX = "/distribution"


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("pull-http")
    w = make_world(tiny_base_dir, root)
    distributor, root_fp = distribution_for(w, chunk_bytes=64 << 10)
    server = serve(w, distribution=distributor, http_port=0)
    w.root_fp = root_fp  # type: ignore[attr-defined]
    w.server = server  # type: ignore[attr-defined]
    w.base_url = server.server.http_url  # type: ignore[attr-defined]
    yield w
    server.stop()
    w.engine.close()
    w.registry.close()


def get(world, path: str, tenant: str | None = "globex", **kwargs) -> Answer:
    token = world.tokens[tenant] if tenant else None
    return call(world.base_url, "GET", PREFIX + path, token=token, **kwargs)


def offer_path(node: str, variant: str) -> str:
    return "/offer?" + urllib.parse.urlencode({"node": node, "variant": variant})


def verified(world, offer: dict) -> VariantManifest:
    """The offer's manifest, verified from the root key the device was told to trust (as pull does)."""
    trust = get(world, "/trust/rt").json()
    roots = [PublicKey.from_hex(k["public_key"]) for k in trust["root_keys"] if k["fingerprint"] == world.root_fp]
    manifest, _, signers = verify_variant(
        Envelope.from_dict(offer["manifest"]), Envelope.from_dict(offer["delegation"]), roots, 1
    )
    assert signers
    return manifest


def fetch(world, url: str, tenant: str = "globex", **headers: str) -> Answer:
    """An offer's file URL (server-relative, /v1/...) with the tenant's token."""
    return call(world.base_url, "GET", url.removeprefix("/v1"), token=world.tokens[tenant], headers=headers)


def settled(world) -> bool:
    """Every call booked as finished (a file answer books itself just after its last byte is sent)."""
    deadline = time.monotonic() + 10
    while world.server.server._http.api.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    return world.server.server._http.api.in_flight == 0


def test_a_device_downloads_a_variant_over_http_and_verifies_every_byte(world):
    trust = get(world, "/trust/rt")
    assert trust.status == 200, trust.body
    assert [k["fingerprint"] for k in trust.json()["root_keys"]] == [world.root_fp]
    answer = get(world, offer_path(NODE, "merged"))
    assert answer.status == 200, answer.body
    offer = answer.json()
    manifest = verified(world, offer)
    assert (str(manifest.node), manifest.kind, manifest.version) == (NODE, "merged", 1)
    assert [(f["name"], f["size"], f["sha256"]) for f in offer["files"]] == [
        (f.name, f.length, f.sha256) for f in manifest.files
    ]
    with Client(world.server.target, token=world.tokens["globex"]) as c:  # the same signed bytes as gRPC's Offer
        grpc_offer = c.offer(NODE, "merged")
    assert json.dumps(offer["manifest"], sort_keys=True, separators=(",", ":")).encode() == grpc_offer.manifest
    for entry in offer["files"]:
        got = fetch(world, entry["url"])
        assert got.status == 200 and got.headers["accept-ranges"] == "bytes"
        assert got.headers["etag"] == f'"{entry["sha256"]}"'
        assert len(got.body) == manifest.file(entry["name"]).length
        assert hashlib.sha256(got.body).hexdigest() == manifest.file(entry["name"]).sha256
    assert settled(world)


def test_a_flat_offer_names_the_base_it_runs_over(world):
    offer = get(world, offer_path(f"{NODE}@1", "flat")).json()
    manifest = verified(world, offer)
    assert offer["requires"] is not None and manifest.requires is not None
    base = verified(world, offer["requires"])
    assert base.key == manifest.requires.key == offer["requires"]["key"]


def test_a_range_after_an_interruption_transfers_only_the_rest(world):
    offer = get(world, offer_path(NODE, "merged")).json()
    entry = max(offer["files"], key=lambda f: f["size"])
    url = urllib.parse.urlparse(world.base_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.request("GET", entry["url"], headers={"Authorization": f"Bearer {world.tokens['globex']}"})
    first = conn.getresponse()
    assert first.status == 200 and int(first.headers["content-length"]) == entry["size"]
    have = first.read(100_000)  # the connection dies here
    conn.sock.close()
    conn.close()
    assert len(have) == 100_000 < entry["size"]
    rest = fetch(world, entry["url"], Range=f"bytes={len(have)}-")
    assert rest.status == 206, rest.body
    assert rest.headers["content-range"] == f"bytes {len(have)}-{entry['size'] - 1}/{entry['size']}"
    assert len(rest.body) == int(rest.headers["content-length"]) == entry["size"] - len(have)
    assert hashlib.sha256(have + rest.body).hexdigest() == entry["sha256"]
    middle = fetch(world, entry["url"], Range="bytes=10-19")
    tail = fetch(world, entry["url"], Range="bytes=-7")
    whole = have + rest.body
    assert (middle.status, middle.body) == (206, whole[10:20])
    assert (tail.status, tail.body) == (206, whole[-7:])
    for bad in (f"bytes={entry['size']}-", "bytes=5-2", "bytes=0-1,4-5", "items=0-", "bytes=-0"):
        refused = fetch(world, entry["url"], Range=bad)
        assert refused.status == 416, (bad, refused.body)
        assert refused.error["code"] == "range_not_satisfiable" and str(entry["size"]) in refused.error["message"]
        assert refused.headers["content-range"] == f"bytes */{entry['size']}"
    assert settled(world)  # the cut-off stream was booked as finished too


def test_another_tenants_private_node_is_an_unknown_node(world):
    mine = get(world, offer_path(PRIVATE, "flat"), tenant="acme")
    assert mine.status == 200, mine.body
    key, name = mine.json()["key"], mine.json()["files"][0]["name"]
    hidden = get(world, offer_path(PRIVATE, "flat"))
    unknown = get(world, offer_path("rt/en/legal/nda", "flat"))
    assert hidden.status == unknown.status == 404
    assert hidden.body.replace(PRIVATE.encode(), b"X") == unknown.body.replace(b"rt/en/legal/nda", b"X")
    assert hidden.error["code"] == "model_not_found"
    q = urllib.parse.quote
    stolen = get(world, f"/files/{key}/{q(name)}?node={q(PRIVATE)}")
    nothing = get(world, f"/files/{key}/{q(name)}?node={q('rt/en/legal/nda')}")
    assert stolen.status == nothing.status == 404
    assert stolen.body.replace(PRIVATE.encode(), b"X") == nothing.body.replace(b"rt/en/legal/nda", b"X")
    via_other = get(world, f"/files/{key}/{q(name)}?node={q(NODE)}")  # the key belongs to another node
    assert via_other.status == 404


def test_tokens_and_bad_requests(world):
    offer = get(world, offer_path(NODE, "merged")).json()
    file_path = offer["files"][0]["url"].removeprefix("/v1" + PREFIX)
    for path in ("/trust/rt", offer_path(NODE, "merged"), file_path):
        assert get(world, path, tenant=None).status == 401
        bad = call(world.base_url, "GET", PREFIX + path, token="tlm_not-a-token")
        assert bad.status == 401 and bad.error["type"] == "authentication_error"
    missing = get(world, f"/offer?node={NODE}")
    assert (missing.status, missing.error["param"]) == (400, "variant")
    kind = get(world, offer_path(NODE, "zip"))
    assert (kind.status, kind.error["param"]) == (400, "variant")
    version = get(world, offer_path(f"{NODE}@9", "merged"))
    assert (version.status, version.error["param"]) == (400, "version")
    assert get(world, offer_path("not a node", "merged")).error["param"] == "node"
    q = urllib.parse.quote
    assert get(world, f"/files/abc/x?node={q(NODE)}").error["param"] == "key"
    no_file = get(world, f"/files/{offer['key']}/nothing.bin?node={q(NODE)}")
    assert (no_file.status, no_file.error["param"]) == (400, "file")
    pinned = get(world, f"/files/{offer['key']}/x?node={q(NODE + '@1')}")
    assert (pinned.status, pinned.error["param"]) == (400, "node")
    assert get(world, "/trust/nowhere").status == 404


def test_a_server_without_a_variant_key_answers_501(world):
    bare = serve(world, http_port=0)
    try:
        answer = call(bare.server.http_url, "GET", PREFIX + offer_path(NODE, "merged"), token=world.tokens["globex"])
        assert answer.status == 501 and "variant signing key" in answer.error["message"]
    finally:
        bare.stop()
