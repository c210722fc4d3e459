"""The web dashboard: `GET /dashboard` (the page), its bundled assets, and its data routes.

The page loads without a key; its data (`/dashboard/api/...`) sits behind the
same Bearer key as /v1. One sampler per app reads `backend.stats()` about
once a second into a `History` ring buffer, so every open page shares one
read instead of each poll hitting the engines; the page polls
`/dashboard/api/state?since=<t>` every second and gets only the new samples.
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response

from coserve.api.auth import require_api_key
from coserve.api.dashboard.history import SAMPLE_PERIOD_S, History, build_snapshot, jsonable
from coserve.api.errors import APIError
from coserve.api.state import ServerState, get_state

logger = logging.getLogger(__name__)

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "dashboard" / "static"
# NOTE: a fixed list, not a path parameter joined to a directory: nothing outside it can be asked for.
ASSETS = {"app.js": "text/javascript", "charts.js": "text/javascript", "panels.js": "text/javascript",
          "app.css": "text/css"}
_NO_CACHE = {"Cache-Control": "no-cache"}   # revalidate, so an upgraded server never runs a stale page


class Sampler:
    """Reads backend stats into a History once a second, from the first dashboard request on.

    Started lazily on the serving event loop (create_app runs before any loop exists, and a
    server whose dashboard is never opened should not poll its engines); it ends with that loop.
    """

    def __init__(self, state: ServerState, period_s: float = SAMPLE_PERIOD_S) -> None:
        self.state = state
        self.period_s = period_s
        self.history = History()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_read: asyncio.Event | None = None

    async def ensure_started(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done() or self._loop is not loop:
            self._loop = loop
            self._first_read = asyncio.Event()
            self._task = loop.create_task(self._run(), name="coserve-dashboard-sampler")
        if self.history.sampled_at is None and self.history.error is None:
            # NOTE: the very first page load waits for one read rather than rendering "no data".
            try:
                await asyncio.wait_for(self._first_read.wait(), timeout=10)
            except asyncio.TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            await self.read_once()
            self._first_read.set()
            await asyncio.sleep(max(0.05, self.period_s - (time.monotonic() - started)))

    async def read_once(self) -> None:
        # NOTE: no timeout around the read: an abandoned thread would keep running and reads would
        # pile up. A hung backend shows on the page as data growing stale (`sampled_at`).
        try:
            stats = await asyncio.to_thread(self.state.backend.stats)
        except Exception as exc:  # the sampler must outlive any backend failure
            logger.debug("dashboard stats read failed", exc_info=True)
            self.history.record_error(f"{type(exc).__name__}: {exc}")
            return
        self.history.add(stats)


def setup(state: ServerState) -> None:
    state.extras["dashboard"] = Sampler(state)


def _sampler(state: ServerState) -> Sampler:
    sampler = state.extras.get("dashboard")
    if sampler is None:   # an app built without setup(): still serve
        sampler = state.extras["dashboard"] = Sampler(state)
    return sampler


# ---- the page ------------------------------------------------------------------------------

@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard_page(request: Request) -> HTMLResponse:
    state = get_state(request)
    base = request.scope.get("root_path", "").rstrip("/") + "/dashboard"
    page = (STATIC_DIR / "index.html").read_text(encoding="utf-8")
    page = (page.replace("__BASE__", html.escape(base, quote=True))
            .replace("__AUTH__", "1" if state.settings.api_key else "0")
            .replace("__MODEL__", html.escape(str(state.settings.model_id), quote=True)))
    return HTMLResponse(page, headers=_NO_CACHE)


@router.get("/dashboard/static/{name}")
async def dashboard_asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise APIError(404, f"no dashboard asset {name!r}")
    body = (STATIC_DIR / name).read_bytes()
    return Response(body, media_type=f"{media_type}; charset=utf-8", headers=_NO_CACHE)


# ---- data ----------------------------------------------------------------------------------

@router.get("/dashboard/api/state", dependencies=[Depends(require_api_key)])
async def dashboard_state(request: Request, since: float | None = None) -> Response:
    """The page's one snapshot: samples newer than `since` (all kept ones without it) and current state."""
    state = get_state(request)
    sampler = _sampler(state)
    await sampler.ensure_started()
    snapshot = build_snapshot(sampler.history, state.settings, getattr(state.backend, "kind", "local"), since)
    return Response(content=_dumps(snapshot), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.post("/dashboard/api/jobs/{job_id}/cancel", dependencies=[Depends(require_api_key)])
async def dashboard_cancel_job(request: Request, job_id: str) -> dict:
    """Cancel a finetuning job; `cancelled` is False when it had already ended."""
    state = get_state(request)
    try:
        cancelled = await asyncio.to_thread(state.backend.cancel_job, job_id)
        job = await asyncio.to_thread(state.backend.job, job_id)
    except KeyError:
        raise APIError(404, f"no finetuning job {job_id!r}", param="job_id", code="job_not_found") from None
    # Every open page sees the new status on its next poll, not only after the next read.
    _sampler(state).history.update_job(job)
    return jsonable({"cancelled": bool(cancelled), "job": {k: v for k, v in job.items() if k != "losses"}})


def _dumps(value) -> str:
    return json.dumps(value, separators=(",", ":"), allow_nan=False)
