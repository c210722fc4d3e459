"""`GET /metrics` (Prometheus text) and `GET /health`.

Both are open even when the server has an API key, as in vLLM: monitoring
systems and load balancers probe them without credentials, and they reveal
counts, not prompts or outputs. Each reads the backend with a short timeout,
so a stuck engine turns /health to 503 instead of hanging the probe.
"""
from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from coserve.api.errors import error_response
from coserve.api.inference import metrics_of, runner_of
from coserve.api.state import ServerState, get_state

logger = logging.getLogger(__name__)
router = APIRouter()

BACKEND_TIMEOUT_S = 10.0


async def _backend_snapshot(state: ServerState, with_adapters: bool = True) -> tuple[dict, list[str]]:
    runner = runner_of(state)
    with anyio.fail_after(BACKEND_TIMEOUT_S):
        # abandon_on_cancel: a stuck call keeps its thread, but the probe answers on time.
        stats = await runner.control(state.backend.stats, abandon_on_cancel=True)
        adapters = (await runner.control(state.backend.list_adapters, abandon_on_cancel=True)
                    if with_adapters else [])
    return stats, adapters


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    server_metrics = metrics_of(state)
    try:
        stats, adapters = await _backend_snapshot(state)
        server_metrics.backend.update(stats, adapters)
    except Exception as exc:   # still serve the server-side metrics, with coserve_backend_up 0
        logger.warning("metrics: the backend did not answer: %s", exc)
        server_metrics.backend.update(None, [])
    return Response(server_metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/health")
async def health(request: Request) -> Response:
    state = get_state(request)
    try:
        stats, _ = await _backend_snapshot(state, with_adapters=False)
    except TimeoutError:
        return error_response(503, f"the backend did not answer within {BACKEND_TIMEOUT_S:.0f} s")
    except Exception as exc:
        return error_response(503, f"the backend is not healthy: {type(exc).__name__}: {exc}")
    workers = stats.get("workers", [])
    unhealthy = [w.get("name") for w in workers if not w.get("healthy", True)]
    if workers and len(unhealthy) == len(workers):
        return error_response(503, f"no healthy worker: {', '.join(map(str, unhealthy))}")
    return JSONResponse({"status": "ok", "workers": len(workers), "unhealthy_workers": unhealthy})
