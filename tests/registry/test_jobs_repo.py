"""registry/jobs.py on SQLite and PostgreSQL: files and jobs per tenant, refusals that store nothing,
cancellation in every state, one claim per job, restarts, and retired nodes."""

from __future__ import annotations

import threading

import pytest

from registry.errors import (
    FileInUse,
    FileNotFound,
    FileQuotaExceeded,
    InvalidInput,
    JobFinished,
    JobNotFound,
    JobQuotaExceeded,
    NodeExists,
    NodeNotFound,
)
from registry.jobs import (
    JobRequest,
    add_event,
    add_file,
    cancel_requested,
    claim_job,
    create_job,
    delete_file,
    fail_interrupted,
    file_content,
    finish_job,
    get_file,
    get_job,
    list_events,
    list_files,
    list_jobs,
    request_cancel,
)
from registry.trees import list_nodes
from registry.updates import RetireNode, apply_changes
from tests.registry.helpers import snapshot

CONTENT = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n'


def _file(reg, tenant: str = "st-marys") -> str:
    return add_file(reg, tenant, "notes.jsonl", "fine-tune", CONTENT, fmt="jsonl", records=1, sha256="ab" * 32).file_id


def _request(file_id: str, suffix: str = "st-marys-oncology", tenant: str = "st-marys", **changes) -> JobRequest:
    values = {
        "tenant": tenant,
        "parent": "demo/en/medical",
        "node": f"demo/en/medical/{suffix}",
        "training_file": file_id,
        "hyperparameters": {"n_epochs": 1, "learning_rate": 0.002, "lora_rank": 4, "batch_size": 4},
    }
    return JobRequest(**(values | changes))


def test_files_are_the_uploading_tenants_own(demo_reg):
    file_id = _file(demo_reg)
    record = get_file(demo_reg, "st-marys", file_id)
    assert (record.filename, record.format, record.records, record.bytes) == ("notes.jsonl", "jsonl", 1, len(CONTENT))
    assert file_content(demo_reg, "st-marys", file_id) == CONTENT
    assert [f.file_id for f in list_files(demo_reg, "st-marys")] == [file_id]
    # Another tenant's id is answered exactly like an unknown one, and its list is empty.
    for call in (get_file, file_content, delete_file):
        with pytest.raises(FileNotFound) as foreign:
            call(demo_reg, "northside", file_id)
        with pytest.raises(FileNotFound) as unknown:
            call(demo_reg, "northside", "file-" + "0" * 24)
        assert str(foreign.value).replace(file_id, "X") == str(unknown.value).replace("file-" + "0" * 24, "X")
    assert list_files(demo_reg, "northside") == ()
    assert delete_file(demo_reg, "st-marys", file_id).file_id == file_id
    assert list_files(demo_reg, "st-marys") == ()


def test_a_job_is_queued_with_an_event_and_read_only_by_its_tenant(demo_reg):
    job = create_job(demo_reg, _request(_file(demo_reg)), max_active=2)
    assert (job.status, job.tree, job.parent, job.visibility) == ("queued", "demo", "demo/en/medical", "private")
    assert job.fine_tuned_model is None and not job.finished
    assert get_job(demo_reg, job.job_id, "st-marys") == job == get_job(demo_reg, job.job_id)
    with pytest.raises(JobNotFound):
        get_job(demo_reg, job.job_id, "northside")
    assert list_jobs(demo_reg, "northside") == ()
    assert [e.message for e in list_events(demo_reg, job.job_id, "st-marys")] == ["job queued"]
    with pytest.raises(JobNotFound):
        list_events(demo_reg, job.job_id, "northside")
    # The file is read by the queued job: it cannot be deleted under it.
    with pytest.raises(FileInUse):
        delete_file(demo_reg, "st-marys", job.training_file)


