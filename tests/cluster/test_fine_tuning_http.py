"""OpenAI's files and fine-tuning jobs endpoints on a real TreeServer (engine, SQLite registry,
tokens, real sockets), driven by the official openai client and by raw HTTP for exact statuses,
error bodies and headers. Every refusal is checked to have stored nothing (the rows of the files,
jobs, events and nodes tables are compared). No job runner runs: jobs stay queued, which is what
cancelling a queued job needs; a finished job is made with the registry call a runner makes.
"""

from __future__ import annotations

import json
import uuid

import openai
import pytest

from cluster.jobs.data import MAX_FILE_BYTES
from cluster.service.fine_tuning_io import UploadSlots
from registry.jobs import ACTIVE_JOB_STATUSES, claim_job, finish_job, list_jobs, request_cancel
from tests.cluster.fine_tuning_world import (
    PARENT,
    PRIVATE_PARENT,
    chat_jsonl,
    fine_tuning_calls,
    plain_text,
    serve_fine_tuning,
    stored,
)
from tests.cluster.grpc_harness import make_world
from tests.cluster.http_harness import call, openai_client

pytestmark = pytest.mark.timeout(240)

BOUNDARY = "treelm-test-boundary"


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("ft-http"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    s = serve_fine_tuning(world, fine_tuning_calls(world, tmp_path_factory.mktemp("keys") / "service"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def url(server):
    return server.server.http_url


@pytest.fixture(scope="module")
def acme(url, world):
    return openai_client(url, world.tokens["acme"])


@pytest.fixture(autouse=True)
def no_active_jobs(world):
    """Each test starts within its tenants' job quota: what earlier tests queued is cancelled."""
    yield
    for job in list_jobs(world.registry, None, limit=100, statuses=ACTIVE_JOB_STATUSES):
        request_cancel(world.registry, job.job_id, None)


def multipart(fields: dict[str, str], file: tuple[str, bytes] | None) -> tuple[bytes, dict[str, str]]:
    parts = []
    for name, value in fields.items():
        parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    if file is not None:
        filename, content = file
        head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
    body = b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def upload(url: str, token: str, content: bytes, filename: str = "notes.jsonl", purpose: str = "fine-tune"):
    body, headers = multipart({"purpose": purpose}, (filename, content))
    return call(url, "POST", "/files", body, token=token, headers=headers)


def job_body(training_file: str, suffix: str, **extra) -> dict:
    return {"model": PARENT, "training_file": training_file, "suffix": suffix, **extra}


def suffix() -> str:
    return f"clinic-{uuid.uuid4().hex[:8]}"


# -- files -------------------------------------------------------------------------------------------


def test_the_openai_client_uploads_lists_retrieves_and_deletes_chat_and_text_files(acme, url, world):
    chat = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    assert chat.object == "file" and chat.id.startswith("file-") and chat.purpose == "fine-tune"
    assert chat.bytes == len(chat_jsonl()) and chat.filename == "notes.jsonl" and chat.status == "processed"
    raw = call(url, "GET", f"/files/{chat.id}", token=world.tokens["acme"]).json()
    assert (raw["format"], raw["records"]) == ("jsonl", 12)
    text = acme.files.create(file=("ward.txt", plain_text()), purpose="fine-tune")
    assert call(url, "GET", f"/files/{text.id}", token=world.tokens["acme"]).json()["format"] == "text"

    listed = [f.id for f in acme.files.list()]
    assert listed[:2] == [text.id, chat.id]  # newest first
    assert acme.files.retrieve(chat.id).sha256 == raw["sha256"]
    one = call(url, "GET", "/files?limit=1", token=world.tokens["acme"]).json()
    assert one["has_more"] is True and [f["id"] for f in one["data"]] == [text.id]
    after = call(url, "GET", f"/files?limit=1&after={text.id}", token=world.tokens["acme"]).json()
    assert [f["id"] for f in after["data"]] == [chat.id]

    deleted = acme.files.delete(text.id)
    assert (deleted.id, deleted.deleted) == (text.id, True)
    with pytest.raises(openai.NotFoundError) as gone:
        acme.files.retrieve(text.id)
    assert gone.value.body["code"] == "file_not_found"


def test_bad_uploads_are_refused_with_the_reason_and_store_nothing(url, world):
    token = world.tokens["acme"]
    before = stored(world)
    good = chat_jsonl()
    cases = [
        (b"", "notes.jsonl", 400, "file", "empty"),
        (b"  \n\n ", "notes.txt", 400, "file", "empty"),
        (good[:100] + b"\xff\xfe" + good[100:], "notes.jsonl", 400, "file", "line 1: not UTF-8"),
        (good + b'{"messages": [}\n', "notes.jsonl", 400, "file", "line 13: not valid JSON"),
        (good + b'{"messages": [{"role": "user", "content": "hi"}]}\n', "notes.jsonl", 400, "file", "line 13"),
        (b'{"text": "too short"}\n', "notes.jsonl", 400, "file", "characters of training text"),
        (b"x" * (MAX_FILE_BYTES + 1), "notes.txt", 400, "file", f"the limit is {MAX_FILE_BYTES}"),
    ]
    for content, filename, status, param, words in cases:
        got = upload(url, token, content, filename)
        assert got.status == status, (words, got.body[:300])
        assert got.error["param"] == param and got.error["code"] == "invalid_value", got.error
        assert words in got.error["message"], got.error["message"]
    wrong = upload(url, token, good, purpose="assistants")
    assert wrong.status == 400 and wrong.error["param"] == "purpose"
    body, headers = multipart({"purpose": "fine-tune"}, None)
    missing = call(url, "POST", "/files", body, token=token, headers=headers)
    assert missing.status == 400 and missing.error["param"] == "file"
    not_multipart = call(url, "POST", "/files", {"file": "x", "purpose": "fine-tune"}, token=token)
    assert not_multipart.status == 400 and "multipart/form-data" in not_multipart.error["message"]
    assert stored(world) == before


def test_an_upload_over_the_body_limit_is_refused_413_before_it_is_read_whole(url, world):
    token = world.tokens["acme"]
    before = stored(world)
    huge, headers = multipart({"purpose": "fine-tune"}, ("big.txt", b"y" * (MAX_FILE_BYTES + 100_000)))
    declared = call(url, "POST", "/files", huge, token=token, headers=headers)
    assert declared.status == 413 and declared.error["code"] == "request_too_large"
    sent = 0

    def chunks():  # no Content-Length: the server counts what arrives and stops at the limit
        nonlocal sent
        for i in range(0, len(huge), 1 << 20):
            sent += 1
            yield huge[i : i + (1 << 20)]

    streamed = call(url, "POST", "/files", chunks(), token=token, headers=headers)
    assert streamed.status == 413 and streamed.error["code"] == "request_too_large"
    assert stored(world) == before


def test_uploads_in_progress_are_bounded_per_tenant():
    from cluster.errors import UploadRefused
    from cluster.service.auth import Caller

    slots = UploadSlots(per_tenant=1, total=2)
    acme, globex, ops = Caller("acme"), Caller("globex"), Caller("ops", "operator")
    with slots.hold(acme):
        with pytest.raises(UploadRefused, match="your tenant has 1 file uploads"):
            with slots.hold(acme):
                pass
        with slots.hold(globex):
            with pytest.raises(UploadRefused, match="the server has 2"):
                with slots.hold(ops):
                    pass
    with slots.hold(acme):  # released on the way out
        pass


def test_another_tenants_file_and_job_ids_are_answered_like_unknown_ones(acme, url, world):
    mine = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=PARENT, training_file=mine.id, suffix=suffix())
    theirs = world.tokens["globex"]
    for method, path in (
        ("GET", f"/files/{mine.id}"),
        ("DELETE", f"/files/{mine.id}"),
        ("GET", f"/fine_tuning/jobs/{job.id}"),
        ("GET", f"/fine_tuning/jobs/{job.id}/events"),
        ("POST", f"/fine_tuning/jobs/{job.id}/cancel"),
    ):
        real = mine.id if "/files/" in path else job.id
        made_up = real[:-6] + "abcdef"
        foreign = call(url, method, path, token=theirs)
        unknown = call(url, method, path.replace(real, made_up), token=theirs)
        assert foreign.status == unknown.status == 404, (path, foreign.body)
        assert foreign.error == {**unknown.error, "message": unknown.error["message"].replace(made_up, real)}
    assert globex_sees_nothing(url, theirs)
    assert acme.fine_tuning.jobs.retrieve(job.id).status == "queued"  # untouched by the other tenant's cancel


def globex_sees_nothing(url: str, token: str) -> bool:
    files = call(url, "GET", "/files", token=token).json()["data"]
    jobs = call(url, "GET", "/fine_tuning/jobs", token=token).json()["data"]
    return files == [] and jobs == []


# -- jobs ---------------------------------------------------------------------------------------------


def test_the_openai_client_creates_retrieves_lists_and_cancels_a_job(acme, url, world):
    training = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    validation = acme.files.create(file=("held.txt", plain_text()), purpose="fine-tune")
    name = suffix()
    job = acme.fine_tuning.jobs.create(
        model=PARENT,
        training_file=training.id,
        validation_file=validation.id,
        suffix=name,
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 0.5},
    )
    assert job.object == "fine_tuning.job" and job.id.startswith("ftjob-") and job.status == "queued"
    assert (job.model, job.training_file, job.validation_file) == (PARENT, training.id, validation.id)
    assert job.fine_tuned_model is None and job.finished_at is None and job.error is None
    assert job.hyperparameters.n_epochs == 2 and job.organization_id == "acme"
    raw = call(url, "GET", f"/fine_tuning/jobs/{job.id}", token=world.tokens["acme"]).json()
    assert raw["node"] == f"{PARENT}/{name}" and raw["visibility"] == "private" and raw["result"] == {}
    assert raw["hyperparameters"]["learning_rate"] == pytest.approx(0.001)  # half the policy's 0.002
    assert acme.fine_tuning.jobs.retrieve(job.id).id == job.id
    assert job.id in [j.id for j in acme.fine_tuning.jobs.list()]

    events = acme.fine_tuning.jobs.list_events(job.id)
    assert [e.message for e in events.data] == ["job queued"]
    assert events.data[0].object == "fine_tuning.job.event" and events.data[0].id.startswith("ftevent-")

    cancelled = acme.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert [e.message for e in acme.fine_tuning.jobs.list_events(job.id).data] == [
        "job cancelled before it started",
        "job queued",
    ]
    with pytest.raises(openai.ConflictError) as again:
        acme.fine_tuning.jobs.cancel(job.id)
    assert again.value.body["code"] == "job_finished"


def test_method_supervised_hyperparameters_are_the_same_as_hyperparameters(acme):
    training = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(
        model=PARENT,
        training_file=training.id,
        suffix=suffix(),
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 4, "batch_size": 2}}},
    )
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (4, 2)


