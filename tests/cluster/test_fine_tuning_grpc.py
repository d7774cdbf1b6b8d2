"""treelm.v1.FineTuning and Admin.RetireNode on a real TreeServer over real sockets: the raw stub for
exact status codes and trailing metadata, and the SDK (blocking and asyncio) for typed results,
typed errors and job handles that follow a job to its end. No job runner runs here: a test moves a
job with the registry calls a runner makes (claim, events, finish), in a thread while the SDK waits.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import grpc
import pytest

import treelm
from cluster.jobs.data import MAX_FILE_BYTES
from cluster.service.uploads import UploadLimits
from cluster.updates.coordinator import Coordinator
from protos.treelm.v1 import fine_tuning_pb2, fine_tuning_pb2_grpc
from registry.jobs import ACTIVE_JOB_STATUSES, list_jobs, request_cancel
from tests.cluster.fine_tuning_world import (
    PARENT,
    PRIVATE_PARENT,
    QUOTA,
    chat_jsonl,
    fine_tuning_calls,
    move_job,
    move_job_later,
    plain_text,
    serve_fine_tuning,
    stored,
)
from tests.cluster.grpc_harness import make_world, serve

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def world(tiny_base_dir, tmp_path_factory):
    w = make_world(tiny_base_dir, tmp_path_factory.mktemp("ft-grpc"))
    yield w
    w.engine.close()
    w.registry.close()


@pytest.fixture(scope="module")
def server(world, tmp_path_factory):
    calls = fine_tuning_calls(world, tmp_path_factory.mktemp("keys") / "service")
    s = serve_fine_tuning(world, calls, http_port=None, uploads=UploadLimits(idle_s=1.0))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def sdk(server, world):
    with treelm.Client(server.target, token=world.tokens["acme"], timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.target)
    yield fine_tuning_pb2_grpc.FineTuningStub(channel)
    channel.close()


@pytest.fixture(autouse=True)
def no_active_jobs(world):
    yield
    for job in list_jobs(world.registry, None, limit=100, statuses=ACTIVE_JOB_STATUSES):
        request_cancel(world.registry, job.job_id, None)


_counter = iter(range(10_000))


def name() -> str:
    return f"clinic-{next(_counter)}-{int(time.time() * 1000) % 100000}"


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def refusal(call, *args, **kwargs) -> tuple[grpc.StatusCode, dict[str, str], str]:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    meta = {k: v for k, v in (info.value.trailing_metadata() or ())}
    return info.value.code(), meta, info.value.details()


# -- files ---------------------------------------------------------------------------------------------


def test_the_sdk_uploads_a_path_bytes_and_records_and_lists_gets_and_deletes(sdk, tmp_path):
    path = tmp_path / "ward.txt"
    path.write_bytes(plain_text())
    from_path = sdk.upload_file(path)
    assert (from_path.filename, from_path.format, from_path.bytes) == ("ward.txt", "text", len(plain_text()))
    from_bytes = sdk.upload_file(chat_jsonl())
    assert (from_bytes.format, from_bytes.records) == ("jsonl", 12)
    records = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x " * 300}]}]
    from_records = sdk.upload_file([*records, "A ward note. " * 50])
    assert (from_records.format, from_records.records) == ("jsonl", 2)

    listed = [f.id for f in sdk.files()]
    assert listed[:3] == [from_records.id, from_bytes.id, from_path.id]
    assert sdk.file(from_path.id) == from_path
    assert sdk.delete_file(from_path.id) is True
    with pytest.raises(treelm.FileNotFound):
        sdk.file(from_path.id)


def test_a_file_of_several_chunks_arrives_whole(sdk):
    content = ("\n\n".join(f"Document {i}: " + "word " * 400 for i in range(1200))).encode()
    assert 1 << 20 < len(content) < MAX_FILE_BYTES  # more than one 1 MiB chunk
    uploaded = sdk.upload_file(content, filename="corpus.txt")
    assert uploaded.sha256 == hashlib.sha256(content).hexdigest() and uploaded.records == 1200


def test_bad_uploads_are_typed_errors_naming_the_field_and_store_nothing(sdk, stub, world):
    before = stored(world)
    for content, words in (
        (b"", "empty"),
        (b'{"messages": [{"role": "bot", "content": "x"}]}\n', "line 1: messages[0].role"),
        (chat_jsonl() + b"[1, 2]\n", "line 13: expected a JSON object"),
        (b"\xc3\x28" + b"a" * 2000, "not UTF-8"),
        (b'{"text": "a short note"}\n', "characters of training text"),
        (b"y" * (MAX_FILE_BYTES + 1), f"more than {MAX_FILE_BYTES} bytes"),
    ):
        with pytest.raises(treelm.InvalidRequest) as bad:
            sdk.upload_file(content, filename="notes.jsonl")
        assert bad.value.field == "file" and words in bad.value.details, bad.value.details
    with pytest.raises(treelm.InvalidRequest) as purpose:
        sdk.upload_file(chat_jsonl(), purpose="batch")
    assert purpose.value.field == "purpose"
    token = world.tokens["acme"]
    code, meta, _ = refusal(stub.UploadFile, iter(()), metadata=auth(token))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and meta["treelm-error-field"] == "file"
    second_names = iter([fine_tuning_pb2.UploadFileChunk(filename="a.txt", purpose="fine-tune", data=b"a"),
                         fine_tuning_pb2.UploadFileChunk(filename="b.txt", data=b"b")])  # fmt: skip
    code, meta, _ = refusal(stub.UploadFile, second_names, metadata=auth(token))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and meta["treelm-error-field"] == "filename"

    def idle():
        yield fine_tuning_pb2.UploadFileChunk(filename="a.txt", purpose="fine-tune", data=b"a")
        time.sleep(3)  # the server's idle deadline is 1 s here

    code, meta, _ = refusal(stub.UploadFile, idle(), metadata=auth(token))
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED and meta["treelm-error-kind"] == "upload-idle"
    assert stored(world) == before


# -- jobs ------------------------------------------------------------------------------------------------


def test_customize_uploads_creates_and_wait_follows_the_job_to_its_new_node(sdk, world):
    suffix = name()
    job = sdk.customize(PARENT, chat_jsonl(), suffix=suffix, validation=plain_text(), n_epochs=2, lora_rank=4)
    assert isinstance(job, treelm.FineTuneJob) and job.status == "queued" and job.node == f"{PARENT}/{suffix}"
    assert job.state.validation_file is not None and job.state.visibility == "private"
    assert (job.state.hyperparameters["n_epochs"], job.state.hyperparameters["lora_rank"]) == (2, 4)
    result = {"perplexity": 12.0, "parent_perplexity": 18.0, "version": 1, "timings": {"training_s": 3.5}}
    runner = move_job_later(world, job.id, steps=3, result=result)
    seen: list[treelm.JobEvent] = []
    assert job.wait(timeout=60, on_event=seen.append) is job
    runner.join(10)
    assert job.status == "succeeded" and job.fine_tuned_model == job.node and job.result == result
    steps = [(e.step, e.total_steps) for e in seen if e.step is not None]
    assert steps == [(1, 3), (2, 3), (3, 3)] and seen[3].loss == pytest.approx(1.5)
    assert [e.message for e in seen][:2] == ["job queued", "job started on test-runner"]
    assert seen[-1].message == "job succeeded" and [e.id for e in seen] == sorted(e.id for e in seen)
    assert [e.message for e in job.events()] == [e.message for e in seen]
    resumed = list(job.watch(since=seen[-3].id))  # a watcher that reconnects sends where it left off
    assert [e.id for e in resumed] == [e.id for e in seen[-2:]]
    again = sdk.fine_tuning_job(job.id)
    assert again.fine_tuned_model == job.node and again.state.finished_at is not None


def test_wait_raises_job_failed_with_the_reason_and_job_cancelled_after_a_cancel(sdk, world):
    training = sdk.upload_file(chat_jsonl()).id
    job = sdk.create_job(PARENT, training, suffix=name())
    error = {"code": "gate", "message": "held-out perplexity 19.2 is not below the parent's 18.0"}
    runner = move_job_later(world, job.id, steps=1, status="failed", error=error, result={"perplexity": 19.2})
    with pytest.raises(treelm.JobFailed) as failed:
        job.wait(timeout=60)
    runner.join(10)
    assert failed.value.reason == "gate" and failed.value.job.status == "failed" and "19.2" in str(failed.value)
    assert job.error == treelm.JobFailure("gate", error["message"]) and job.fine_tuned_model is None

    queued = sdk.create_job(PARENT, training, suffix=name())
    assert queued.cancel().status == "cancelled"
    with pytest.raises(treelm.JobCancelled) as cancelled:
        queued.wait(timeout=60)
    assert isinstance(cancelled.value, treelm.JobFailed) and cancelled.value.reason == "cancelled"
    with pytest.raises(treelm.JobFinished):
        queued.cancel()


def test_wait_gives_up_at_its_timeout(sdk):
    job = sdk.customize(PARENT, chat_jsonl(), suffix=name())
    with pytest.raises(treelm.DeadlineExceeded):
        job.wait(timeout=1.0)  # no runner: the job stays queued
    assert job.refresh().status == "queued"


def test_jobs_list_newest_first_in_pages(sdk):
    training = sdk.upload_file(chat_jsonl()).id
    made = []
    for _ in range(3):
        job = sdk.create_job(PARENT, training, suffix=name())
        job.cancel()
        made.append(job.id)
    first = sdk.fine_tuning_jobs(limit=2)
    assert [j.id for j in first] == made[::-1][:2]
    second = sdk.fine_tuning_jobs(limit=2, after=first[-1].id)
    assert second[0].id == made[0]


def test_every_bad_job_is_refused_with_its_code_kind_and_field_and_stores_nothing(sdk, stub, server, world):
    token, theirs = world.tokens["acme"], world.tokens["globex"]
    training = sdk.upload_file(chat_jsonl()).id
    queued = sdk.create_job(PARENT, training, suffix=name())
    with treelm.Client(server.target, token=theirs) as globex:
        their_file = globex.upload_file(chat_jsonl()).id
    before = stored(world)

    def create(who=token, **fields):
        request = fine_tuning_pb2.CreateJobRequest(model=PARENT, training_file=training, suffix=name())
        for key, value in fields.items():
            if key == "hyperparameters":
                request.hyperparameters.CopyFrom(fine_tuning_pb2.Hyperparameters(**value))
            else:
                setattr(request, key, value)
        code, meta, details = refusal(stub.CreateJob, request, metadata=auth(who))
        assert stored(world) == before, fields
        return code, meta.get("treelm-error-kind"), meta.get("treelm-error-field"), details

    unknown = create(model="rt/en/nowhere")
    assert unknown[:3] == (grpc.StatusCode.NOT_FOUND, "node-not-found", None)
    foreign = create(theirs, model=PRIVATE_PARENT, training_file=their_file)
    assert foreign[:3] == unknown[:3] and foreign[3] == unknown[3].replace("rt/en/nowhere", PRIVATE_PARENT)
    assert create(suffix="Not A Name")[:3] == (grpc.StatusCode.INVALID_ARGUMENT, None, "suffix")
    assert create(suffix="cardiology")[:3] == (grpc.StatusCode.ALREADY_EXISTS, "node-exists", "suffix")
    assert create(suffix=queued.node.rsplit("/", 1)[1])[:3] == (grpc.StatusCode.ALREADY_EXISTS, "node-exists", "suffix")
    assert create(training_file="file-0")[:3] == (grpc.StatusCode.NOT_FOUND, "file-not-found", "training_file")
    assert create(training_file=their_file)[:3] == (grpc.StatusCode.NOT_FOUND, "file-not-found", "training_file")
    assert create(hyperparameters={"lora_rank": 64})[:3] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        None,
        "hyperparameters.lora_rank",
    )
    assert create(hyperparameters={"learning_rate": 0.01, "learning_rate_multiplier": 2.0})[2] == (
        "hyperparameters.learning_rate"
    )
    assert create(visibility="public")[0] is grpc.StatusCode.PERMISSION_DENIED
    assert create(visibility="everyone")[:3] == (grpc.StatusCode.INVALID_ARGUMENT, None, "visibility")

    for _ in range(QUOTA - 1):
        sdk.create_job(PARENT, training, suffix=name())
    before = stored(world)
    code, meta, _ = refusal(
        stub.CreateJob,
        fine_tuning_pb2.CreateJobRequest(model=PARENT, training_file=training, suffix=name()),
        metadata=auth(token),
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and meta["treelm-error-kind"] == "job-quota"
    assert meta["retry-after"] == "30" and stored(world) == before
    with pytest.raises(treelm.JobQuotaExceeded) as quota:  # never retried: the create call is not idempotent
        sdk.create_job(PARENT, training, suffix=name())
    assert quota.value.retry_after == 30 and not quota.value.retryable

    with pytest.raises(treelm.NodeNotFound):
        sdk.create_job("rt/en/nowhere", training, suffix=name())
    with pytest.raises(treelm.NodeExists):
        sdk.create_job(PARENT, training, suffix="radiology")
    with pytest.raises(treelm.PermissionDenied):
        sdk.create_job(PARENT, training, suffix=name(), public=True)
    with pytest.raises(treelm.InvalidRequest) as negative:
        sdk.create_job(PARENT, training, suffix=name(), n_epochs=-1)
    assert negative.value.field == "hyperparameters.n_epochs"


def test_another_tenants_ids_are_not_found_and_their_lists_are_empty(sdk, server, world):
    job = sdk.customize(PARENT, chat_jsonl(), suffix=name())
    with treelm.Client(server.target, token=world.tokens["globex"]) as globex:
        with pytest.raises(treelm.JobNotFound) as foreign:
            globex.fine_tuning_job(job.id)
        with pytest.raises(treelm.JobNotFound) as unknown:
            globex.fine_tuning_job("ftjob-000000000000000000000000")
        assert foreign.value.details == unknown.value.details.replace("ftjob-000000000000000000000000", job.id)
        with pytest.raises(treelm.FileNotFound):
            globex.file(job.state.training_file)
        with pytest.raises(treelm.JobNotFound):
            list(treelm.FineTuneJob(globex, job.state).watch(timeout=10))
        with pytest.raises(treelm.JobNotFound):
            treelm.FineTuneJob(globex, job.state).cancel()
        assert globex.fine_tuning_jobs() == []
        assert job.state.training_file not in [f.id for f in globex.files()]
    assert job.refresh().status == "queued"


def test_a_server_without_fine_tuning_and_a_tree_without_a_key_answer_fine_tuning_off(world, tmp_path):
    other = serve_fine_tuning(world, fine_tuning_calls(world, tmp_path / "k", trees=("elsewhere",)), http_port=None)
    plain = serve(world)
    try:
        with treelm.Client(other.target, token=world.tokens["acme"]) as client:
            training = client.upload_file(chat_jsonl()).id
            before = stored(world)
            with pytest.raises(treelm.FineTuningOff) as off:
                client.create_job(PARENT, training, suffix=name())
            assert "customize.key" in off.value.details and stored(world) == before
        with treelm.Client(plain.target, token=world.tokens["acme"]) as client:
            for call in (client.files, client.fine_tuning_jobs, lambda: client.upload_file(chat_jsonl())):
                with pytest.raises(treelm.FineTuningOff):
                    call()
    finally:
        other.stop()
        plain.stop()


def test_retire_node_is_for_operators_and_needs_the_update_coordinator(server, world):
    with treelm.Client(server.target, token=world.tokens["acme"]) as tenant:
        with pytest.raises(treelm.PermissionDenied):
            tenant.retire_node("rt/en/legal")
    with treelm.Client(server.target, token=world.operator_token) as operator:
        with pytest.raises(treelm.Unimplemented, match="update coordinator"):
            operator.retire_node("rt/en/legal")
        with pytest.raises(treelm.InvalidRequest) as pinned:
            operator.retire_node("rt/en/legal@1")
        assert pinned.value.field == "node"


# -- asyncio ---------------------------------------------------------------------------------------------


def test_the_async_client_does_the_same(server, world):
    async def main():
        async with treelm.AsyncClient(server.target, token=world.tokens["acme"]) as client:
            uploaded = await client.upload_file(chat_jsonl(), filename="notes.jsonl")
            assert uploaded.id in [f.id for f in await client.files()]
            assert await client.file(uploaded.id) == uploaded
            job = await client.customize(PARENT, [*(["A long clinical note. " * 60] * 3)], suffix=name())
            assert isinstance(job, treelm.AsyncFineTuneJob) and job.status == "queued"
            assert job.id in [j.id for j in await client.fine_tuning_jobs()]
            runner = move_job_later(world, job.id, steps=2, result={"perplexity": 11.0})
            seen = []
            await job.wait(timeout=60, on_event=seen.append)
            runner.join(10)
            assert job.fine_tuned_model == job.node and [e.step for e in seen if e.step] == [1, 2]
            assert [e.message for e in await job.events()] == [e.message for e in seen]
            with pytest.raises(treelm.JobFinished):
                await job.cancel()
            failing = await client.create_job(PARENT, uploaded.id, suffix=name())
            await asyncio.to_thread(
                move_job, world, failing.id, steps=0, status="failed", error={"code": "data", "message": "no"}
            )
            with pytest.raises(treelm.JobFailed) as failed:
                await failing.wait(timeout=30)
            assert failed.value.reason == "data"
            cancelled = await (await client.create_job(PARENT, uploaded.id, suffix=name())).cancel()
            with pytest.raises(treelm.JobCancelled):
                await cancelled.wait(timeout=30)
            with pytest.raises(treelm.NodeExists):
                await client.create_job(PARENT, uploaded.id, suffix="radiology")
            with pytest.raises(treelm.PermissionDenied):
                await client.retire_node("rt/en/legal")
            assert await client.delete_file(uploaded.id) is True  # its jobs have ended

    asyncio.run(main())


@pytest.mark.skipif(not hasattr(Coordinator, "retire_node"), reason="Coordinator.retire_node comes with the job runner")
def test_an_operator_retires_a_leaf_and_a_node_with_children_only_with_force(tmp_path_factory):
    from cluster.service.catalog import Catalog
    from cluster.service.server import ServerConfig, TreeServer
    from registry.access import create_tenant, issue_token
    from tests.cluster.grpc_harness import ServerThread
    from tests.cluster.update_world import built_tree
    from tests.cluster.update_world import make_world as update_world

    w = update_world(tmp_path_factory.mktemp("retire"), built_tree(tmp_path_factory))
    create_tenant(w.registry, "ops")
    operator = issue_token(w.registry, "ops", role="operator").token
    thread = ServerThread(lambda: TreeServer([], Catalog(w.registry), ServerConfig(port=0), updates=w.coordinator))
    try:
        with treelm.Client(thread.target, token=operator) as client:
            leaf = client.retire_node("ut/en/legal")
            assert leaf.retired == ("ut/en/legal",)
            assert "ut/en/legal" not in [n.id for n in client.nodes()]
            with pytest.raises(treelm.TreeLMError):
                client.retire_node("ut/en/medical")  # it has children
            assert "ut/en/medical" in [n.id for n in client.nodes()]
            forced = client.retire_node("ut/en/medical", force=True)
            assert forced.retired[0] == "ut/en/medical" and "ut/en/medical/radiology" in forced.retired
    finally:
        thread.stop()
        w.close()


def test_a_stopping_server_ends_its_watches_at_once_so_clients_watch_elsewhere(world, tmp_path):
    s = serve_fine_tuning(world, fine_tuning_calls(world, tmp_path / "k"), http_port=None)
    channel = grpc.insecure_channel(s.target)
    try:
        with treelm.Client(s.target, token=world.tokens["acme"]) as client:
            job = client.customize(PARENT, chat_jsonl(), suffix=name())
        stub = fine_tuning_pb2_grpc.FineTuningStub(channel)
        call = stub.WatchJob(fine_tuning_pb2.WatchJobRequest(job_id=job.id), metadata=auth(world.tokens["acme"]))
        assert next(call).message == "job queued"  # the watch is open; the job stays queued
        stopping = threading.Thread(target=s.stop, kwargs={"grace": 120}, daemon=True)
        stopping.start()
        with pytest.raises(grpc.RpcError) as ended:
            next(call)
        kind = dict(ended.value.trailing_metadata() or ()).get("treelm-error-kind")
        assert (ended.value.code(), kind) == (grpc.StatusCode.UNAVAILABLE, "shutting-down")
        stopping.join(60)
        assert not stopping.is_alive()  # the stop did not wait out its grace for the watcher
    finally:
        channel.close()
        s.stop()