@pytest.mark.parametrize(
    "case",
    ["unknown parent", "retired parent", "foreign file", "foreign validation file", "node taken", "node building"],
)
def test_refused_jobs_store_nothing(demo_reg, db_url, case):
    mine, theirs = _file(demo_reg), _file(demo_reg, "northside")
    create_job(demo_reg, _request(mine, "first"), max_active=None)
    if case == "retired parent":
        apply_changes(demo_reg, [RetireNode("demo/es/medical")])
    before = snapshot(db_url)
    request, error = {
        "unknown parent": (_request(mine, parent="demo/fr", node="demo/fr/x"), NodeNotFound),
        "retired parent": (_request(mine, parent="demo/es/medical", node="demo/es/medical/x"), NodeNotFound),
        "foreign file": (_request(theirs), FileNotFound),
        "foreign validation file": (_request(mine, validation_file=theirs), FileNotFound),
        "node taken": (_request(mine, "oncology"), NodeExists),
        "node building": (_request(mine, "first"), NodeExists),
    }[case]
    with pytest.raises(error) as refused:
        create_job(demo_reg, request, max_active=None)
    if error is FileNotFound:
        assert refused.value.field == ("validation_file" if "validation" in case else "training_file")
    assert snapshot(db_url) == before


def test_a_retired_nodes_id_stays_taken(demo_reg):
    apply_changes(demo_reg, [RetireNode("demo/en/medical/cardiology")])
    assert "demo/en/medical/cardiology" not in {n.node_id for n in list_nodes(demo_reg, include_private=True)}
    assert "demo/en/medical/cardiology" in {
        n.node_id for n in list_nodes(demo_reg, include_private=True, include_retired=True)
    }
    with pytest.raises(NodeExists):
        create_job(demo_reg, _request(_file(demo_reg), "cardiology"), max_active=None)


def test_the_quota_counts_queued_and_running_jobs_of_the_tenant(demo_reg, db_url):
    file_id = _file(demo_reg)
    first = create_job(demo_reg, _request(file_id, "a"), max_active=2)
    create_job(demo_reg, _request(file_id, "b"), max_active=2)
    assert claim_job(demo_reg, "demo", "w1").job_id == first.job_id  # running counts too
    before = snapshot(db_url)
    with pytest.raises(JobQuotaExceeded) as refused:
        create_job(demo_reg, _request(file_id, "c"), max_active=2)
    assert "2 queued or running" in str(refused.value) and refused.value.retry_after_s > 0
    assert snapshot(db_url) == before
    # Another tenant has its own count; an ended job frees a place.
    create_job(demo_reg, _request(_file(demo_reg, "northside"), "d", tenant="northside"), max_active=2)
    finish_job(demo_reg, first.job_id, "failed", error={"code": "gate", "message": "no gain"})
    assert create_job(demo_reg, _request(file_id, "c"), max_active=2).status == "queued"


def test_cancel_queued_running_and_finished_jobs(demo_reg):
    file_id = _file(demo_reg)
    queued = create_job(demo_reg, _request(file_id, "a"), max_active=None)
    cancelled = request_cancel(demo_reg, queued.job_id, "st-marys")
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert claim_job(demo_reg, "demo", "w1") is None  # nothing left to claim

    running = create_job(demo_reg, _request(file_id, "b"), max_active=None)
    assert claim_job(demo_reg, "demo", "w1").status == "running"
    with pytest.raises(JobNotFound):
        request_cancel(demo_reg, running.job_id, "northside")  # another tenant's job: unknown
    assert not cancel_requested(demo_reg, running.job_id)
    marked = request_cancel(demo_reg, running.job_id, "st-marys")
    assert (marked.status, marked.cancel_requested) == ("running", True)  # the runner stops it
    assert cancel_requested(demo_reg, running.job_id)
    request_cancel(demo_reg, running.job_id, "st-marys")  # asking twice is one request
    messages = [e.message for e in list_events(demo_reg, running.job_id, None, limit=100)]
    assert messages.count("cancellation requested") == 1
    assert finish_job(demo_reg, running.job_id, "cancelled").status == "cancelled"
    for job_id in (queued.job_id, running.job_id):
        with pytest.raises(JobFinished):
            request_cancel(demo_reg, job_id, "st-marys")