def test_lists_of_jobs_and_events_page_with_has_more_and_after(acme, url, world):
    token = world.tokens["acme"]
    training = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    ids = []
    for _ in range(3):  # each cancelled at once: the quota counts queued and running jobs only
        job = acme.fine_tuning.jobs.create(model=PARENT, training_file=training.id, suffix=suffix())
        acme.fine_tuning.jobs.cancel(job.id)
        ids.append(job.id)
    first = call(url, "GET", "/fine_tuning/jobs?limit=2", token=token).json()
    assert [j["id"] for j in first["data"]] == ids[::-1][:2] and first["has_more"] is True
    second = call(url, "GET", f"/fine_tuning/jobs?limit=2&after={ids[1]}", token=token).json()
    assert second["data"][0]["id"] == ids[0]
    pages = acme.fine_tuning.jobs.list(limit=1)  # the client follows has_more with after=
    assert [j.id for j in pages][:3] == ids[::-1]

    events = call(url, "GET", f"/fine_tuning/jobs/{ids[0]}/events?limit=1", token=token).json()
    assert events["has_more"] is True and events["data"][0]["message"] == "job cancelled before it started"
    rest = call(url, "GET", f"/fine_tuning/jobs/{ids[0]}/events?after={events['data'][0]['id']}", token=token).json()
    assert [e["message"] for e in rest["data"]] == ["job queued"] and rest["has_more"] is False
    assert [e.message for e in acme.fine_tuning.jobs.list_events(ids[0], limit=1)] == [
        "job cancelled before it started",
        "job queued",
    ]
    bad = call(url, "GET", "/fine_tuning/jobs?limit=101", token=token)
    assert bad.status == 400 and bad.error["param"] == "limit"
    bad_after = call(url, "GET", f"/fine_tuning/jobs/{ids[0]}/events?after=yesterday", token=token)
    assert bad_after.status == 400 and bad_after.error["param"] == "after"


