"""OpenAI fine-tuning jobs: create, list, retrieve, cancel, events, checkpoints under /v1/fine_tuning/jobs.

Thin HTTP layer: the body is checked in coserve/api/fine_tuning_request.py, the
jobs live in `FineTuningJobs` (coserve/api/fine_tuning_jobs.py). Handlers are
plain functions, so FastAPI runs them in its thread pool: they read files and
call the backend, which blocks. Cancelling a finished job answers 409.
"""
from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Query, Request

from coserve.api.auth import require_api_key
from coserve.api.fine_tuning_jobs import FineTuningJobs
from coserve.api.fine_tuning_request import parse_job_request
from coserve.api.pagination import cursor_page
from coserve.api.routes import files as files_routes
from coserve.api.state import ServerState, get_state

router = APIRouter(prefix="/v1/fine_tuning/jobs", dependencies=[Depends(require_api_key)])

MAX_LIST_LIMIT = 100


def setup(state: ServerState) -> None:
    if "files" not in state.extras:   # the files feature owns the store; make sure it exists first
        files_routes.setup(state)
    jobs = FineTuningJobs(state.backend, state.settings, state.extras["files"],
                          state.extras.setdefault("adapter_paths", {}))
    jobs.recover()
    state.extras["fine_tuning"] = jobs


def fine_tuning_jobs(request: Request) -> FineTuningJobs:
    return get_state(request).extras["fine_tuning"]


@router.post("")
def create_job(request: Request, body: dict = Body(...)):
    return fine_tuning_jobs(request).create(parse_job_request(body))


@router.get("")
def list_jobs(request: Request, after: str | None = None, limit: int = Query(20)):
    jobs = fine_tuning_jobs(request)
    return cursor_page([jobs.view(r) for r in jobs.list_records()], after, limit, max_limit=MAX_LIST_LIMIT)


@router.get("/{fine_tuning_job_id}")
def retrieve_job(request: Request, fine_tuning_job_id: str):
    jobs = fine_tuning_jobs(request)
    return jobs.view(jobs.get_record(fine_tuning_job_id))


@router.post("/{fine_tuning_job_id}/cancel")
def cancel_job(request: Request, fine_tuning_job_id: str):
    return fine_tuning_jobs(request).cancel(fine_tuning_job_id)


@router.get("/{fine_tuning_job_id}/events")
def list_events(request: Request, fine_tuning_job_id: str, after: str | None = None, limit: int = Query(20)):
    jobs = fine_tuning_jobs(request)
    events = jobs.events(jobs.get_record(fine_tuning_job_id))
    return cursor_page(events, after, limit, max_limit=MAX_LIST_LIMIT)


@router.get("/{fine_tuning_job_id}/checkpoints")
def list_checkpoints(request: Request, fine_tuning_job_id: str, after: str | None = None, limit: int = Query(10)):
    jobs = fine_tuning_jobs(request)
    checkpoints = jobs.checkpoints(jobs.get_record(fine_tuning_job_id))
    return cursor_page(checkpoints, after, limit, max_limit=MAX_LIST_LIMIT)