def test_two_workers_claiming_at_once_get_one_job_each_at_most(demo_reg):
    file_id = _file(demo_reg)
    job = create_job(demo_reg, _request(file_id), max_active=None)
    barrier = threading.Barrier(2)
    got: dict[str, object] = {}

    def claim(worker: str) -> None:
        barrier.wait()
        got[worker] = claim_job(demo_reg, "demo", worker)

    threads = [threading.Thread(target=claim, args=(w,)) for w in ("w1", "w2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = [r for r in got.values() if r is not None]
    assert len(claimed) == 1 and claimed[0].job_id == job.job_id
    record = get_job(demo_reg, job.job_id)
    assert record.status == "running" and record.worker in ("w1", "w2") and record.started_at is not None
    assert claim_job(demo_reg, "other-tree", "w3") is None


def test_finish_merges_the_result_and_ends_once(demo_reg):
    job = create_job(demo_reg, _request(_file(demo_reg)), max_active=None)
    claim_job(demo_reg, "demo", "w1")
    add_event(demo_reg, job.job_id, "Step 1/2: training loss=2.0", {"step": 1, "total_steps": 2, "loss": 2.0})
    with pytest.raises(InvalidInput):
        finish_job(demo_reg, job.job_id, "running")
    done = finish_job(demo_reg, job.job_id, "succeeded", result={"held_out_ppl": 3.0, "parent_held_out_ppl": 4.0})
    assert done.fine_tuned_model == "demo/en/medical/st-marys-oncology"
    assert done.result == {"held_out_ppl": 3.0, "parent_held_out_ppl": 4.0}
    with pytest.raises(JobFinished):
        finish_job(demo_reg, job.job_id, "failed")
    events = list_events(demo_reg, job.job_id, "st-marys", limit=100)
    assert events[0].message == "job succeeded"  # newest first
    step = next(e for e in events if e.data.get("step") == 1)
    assert step.data == {"step": 1, "total_steps": 2, "loss": 2.0}
    older = list_events(demo_reg, job.job_id, "st-marys", after=step.id)
    assert all(e.id < step.id for e in older)


def test_a_restart_fails_the_running_jobs_of_its_tree(demo_reg):
    file_id = _file(demo_reg)
    running = create_job(demo_reg, _request(file_id, "a"), max_active=None)
    claim_job(demo_reg, "demo", "old-server")
    asked = create_job(demo_reg, _request(file_id, "b"), max_active=None)
    claim_job(demo_reg, "demo", "old-server")
    request_cancel(demo_reg, asked.job_id, None)
    queued = create_job(demo_reg, _request(file_id, "c"), max_active=None)
    assert set(fail_interrupted(demo_reg, "demo", "interrupted by a server restart")) == {
        running.job_id,
        asked.job_id,
    }
    failed = get_job(demo_reg, running.job_id)
    assert failed.status == "failed" and failed.error == {
        "code": "interrupted",
        "message": "interrupted by a server restart",
    }
    assert get_job(demo_reg, asked.job_id).status == "cancelled"  # it was asked to stop anyway
    assert get_job(demo_reg, queued.job_id).status == "queued"  # waits for the next runner
    assert fail_interrupted(demo_reg, "demo", "again") == ()


def test_a_tenants_stored_files_are_bounded_in_count_and_bytes(demo_reg, db_url):
    kept = add_file(
        demo_reg, "st-marys", "a.jsonl", "fine-tune", CONTENT, fmt="jsonl", records=1, sha256="ab" * 32, max_files=2
    )
    add_file(
        demo_reg, "st-marys", "b.jsonl", "fine-tune", CONTENT, fmt="jsonl", records=1, sha256="ab" * 32, max_files=2
    )
    before = snapshot(db_url)
    with pytest.raises(FileQuotaExceeded, match="stores 2 training files, its limit is 2"):
        add_file(
            demo_reg, "st-marys", "c.jsonl", "fine-tune", CONTENT, fmt="jsonl", records=1, sha256="ab" * 32, max_files=2
        )
    with pytest.raises(FileQuotaExceeded, match="would pass its limit"):
        add_file(
            demo_reg,
            "st-marys",
            "c.jsonl",
            "fine-tune",
            CONTENT,
            fmt="jsonl",
            records=1,
            sha256="ab" * 32,
            max_bytes=3 * len(CONTENT) - 1,
        )
    assert snapshot(db_url) == before
    # Another tenant counts on its own; deleting a file makes room again.
    add_file(
        demo_reg, "northside", "a.jsonl", "fine-tune", CONTENT, fmt="jsonl", records=1, sha256="ab" * 32, max_files=2
    )
    delete_file(demo_reg, "st-marys", kept.file_id)
    add_file(
        demo_reg, "st-marys", "c.jsonl", "fine-tune", CONTENT, fmt="jsonl", records=1, sha256="ab" * 32, max_files=2
    )