def test_a_finished_job_shows_its_model_and_result_and_cannot_be_cancelled(acme, url, world):
    training = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=PARENT, training_file=training.id, suffix=suffix())
    claimed = claim_job(world.registry, "rt", "test-worker")  # what a runner does (none runs here)
    assert claimed is not None and claimed.job_id == job.id
    result = {"perplexity": 12.5, "parent_perplexity": 19.0, "trained_tokens": 4096, "version": 1}
    finish_job(world.registry, job.id, "succeeded", result=result)
    done = acme.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == claimed.node and done.trained_tokens == 4096
    raw = call(url, "GET", f"/fine_tuning/jobs/{job.id}", token=world.tokens["acme"]).json()
    assert raw["result"] == result and raw["started_at"] is not None
    refused = call(url, "POST", f"/fine_tuning/jobs/{job.id}/cancel", token=world.tokens["acme"])
    assert refused.status == 409 and refused.error["code"] == "job_finished"

    failed = acme.fine_tuning.jobs.create(model=PARENT, training_file=training.id, suffix=suffix())
    claim_job(world.registry, "rt", "test-worker")
    error = {"code": "gate", "message": "the new node's held-out perplexity 20.1 is not below its parent's 19.0"}
    finish_job(world.registry, failed.id, "failed", error=error, result={"perplexity": 20.1})
    got = acme.fine_tuning.jobs.retrieve(failed.id)
    assert got.status == "failed" and got.fine_tuned_model is None
    assert (got.error.code, got.error.message, got.error.param) == ("gate", error["message"], None)


