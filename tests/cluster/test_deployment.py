"""A two-worker co-serving Deployment on local Ray: exact outputs, routing, jobs, recovery.

One deployment serves the whole module (two workers of one CPU each on the
session's 2-CPU Ray). Later tests kill workers and the controller: each must
come back (replaced under the same name) with nothing lost.
"""
import threading
import time

import pytest
import ray
from peft import LoraConfig

from cluster import Deployment, WorkerLostError
from coserve import LLM, FinetuneConfig, SamplingParams
from peft_methods.lora.weights import load_adapter
from tests.helpers import make_peft_adapter_dir

ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=48)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
RECOVERY_TIMEOUT_S = 180


def rows(count=7):
    return [{"input_ids": [(7 * i + 3 * j) % 900 + 3 for j in range(40 + 4 * i)]} for i in range(count)]


def job_config(adapter, **overrides):
    settings = dict(adapter=adapter, peft=LORA, dataset=rows(), max_steps=4, batch_size=2, max_seq_len=96,
                    learning_rate=5e-2, lr_scheduler="cosine", warmup_steps=1, max_grad_norm=1.0, seed=1)
    settings.update(overrides)
    return FinetuneConfig(**settings)


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama_dir, tmp_path_factory):
    return make_peft_adapter_dir(tiny_llama_dir, tmp_path_factory.mktemp("adapter-a"), seed=5, r=4,
                                 target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def dep(ray_session, tiny_llama_dir, tmp_path_factory):
    deployment = Deployment.start(model=str(tiny_llama_dir), num_workers=2, name="test-coserve", use_gpu=False,
                                  directory=tmp_path_factory.mktemp("deployment"), **ENGINE)
    yield deployment
    deployment.shutdown()
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("test-coserve:")]


def finished_per_worker(dep) -> dict[str, int]:
    return {name: s.get("num_finished", 0) for name, s in dep.stats()["workers"].items()}


def worker_actor(dep, name):
    return next(w["actor"] for w in dep.workers() if w["name"] == name)


def wait_for(predicate, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.05)


def test_workers_are_placed_and_healthy(dep):
    workers = dep.workers()
    assert [w["name"] for w in workers] == ["worker-0", "worker-1"]
    assert all(w["healthy"] and w["role"] == "coserve" and w["device"].startswith("cpu") for w in workers)
    assert all(w["resources"] == {"num_cpus": 1.0, "num_gpus": 0.0} for w in workers)
    # Actor handles are real: they answer directly.
    assert ray.get(workers[0]["actor"].ping.remote()) == "worker-0"


def test_generate_equals_a_single_engine(dep, tiny_llama_dir, adapter_dir):
    dep.load_adapter("a", adapter_dir)
    prompts = [[5, 6, 7], [8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    adapters = [None, "a", "a", None]
    outs = dep.generate(prompt_token_ids=prompts, sampling_params=GREEDY, adapter=adapters)
    with LLM(model=str(tiny_llama_dir), **ENGINE) as llm:
        llm.load_adapter("a", adapter_dir)
        expected = llm.generate(prompt_token_ids=prompts, sampling_params=GREEDY, adapter=adapters)
    assert [o.token_ids for o in outs] == [e.token_ids for e in expected]
    assert [o.adapter for o in outs] == adapters


def test_routing_prefers_the_adapter_holder(dep):
    holders = [w["name"] for w in dep.workers() if "a" in w["adapters"]]
    assert len(holders) == 1, "load_adapter loads on one worker; others load only when routed"
    before = finished_per_worker(dep)
    dep.generate(prompt_token_ids=[[20 + i, 21, 22] for i in range(6)], sampling_params=GREEDY, adapter="a")
    after = finished_per_worker(dep)
    assert {name: after[name] - before[name] for name in after} == \
        {name: (6 if name == holders[0] else 0) for name in after}


def test_base_requests_are_balanced_over_workers(dep):
    before = finished_per_worker(dep)
    dep.generate(prompt_token_ids=[[30 + i, 31, 32] for i in range(12)], sampling_params=GREEDY)
    after = finished_per_worker(dep)
    served = [after[name] - before[name] for name in after]
    assert sum(served) == 12 and min(served) >= 4, served


def test_unknown_adapter_and_bad_prompt_fail_clearly(dep):
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        dep.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY, adapter="nope")
    with pytest.raises(ValueError, match="out of range"):
        dep.generate(prompt_token_ids=[[5, 10**7]], sampling_params=GREEDY)
    assert len(dep.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].token_ids) == 6


def test_finetune_job_finishes_on_the_named_worker_and_serves(dep, tmp_path):
    job = dep.finetune(job_config("trained", output_dir=str(tmp_path / "trained")), worker="worker-1")
    assert job.worker == "worker-1"
    assert job.wait(timeout=RECOVERY_TIMEOUT_S) == "succeeded", job.error
    assert len(job.losses) == 4 and job.losses[-1] < job.losses[0]
    assert "trained" in dep.list_adapters()
    # Served after training; another worker would load it from output_dir if routed there.
    out = dep.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY, adapter="trained")[0]
    assert len(out.token_ids) == 6 and out.adapter == "trained"
    with pytest.raises(ValueError, match="already in use"):
        dep.finetune(job_config("trained"))


