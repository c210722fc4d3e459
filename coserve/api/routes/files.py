"""OpenAI Files API for fine-tuning data: upload (multipart), list, retrieve, content, delete.

Only `purpose="fine-tune"` is accepted. The body is counted while it streams
in, so an upload over `settings.max_upload_bytes` is refused with 413 before
it is spooled whole; the JSONL is then checked line by line
(coserve/api/training_file.py) and stored in a `FileStore` under
`data_dir/files/`. Deleting a file a job trains on is allowed: a job reads its
rows when it is created, so it never needs the file again.
"""
from __future__ import annotations

import mimetypes

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from coserve.api.auth import require_api_key
from coserve.api.errors import APIError
from coserve.api.file_store import FileStore, public_file
from coserve.api.pagination import cursor_page
from coserve.api.state import ServerState, get_state
from coserve.api.training_file import TrainingFileError, validate_training_jsonl

router = APIRouter(dependencies=[Depends(require_api_key)])

SUPPORTED_PURPOSES = ("fine-tune",)
MULTIPART_SLACK_BYTES = 64 * 1024
"""Room for multipart boundaries, part headers and the purpose field on top of the file's own limit."""
MAX_LIST_LIMIT = 10_000


def setup(state: ServerState) -> None:
    state.extras["files"] = FileStore(state.settings.data_dir / "files")


def file_store(state: ServerState) -> FileStore:
    return state.extras["files"]


def get_file_or_404(store: FileStore, file_id: str) -> dict:
    record = store.get(file_id)
    if record is None:
        raise APIError(404, f"no such file: {file_id!r}", param="file_id", code="file_not_found")
    return record


@router.post("/v1/files")
async def create_file(request: Request):
    state = get_state(request)
    limit = state.settings.max_upload_bytes
    form = await _read_multipart(request, limit)
    try:
        purpose = form.get("purpose")
        if not isinstance(purpose, str) or not purpose:
            raise APIError(400, "missing form field 'purpose' (use purpose='fine-tune')", param="purpose")
        if purpose not in SUPPORTED_PURPOSES:
            raise APIError(400, f"purpose {purpose!r} is not supported; this server accepts files with "
                           f"purpose 'fine-tune' only", param="purpose", code="invalid_purpose")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "missing form field 'file' (a JSONL file upload)", param="file")
        data = await upload.read(limit + 1)
        filename = upload.filename or "upload.jsonl"
    finally:
        await form.close()
    if len(data) > limit:
        raise APIError(413, _too_large(limit), param="file", code="file_too_large")
    backend = state.backend
    try:
        rows = await run_in_threadpool(validate_training_jsonl, data, filename, backend.tokenizer,
                                       backend.max_model_len)
    except TrainingFileError as err:
        raise APIError(400, str(err), param="file", code="invalid_file_format") from err
    return await run_in_threadpool(file_store(state).add, data, filename, purpose, num_rows=len(rows))


@router.get("/v1/files")
def list_files(request: Request, purpose: str | None = None, after: str | None = None,
               limit: int = Query(MAX_LIST_LIMIT), order: str = Query("desc")):
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
    records = file_store(get_state(request)).list()
    if purpose is not None:
        records = [r for r in records if r["purpose"] == purpose]
    if order == "desc":
        records.reverse()
    return cursor_page([public_file(r) for r in records], after, limit, max_limit=MAX_LIST_LIMIT)


@router.get("/v1/files/{file_id}")
def retrieve_file(request: Request, file_id: str):
    return public_file(get_file_or_404(file_store(get_state(request)), file_id))


@router.get("/v1/files/{file_id}/content")
def file_content(request: Request, file_id: str):
    store = file_store(get_state(request))
    record = get_file_or_404(store, file_id)
    try:
        data = store.read(file_id)
    except FileNotFoundError as err:   # deleted between the lookup and the read
        raise APIError(404, f"no such file: {file_id!r}", param="file_id", code="file_not_found") from err
    media_type = mimetypes.guess_type(record["filename"])[0] or "application/octet-stream"
    return Response(data, media_type=media_type)


@router.delete("/v1/files/{file_id}")
def delete_file(request: Request, file_id: str):
    store = file_store(get_state(request))
    get_file_or_404(store, file_id)
    return {"id": file_id, "object": "file", "deleted": store.delete(file_id)}


async def _read_multipart(request: Request, limit: int):
    """Parse the multipart body, counting bytes as they arrive; 413 once it cannot fit `limit`."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "upload a file as multipart/form-data with fields 'file' and 'purpose'")
    ceiling = limit + MULTIPART_SLACK_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > ceiling:
        raise APIError(413, _too_large(limit), param="file", code="file_too_large")

    async def counted():
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > ceiling:
                raise APIError(413, _too_large(limit), param="file", code="file_too_large")
            yield chunk

    try:
        return await MultiPartParser(request.headers, counted()).parse()
    except MultiPartException as err:
        raise APIError(400, f"malformed multipart body: {err.message}") from err


def _too_large(limit: int) -> str:
    return f"the file is larger than this server's upload limit of {limit} bytes"