def test_every_bad_job_is_refused_with_its_status_code_and_param_and_stores_nothing(acme, url, world, server):
    token, theirs = world.tokens["acme"], world.tokens["globex"]
    training = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune").id
    queued = acme.fine_tuning.jobs.create(model=PARENT, training_file=training, suffix=suffix())
    building = call(url, "GET", f"/fine_tuning/jobs/{queued.id}", token=token).json()["node"]
    globex_file = upload(url, theirs, chat_jsonl()).json()["id"]
    before = stored(world)

    def refused(body, status, code, param, who=token):
        got = call(url, "POST", "/fine_tuning/jobs", body, token=who)
        assert got.status == status, (body, got.body)
        assert (got.error["code"], got.error["param"]) == (code, param), got.error
        assert stored(world) == before, body
        return got

    unknown = refused(job_body(training, suffix(), model="rt/en/nowhere"), 404, "model_not_found", None)
    foreign = refused(job_body(globex_file, suffix(), model=PRIVATE_PARENT), 404, "model_not_found", None, theirs)
    assert foreign.error["message"] == unknown.error["message"].replace("rt/en/nowhere", PRIVATE_PARENT)
    refused(job_body(training, "Bad Name!"), 400, "invalid_value", "suffix")
    refused(job_body(training, None), 400, "invalid_value", "suffix")
    refused(job_body(training, "radiology"), 409, "node_exists", "suffix")  # rt/en/medical/radiology exists
    refused(job_body(training, building.rsplit("/", 1)[1]), 409, "node_exists", "suffix")  # another job makes it
    refused(job_body(training, suffix(), model=PRIVATE_PARENT), 400, "invalid_value", "model")  # deepest level
    refused(job_body(training, suffix(), model=f"{PARENT}@1"), 400, "invalid_value", "model")
    refused(job_body("file-nope", suffix()), 404, "file_not_found", "training_file")
    refused(job_body(globex_file, suffix()), 404, "file_not_found", "training_file")  # another tenant's
    refused(job_body(training, suffix(), validation_file="file-nope"), 404, "file_not_found", "validation_file")
    refused(
        job_body(training, suffix(), hyperparameters={"n_epochs": 0}), 400, "invalid_value", "hyperparameters.n_epochs"
    )
    refused(
        job_body(training, suffix(), hyperparameters={"dropout": 0.1}), 400, "invalid_value", "hyperparameters.dropout"
    )
    refused(job_body(training, suffix(), seed=3), 400, "unknown_parameter", "seed")
    refused(job_body(training, suffix(), method={"type": "dpo"}), 400, "invalid_value", "method.type")
    public = refused(job_body(training, suffix(), visibility="public"), 403, "permission_denied", None)
    assert "operator" in public.error["message"]

    for _ in range(2):  # up to the quota of 3 (one is queued already)
        acme.fine_tuning.jobs.create(model=PARENT, training_file=training, suffix=suffix())
    before = stored(world)
    over = refused(job_body(training, suffix()), 429, "job_quota", None)
    assert over.headers["retry-after"] == "30" and "wait for one to finish or cancel one" in over.error["message"]