def test_killed_worker_job_resumes_from_checkpoint_with_the_same_weights(dep, tiny_llama_dir, tmp_path):
    steps = 40   # long enough that the kill lands mid-job (job records refresh every 0.5 s)
    settings = dict(max_steps=steps, save_steps=2, shuffle=True)
    with LLM(model=str(tiny_llama_dir), **ENGINE) as llm:
        reference = llm.finetune(job_config("ref", output_dir=str(tmp_path / "ref"), **settings))
        assert reference.wait(timeout=RECOVERY_TIMEOUT_S) == "succeeded", reference.error

    job = dep.finetune(job_config("resumed", output_dir=str(tmp_path / "resumed"), **settings))
    victim = job.worker
    wait_for(lambda: 2 <= job.step, RECOVERY_TIMEOUT_S, "the first checkpoint")
    step_at_kill = job.step
    ray.kill(worker_actor(dep, victim))
    assert job.wait(timeout=RECOVERY_TIMEOUT_S) == "succeeded", job.error

    record = job.progress()
    assert step_at_kill < steps, "the kill must land mid-job"
    assert record["attempts"] == 2
    assert next(w for w in dep.workers() if w["name"] == victim)["restarts"] >= 1
    expected, actual = load_adapter(tmp_path / "ref").weights, load_adapter(tmp_path / "resumed").weights
    assert set(actual) == set(expected)
    for module, (a, b) in expected.items():
        # Same fp32 ops on the same rows in another process: equal up to summation order.
        assert_close(actual[module][0], a)
        assert_close(actual[module][1], b)
    assert job.losses == pytest.approx(reference.losses, rel=1e-5)


def assert_close(actual, expected):
    import torch

    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_in_flight_requests_are_retried_on_another_worker(dep):
    prompts = [[40 + i] * 64 for i in range(4)]
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    result: dict = {}

    def run():
        try:
            result["outs"] = dep.generate(prompt_token_ids=prompts, sampling_params=params)
        except Exception as exc:  # reported below
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    wait_for(lambda: any(w["load"] > 0 for w in dep.workers()), 60, "requests in flight")
    busy = [w for w in dep.workers() if w["load"] > 0]
    for worker in busy:
        ray.kill(worker["actor"])
    thread.join(timeout=RECOVERY_TIMEOUT_S)
    assert not thread.is_alive(), "a request hung after its worker died"
    assert "error" not in result, result.get("error")
    assert all(len(o.token_ids) == 400 and o.finish_reason == "length" for o in result["outs"])
    with LLM(model=str(dep.stats()["model"]), **ENGINE) as llm:   # retried requests give the same tokens
        expected = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)
    assert result["outs"][0].token_ids == expected[0].token_ids


def test_stream_equals_generate(dep):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    chunks = list(dep.generate_stream(prompt_token_ids=[5, 6, 7], sampling_params=params, adapter="a"))
    expected = dep.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=params, adapter="a")[0]
    assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])
    assert [t for c in chunks for t in c.token_ids] == expected.token_ids == chunks[-1].output.token_ids


def test_a_partly_streamed_request_fails_clearly_when_its_worker_dies(dep):
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    stream = dep.generate_stream(prompt_token_ids=[9] * 64, sampling_params=params)
    first = next(stream)
    assert first.token_ids and not first.finished
    busy = [w for w in dep.workers() if w["load"] > 0]
    assert len(busy) == 1
    started = time.monotonic()
    ray.kill(busy[0]["actor"])
    with pytest.raises(WorkerLostError, match=rf"worker {busy[0]['name']} died after \d+ token"):
        for _ in stream:
            pass
    assert time.monotonic() - started < 60

    def replaced() -> bool:
        workers = {w["name"]: w for w in dep.workers()}
        return workers[busy[0]["name"]]["restarts"] > busy[0]["restarts"] and all(
            w["healthy"] for w in workers.values())
    wait_for(replaced, RECOVERY_TIMEOUT_S, "the worker's replacement")


def test_controller_restart_keeps_jobs_and_adapters(dep):
    jobs_before = {j["job_id"]: j["status"] for j in dep.jobs()}
    incarnation = dep.controller_incarnation()
    controller = ray.get_actor("test-coserve:controller", namespace="coserve")
    ray.kill(controller, no_restart=False)
    # ray.kill returns before the old controller is gone: wait for calls to reach the new one.
    wait_for(lambda: dep.controller_incarnation() != incarnation, 60, "the controller to restart")
    assert {j["job_id"]: j["status"] for j in dep.jobs()} == jobs_before
    assert {"a", "trained"} <= set(dep.list_adapters())
    # The new controller found the workers by name (or replaces one it could not find).
    wait_for(lambda: all(w["healthy"] for w in dep.workers()), RECOVERY_TIMEOUT_S, "every worker to be healthy")
    out = dep.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY, adapter="a")[0]
    assert len(out.token_ids) == 6
