"""Prometheus metrics of one app (its own registry, so several apps in a process do not collide).

Two sources:
- the server itself: requests by route/method/status/model (an ASGI middleware), and per finished
  sequence TTFT, TPOT and end-to-end latency from `RequestOutput.metrics` (engine monotonic times);
- the backend's `stats()`, read when /metrics is scraped: tokens by kind, iterations, queue depth,
  KV-cache use, adapters loaded, worker health, finetuning tokens / step / last loss per job.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0)


class ServerMetrics:
    def __init__(self, in_flight=lambda: 0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("coserve_http_requests", "HTTP requests answered, by route, status and model",
                                ["route", "method", "status", "model"], registry=r)
        self.ttft = Histogram("coserve_time_to_first_token_seconds", "Arrival to first generated token",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("coserve_time_per_output_token_seconds",
                              "Mean time between output tokens of a sequence (after the first)", ["model"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("coserve_e2e_request_latency_seconds", "Arrival to finish of a sequence", ["model"],
                             buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("coserve_prompt_tokens", "Prompt tokens of finished sequences", ["model"],
                                     registry=r)
        self.generation_tokens = Counter("coserve_generation_tokens", "Tokens generated for finished sequences",
                                         ["model"], registry=r)
        self.finished = Counter("coserve_sequences_finished", "Finished sequences by finish reason",
                                ["model", "finish_reason"], registry=r)
        in_flight_gauge = Gauge("coserve_server_sequences_in_flight",
                                "Sequences admitted by the HTTP server and not finished", registry=r)
        in_flight_gauge.set_function(in_flight)
        self.backend = BackendCollector()
        r.register(self.backend)

    def observe_output(self, model: str, output) -> None:
        """Record one finished sequence (a RequestOutput)."""
        m = output.metrics or {}
        arrival, first, finish = m.get("arrival_time"), m.get("first_token_time"), m.get("finish_time")
        if arrival is not None and first is not None:
            self.ttft.labels(model).observe(max(0.0, first - arrival))
        if first is not None and finish is not None and len(output.token_ids) > 1:
            self.tpot.labels(model).observe(max(0.0, (finish - first) / (len(output.token_ids) - 1)))
        if arrival is not None and finish is not None:
            self.e2e.labels(model).observe(max(0.0, finish - arrival))
        self.prompt_tokens.labels(model).inc(len(output.prompt_token_ids))
        self.generation_tokens.labels(model).inc(len(output.token_ids))
        self.finished.labels(model, output.finish_reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BackendCollector:
    """Exposes the latest `backend.stats()` snapshot (refreshed by the /metrics route before rendering)."""

    def __init__(self) -> None:
        self.stats: dict | None = None
        self.adapters: list[str] = []

    def update(self, stats: dict | None, adapters: list[str]) -> None:
        self.stats, self.adapters = stats, adapters

    def collect(self):
        up = GaugeMetricFamily("coserve_backend_up", "1 when the backend answered the last scrape")
        up.add_metric([], 1.0 if self.stats is not None else 0.0)
        yield up
        if self.stats is None:
            return
        engines = self.stats.get("engines", {})
        tokens = CounterMetricFamily("coserve_tokens", "Tokens processed by kind (decode, prefill, "
                                     "finetune_forward, finetune_backward)", labels=["engine", "kind"])
        iterations = CounterMetricFamily("coserve_iterations", "Engine iterations", labels=["engine"])
        queue = GaugeMetricFamily("coserve_queue_depth", "Inference requests in the engine by state",
                                  labels=["engine", "state"])
        kv = GaugeMetricFamily("coserve_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use",
                               labels=["engine"])
        for name, s in engines.items():
            for kind, count in (s.get("tokens_by_kind") or {}).items():
                tokens.add_metric([name, kind], float(count))
            iterations.add_metric([name], float(s.get("num_iterations", 0)))
            queue.add_metric([name, "waiting"], float(s.get("num_waiting", 0)))
            queue.add_metric([name, "running"], float(s.get("num_running", 0)))
            kv.add_metric([name], float(s.get("kv_cache_usage", 0.0)))
        yield from (tokens, iterations, queue, kv)

        adapters = GaugeMetricFamily("coserve_adapters_loaded", "Adapters registered for serving")
        adapters.add_metric([], float(len(self.adapters)))
        yield adapters
        healthy = GaugeMetricFamily("coserve_worker_healthy", "1 per healthy worker", labels=["worker", "device"])
        for w in self.stats.get("workers", []):
            healthy.add_metric([str(w.get("name")), str(w.get("device"))], 1.0 if w.get("healthy") else 0.0)
        yield healthy
        yield from _job_metrics(self.stats.get("jobs", []), engines)


def _job_metrics(jobs: list[dict], engines: dict):
    ft_tokens = CounterMetricFamily("coserve_finetune_tokens", "Training tokens processed by a finetuning job",
                                    labels=["job_id", "adapter"])
    steps = GaugeMetricFamily("coserve_finetune_step", "Optimizer steps completed", labels=["job_id", "adapter"])
    loss = GaugeMetricFamily("coserve_finetune_last_loss", "Loss of the last completed optimizer step",
                             labels=["job_id", "adapter"])
    for job in jobs:
        labels = [str(job.get("job_id")), str(job.get("adapter"))]
        trained = job.get("tokens_trained")
        if trained is None:   # a cluster job record: the count lives in its worker's engine stats
            engine_jobs = (engines.get(job.get("worker")) or {}).get("finetune", {}).get("jobs", {})
            trained = (engine_jobs.get(job.get("engine_job_id")) or {}).get("tokens_trained")
        if trained is not None:
            ft_tokens.add_metric(labels, float(trained))
        steps.add_metric(labels, float(job.get("step") or 0))
        losses = job.get("losses") or []
        if losses:
            loss.add_metric(labels, float(losses[-1]))
    yield from (ft_tokens, steps, loss)


class RequestCounter:
    """ASGI middleware: counts every HTTP request by route template, method, status and model.

    The route is the matched template (`/v1/models/{model_id}`), never the raw path, and the model
    is what a route stored in `request.state.model` once it knew the model exists, so clients
    cannot grow the label sets without bound.
    """

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        status = 500   # what the client gets if the app raises before answering

        async def send_and_note(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, scope.get("method", ""), str(status),
                                         str(state.get("model", ""))).inc()