def test_an_operator_creates_a_public_node_job(url, world):
    ops = world.operator_token
    training = upload(url, ops, chat_jsonl()).json()["id"]
    got = call(url, "POST", "/fine_tuning/jobs", job_body(training, suffix(), visibility="public"), token=ops)
    assert got.status == 200 and got.json()["visibility"] == "public" and got.json()["organization_id"] == "ops"


def test_a_file_a_queued_job_reads_cannot_be_deleted(acme, url, world):
    training = acme.files.create(file=("notes.jsonl", chat_jsonl()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.create(model=PARENT, training_file=training.id, suffix=suffix())
    before = stored(world)
    busy = call(url, "DELETE", f"/files/{training.id}", token=world.tokens["acme"])
    assert busy.status == 409 and busy.error["code"] == "file_in_use" and stored(world) == before
    acme.fine_tuning.jobs.cancel(job.id)
    assert acme.files.delete(training.id).deleted


def test_a_tree_without_a_customize_key_and_a_server_without_fine_tuning_answer_501(world, tmp_path):
    other_tree = serve_fine_tuning(world, fine_tuning_calls(world, tmp_path / "k", trees=("elsewhere",)))
    without = serve_fine_tuning(world, None)
    try:
        token = world.tokens["acme"]
        url = other_tree.server.http_url
        training = upload(url, token, chat_jsonl()).json()["id"]
        before = stored(world)
        off = call(url, "POST", "/fine_tuning/jobs", job_body(training, suffix()), token=token)
        assert off.status == 501 and off.error["code"] == "fine_tuning_off" and "customize.key" in off.error["message"]
        assert stored(world) == before
        for method, path in (("GET", "/files"), ("GET", "/fine_tuning/jobs"), ("GET", "/fine_tuning/jobs/x")):
            got = call(without.server.http_url, method, path, token=token)
            assert got.status == 501 and got.error["code"] == "fine_tuning_off", got.body
        assert upload(without.server.http_url, token, chat_jsonl()).status == 501
    finally:
        other_tree.stop()
        without.stop()


def test_routes_need_a_token(url):
    for method, path in (("GET", "/files"), ("POST", "/fine_tuning/jobs"), ("GET", "/fine_tuning/jobs/x/events")):
        got = call(url, method, path, {} if method == "POST" else None)
        assert got.status == 401 and got.error["type"] == "authentication_error"
    assert json.loads(upload(url, "tlm_not_a_token", chat_jsonl()).body)["error"]["code"] == "invalid_api_key"


def test_a_tenant_over_its_stored_files_is_refused_429_file_quota_and_nothing_is_stored(world, tmp_path):
    from cluster.service.quota import TenantQuota

    # This server's limits: one stored file a tenant.
    server = serve_fine_tuning(
        world, fine_tuning_calls(world, tmp_path / "service", limits=TenantQuota(stored_files=1))
    )
    try:
        url = server.server.http_url
        mine = [f.id for f in openai_client(url, world.tokens["globex"]).files.list()]
        for file_id in mine:  # earlier tests' files of globex: start from none
            call(url, "DELETE", f"/files/{file_id}", token=world.tokens["globex"])
        first = upload(url, world.tokens["globex"], chat_jsonl())
        assert first.status == 200
        before = stored(world)
        with pytest.raises(openai.RateLimitError) as refused:
            openai_client(url, world.tokens["globex"]).files.create(
                file=("more.jsonl", chat_jsonl()), purpose="fine-tune"
            )
        assert refused.value.body["code"] == "file_quota" and "its limit is 1" in refused.value.body["message"]
        assert stored(world) == before
        assert call(url, "DELETE", f"/files/{first.json()['id']}", token=world.tokens["globex"]).status == 200
        assert upload(url, world.tokens["globex"], chat_jsonl()).status == 200  # room again
    finally:
        server.stop()
