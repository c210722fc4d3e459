"""`create_app`: the FastAPI application over a backend (a local LLM or a cluster Deployment).

Shared per-app objects are made here, before any route module's `setup(state)`,
so every feature finds them in `state.extras`: "runner" (threads for blocking
backend calls), "gate" (admission, 429), "metrics" (Prometheus registry) and
"adapter_paths" (adapter name -> directory).
"""
from __future__ import annotations

from fastapi import FastAPI

from coserve.api.errors import install_error_handlers
from coserve.api.inference import GATE, METRICS, RUNNER, Gate, Runner
from coserve.api.limits import BodyLimit
from coserve.api.metrics import RequestCounter, ServerMetrics
from coserve.api.settings import ServerSettings
from coserve.api.state import ServerState


def create_app(backend, settings: ServerSettings) -> FastAPI:
    from coserve.api.routes import adapters, completions, dashboard, files, fine_tuning, models, observability

    app = FastAPI(title="coserve", summary="OpenAI-compatible multi-LoRA serving with co-served finetuning")
    state = ServerState(backend=backend, settings=settings)
    app.state.coserve = state
    gate = Gate(settings.max_pending_requests, settings.retry_after_s)
    state.extras[GATE] = gate
    state.extras[RUNNER] = Runner(settings.max_pending_requests)
    state.extras[METRICS] = metrics = ServerMetrics(in_flight=lambda: gate.num_in_flight)
    install_error_handlers(app)
    # NOTE: the middleware added last is the outermost, so the counter also sees BodyLimit's 413s.
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, max_upload_bytes=settings.max_upload_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)
    for module in (observability, models, completions, adapters, files, fine_tuning, dashboard):
        if hasattr(module, "setup"):
            module.setup(state)   # per-feature state in ServerState.extras
        app.include_router(module.router)
    return app
