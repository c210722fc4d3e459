"""`/metrics` parsed with prometheus_client's own parser after real traffic, and `/health`."""
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from coserve import FinetuneConfig
from coserve.api.metrics import BackendCollector
from tests.api.conftest import MODEL_ID


def scrape(server) -> dict[str, list]:
    response = httpx.get(server.url + "/metrics", timeout=60)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples, name, **labels):
    found = [s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert found, f"no sample {name}{labels}"
    return sum(found)


def test_metrics_after_traffic(make_server):
    server = make_server()   # a fresh app: its registry counts only this test's requests
    body = {"model": MODEL_ID, "prompt": "hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    for _ in range(3):
        assert httpx.post(server.url + "/v1/completions", json=body, timeout=60).status_code == 200
    stream = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})
    assert stream.status_code == 200 and stream.text.rstrip().endswith("data: [DONE]")
    assert httpx.post(server.url + "/v1/completions", json={**body, "model": "nope"}).status_code == 404

    families = scrape(server)
    requests = families["coserve_http_requests"]
    assert value(requests, "coserve_http_requests_total", route="/v1/completions", status="200",
                 model=MODEL_ID) == 3
    assert value(requests, "coserve_http_requests_total", route="/v1/chat/completions", status="200",
                 model=MODEL_ID) == 1
    # An unknown model is not a label (clients must not grow the label sets).
    assert value(requests, "coserve_http_requests_total", route="/v1/completions", status="404", model="") == 1

    ttft = families["coserve_time_to_first_token_seconds"]
    assert value(ttft, "coserve_time_to_first_token_seconds_count", model=MODEL_ID) == 4
    assert value(families["coserve_time_per_output_token_seconds"],
                 "coserve_time_per_output_token_seconds_count", model=MODEL_ID) >= 3
    e2e = families["coserve_e2e_request_latency_seconds"]
    assert value(e2e, "coserve_e2e_request_latency_seconds_count", model=MODEL_ID) == 4
    assert value(e2e, "coserve_e2e_request_latency_seconds_sum", model=MODEL_ID) > 0
    assert value(families["coserve_generation_tokens"], "coserve_generation_tokens_total", model=MODEL_ID) >= 18

    assert value(families["coserve_backend_up"], "coserve_backend_up") == 1
    assert value(families["coserve_tokens"], "coserve_tokens_total", engine="local", kind="decode") > 0
    assert value(families["coserve_tokens"], "coserve_tokens_total", engine="local", kind="prefill") > 0
    assert value(families["coserve_queue_depth"], "coserve_queue_depth", engine="local", state="waiting") >= 0
    assert 0.0 <= value(families["coserve_kv_cache_usage_ratio"], "coserve_kv_cache_usage_ratio") <= 1.0
    assert value(families["coserve_adapters_loaded"], "coserve_adapters_loaded") >= 0
    assert value(families["coserve_server_sequences_in_flight"], "coserve_server_sequences_in_flight") == 0
    # The scrape itself is counted too (route template, not raw path).
    assert value(scrape(server)["coserve_http_requests"], "coserve_http_requests_total", route="/metrics") >= 1


def test_finetune_job_metrics(make_server, backend):
    server = make_server()
    rows = [{"input_ids": [(7 * i + j) % 900 + 3 for j in range(16)]} for i in range(4)]
    job_id = backend.finetune(FinetuneConfig(adapter="metrics-ft", dataset=rows, max_steps=2, batch_size=2,
                                             max_seq_len=32, peft={"r": 2, "target_modules": ["q_proj"]}))
    assert backend.wait_job(job_id, timeout=300) == "succeeded"
    families = scrape(server)
    labels = dict(job_id=job_id, adapter="metrics-ft")
    assert value(families["coserve_finetune_tokens"], "coserve_finetune_tokens_total", **labels) > 0
    assert value(families["coserve_finetune_step"], "coserve_finetune_step", **labels) == 2
    assert value(families["coserve_finetune_last_loss"], "coserve_finetune_last_loss", **labels) == \
        pytest.approx(backend.job(job_id)["losses"][-1])
    assert value(families["coserve_tokens"], "coserve_tokens_total", kind="finetune_backward") > 0


def test_cluster_shaped_stats_map_job_tokens_through_the_worker():
    """A cluster job record has no token count; it comes from its worker's engine stats."""
    collector = BackendCollector()
    engine = {"tokens_by_kind": {"decode": 5}, "num_iterations": 2, "num_waiting": 1, "num_running": 0,
              "kv_cache_usage": 0.25, "finetune": {"jobs": {"e1": {"tokens_trained": 77}}}}
    collector.update({"engines": {"worker-0": engine},
                      "workers": [{"name": "worker-0", "device": "cpu", "healthy": True}],
                      "jobs": [{"job_id": "ft-1", "adapter": "a", "worker": "worker-0", "engine_job_id": "e1",
                                "step": 3, "losses": [2.0, 1.5, 1.25]}]}, ["a"])
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in collector.collect() for s in f.samples}
    assert samples[("coserve_finetune_tokens_total", (("adapter", "a"), ("job_id", "ft-1")))] == 77
    assert samples[("coserve_finetune_last_loss", (("adapter", "a"), ("job_id", "ft-1")))] == 1.25
    assert samples[("coserve_kv_cache_usage_ratio", (("engine", "worker-0"),))] == 0.25
    assert samples[("coserve_worker_healthy", (("device", "cpu"), ("worker", "worker-0")))] == 1


class StuckBackend:
    def __init__(self, backend):
        self._backend = backend

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def stats(self):
        raise ConnectionError("controller unreachable")


def test_health(server, backend, tmp_path):
    response = httpx.get(server.url + "/health")
    assert response.status_code == 200 and response.json()["status"] == "ok"
    from coserve.api.app import create_app
    from coserve.api.settings import ServerSettings
    from tests.api.conftest import LiveServer

    broken = LiveServer(create_app(StuckBackend(backend), ServerSettings(model_id=MODEL_ID, data_dir=tmp_path)))
    try:
        response = httpx.get(broken.url + "/health")
        assert response.status_code == 503 and "controller unreachable" in response.json()["error"]["message"]
        families = scrape(broken)   # metrics still answer, saying the backend is down
        assert value(families["coserve_backend_up"], "coserve_backend_up") == 0
    finally:
        broken.stop()
