"""OpenAI's files endpoints for fine-tuning, over the calls gRPC uses (cluster/service/fine_tuning.py).

    POST   /v1/files          multipart/form-data: file (JSON Lines or text), purpose=fine-tune -> a file
    GET    /v1/files          the caller's files, newest first (?purpose=, ?limit=, ?after=)
    GET    /v1/files/{id}     one of them
    DELETE /v1/files/{id}     -> {"id", "object": "file", "deleted": true}

An upload's body may be as large as the file limit plus :data:`MULTIPART_OVERHEAD` (this route
only; every other route keeps the server's JSON body limit): a larger one is refused 413 from its
Content-Length before a byte is read, or as soon as it has sent that much. A file part over the
file limit within that is refused 400 by the file checks, like an empty, non-UTF-8, malformed
(the message names the line) or too small file. Another tenant's file id is answered 404 exactly
like an unknown one.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from cluster.errors import BadArgument, MalformedRequest, RequestTooLarge
from cluster.http.protocol import FileDeleted, FileList, FileObject
from cluster.jobs.data import MAX_FILE_BYTES
from cluster.service.auth import Caller
from cluster.service.fine_tuning import FineTuningCalls
from cluster.service.fine_tuning_io import MAX_PAGE, UploadSlots, served
from registry.jobs import FileRecord

__all__ = ["MULTIPART_OVERHEAD", "UPLOAD_BODY_BYTES", "FilesServing", "file_object"]

MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers, the purpose field
UPLOAD_BODY_BYTES = MAX_FILE_BYTES + MULTIPART_OVERHEAD
_FIELD_BYTES = 1024  # a form field (purpose) is a word


def file_object(f: FileRecord) -> FileObject:
    return FileObject(
        id=f.file_id,
        bytes=f.bytes,
        created_at=int(f.created_at.timestamp()),
        filename=f.filename,
        purpose=f.purpose,
        format=f.format,
        records=f.records,
        sha256=f.sha256,
    )


async def _bounded(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    received = 0
    async for piece in request.stream():
        received += len(piece)
        if received > limit:
            raise RequestTooLarge(limit)
        yield piece


async def read_upload(request: Request, limit: int) -> tuple[str, str, bytes]:
    """(filename, purpose, bytes) of a multipart upload, within ``limit`` bytes of body."""
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        raise MalformedRequest("upload the file as multipart/form-data with the fields 'file' and 'purpose'")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(limit)
    parser = MultiPartParser(
        request.headers, _bounded(request, limit), max_files=1, max_fields=4, max_part_size=_FIELD_BYTES
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise MalformedRequest(f"the multipart body is malformed: {exc.message}") from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise BadArgument("file", "is required: a multipart file part named 'file'")
        if not isinstance(purpose, str):
            raise BadArgument("purpose", "is required: 'fine-tune'")
        return upload.filename or "", purpose, await upload.read()
    finally:
        await form.close()


class FilesServing:
    """Translation between the files endpoints and the shared fine-tuning calls."""

    def __init__(self, calls: FineTuningCalls | None, uploads: UploadSlots, body_limit: int = UPLOAD_BODY_BYTES):
        self._calls = calls
        self._uploads = uploads
        self.body_limit = body_limit

    async def upload(self, request: Request, caller: Caller) -> FileObject:
        calls = served(self._calls)
        with self._uploads.hold(caller):
            filename, purpose, content = await read_upload(request, self.body_limit)
            return file_object(await calls.upload_file(caller, filename, purpose, content))

    async def list_files(self, caller: Caller, purpose: str | None, limit: str | None, after: str | None) -> FileList:
        count = MAX_PAGE if not limit else _whole("limit", limit)
        if not 1 <= count <= MAX_PAGE:
            raise BadArgument("limit", f"must be from 1 to {MAX_PAGE}, got {count}")
        files = list(await served(self._calls).list_files(caller))  # newest first
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        if after:
            ids = [f.file_id for f in files]
            files = files[ids.index(after) + 1 :] if after in ids else []
        page = files[:count]
        return FileList(
            data=[file_object(f) for f in page],
            has_more=len(files) > count,
            first_id=page[0].file_id if page else None,
            last_id=page[-1].file_id if page else None,
        )

    async def retrieve(self, caller: Caller, file_id: str) -> FileObject:
        return file_object(await served(self._calls).get_file(caller, file_id))

    async def delete(self, caller: Caller, file_id: str) -> FileDeleted:
        record = await served(self._calls).delete_file(caller, file_id)
        return FileDeleted(id=record.file_id, deleted=True)


def _whole(name: str, text: str) -> int:
    if not text.isdigit() or len(text) > 6:
        raise BadArgument(name, f"must be a whole number, got {text[:20]!r}")
    return int(text)
