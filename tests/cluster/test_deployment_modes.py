"""Deployment modes and placement, bad input, and requests that cannot be retried in time.

Each test starts its own small deployment on the session's Ray (2 CPUs, one
logical GPU without a device behind it) and shuts it down; bad input must
leave no actor behind.
"""
import threading
import time

import pytest
import ray
from peft import LoraConfig

from cluster import Deployment, DeploymentNotFoundError, EngineWorker, PlacementError, WorkerLostError
from coserve import FinetuneConfig, SamplingParams

ENGINE = dict(dtype="float32", device="cpu", max_num_batched_tokens=48)
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
ROWS = [{"input_ids": [(5 * i + j) % 900 + 3 for j in range(32)]} for i in range(4)]


def job_config(adapter, **overrides):
    settings = dict(adapter=adapter, peft=LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.0),
                    dataset=ROWS, max_steps=2, batch_size=2, max_seq_len=64)
    settings.update(overrides)
    return FinetuneConfig(**settings)


def deployment_actors(name: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(f"{name}:")]


def test_engine_worker_runs_without_ray(tiny_llama_dir):
    worker = EngineWorker("local", str(tiny_llama_dir), **ENGINE)
    try:
        outs = worker.generate(None, [GREEDY, GREEDY], [None, None], prompt_token_ids=[[5, 6], [7, 8, 9]])
        assert [len(o.token_ids) for o in outs] == [4, 4]
        job_id = worker.start_finetune(job_config("w"))
        assert worker.wait_job(job_id, timeout=120) == "succeeded"
        assert worker.job_progress(job_id)["step"] == 2 and worker.job_progress("other") is None
        load = worker.load()
        assert load["adapters"] == ["w"] and load["queued_tokens"] == 0 and load["running_jobs"] == 0
        assert load["finetune_headroom"] > 0
        assert worker.ensure_adapter("w", "/unused") is False   # already resident: not loaded again
    finally:
        worker.shutdown()
    with pytest.raises(ValueError, match="role"):
        EngineWorker("bad", str(tiny_llama_dir), role="trainer", **ENGINE)


def test_spatial_mode_splits_inference_and_finetuning(ray_session, tiny_llama_dir, tmp_path):
    with Deployment.start(model=str(tiny_llama_dir), num_workers=1, name="test-spatial", mode="spatial",
                          use_gpu=False, cpus_per_worker=2, directory=tmp_path, **ENGINE) as dep:
        roles = {w["name"]: (w["role"], w["resources"]["num_cpus"]) for w in dep.workers()}
        assert roles == {"worker-0-inference": ("inference", 1.0), "worker-0-finetune": ("finetune", 1.0)}
        job = dep.finetune(job_config("sp"))
        assert job.worker == "worker-0-finetune"
        outs = dep.generate(prompt_token_ids=[[5, 6, 7]] * 3, sampling_params=GREEDY)
        assert all(len(o.token_ids) == 4 for o in outs)
        assert job.wait(timeout=120) == "succeeded", job.error
        # The trained adapter is served by the inference actor, loaded there from the job's output.
        out = dep.generate(prompt_token_ids=[[5, 6, 7]], sampling_params=GREEDY, adapter="sp")[0]
        assert out.adapter == "sp" and len(out.token_ids) == 4
        served = {name: s["num_finished"] for name, s in dep.stats()["workers"].items()}
        assert served == {"worker-0-inference": 4, "worker-0-finetune": 0}
    assert deployment_actors("test-spatial") == []


def test_fractional_gpu_placement_puts_two_workers_on_one_gpu(ray_session, tiny_llama_dir, tmp_path):
    with Deployment.start(model=str(tiny_llama_dir), num_workers=2, name="test-fraction", use_gpu=True,
                          gpus_per_worker=0.5, directory=tmp_path, **ENGINE) as dep:
        workers = dep.workers()
        assert [w["resources"]["num_gpus"] for w in workers] == [0.5, 0.5]
        # Both were given logical GPU 0 by Ray (no CUDA here, so the engines run on CPU).
        assert all("Ray GPU 0" in w["device"] for w in workers)
        assert len(dep.generate(prompt_token_ids=[[5, 6]] * 4, sampling_params=GREEDY)) == 4


@pytest.mark.parametrize("settings, match", [
    (dict(num_workers=3, use_gpu=True, gpus_per_worker=0.5), r"need 1\.5 GPUs, but the Ray cluster has 1"),
    (dict(num_workers=3, use_gpu=False), r"need 3 CPUs, but the Ray cluster has 2"),
])
def test_more_workers_than_devices_fails_and_starts_nothing(ray_session, tiny_llama_dir, tmp_path, settings, match):
    with pytest.raises(PlacementError, match=match):
        Deployment.start(model=str(tiny_llama_dir), name="test-too-many", directory=tmp_path, **settings, **ENGINE)
    assert deployment_actors("test-too-many") == []


@ray.remote(num_cpus=1)
class _Holder:
    """Takes one of the session's two CPUs, like an actor of another application."""

    def ready(self) -> bool:
        return True


def test_start_fails_clearly_when_other_actors_hold_the_cpus(ray_session, tiny_llama_dir, tmp_path):
    holder = _Holder.remote()
    try:
        ray.get(holder.ready.remote())
        started = time.monotonic()
        with pytest.raises(PlacementError, match=r"free resources stayed short .*\(1 more CPU\) for 2 s"):
            Deployment.start(model=str(tiny_llama_dir), num_workers=2, name="test-crowded", use_gpu=False,
                             directory=tmp_path, placement_timeout_s=2, **ENGINE)
        assert time.monotonic() - started < 30   # an error, not workers pending for ever
        assert deployment_actors("test-crowded") == []
    finally:
        ray.kill(holder)


def test_a_worker_handle_that_came_back_through_ray_marks_its_worker_lost(ray_session, tmp_path):
    from cluster.controller import Controller, WorkerState
    from cluster.placement import WorkerSpec

    holder = _Holder.remote()
    returned = ray.get(ray.put([holder]))[0]   # what a driver sends back in stream_done
    assert returned is not holder
    controller = Controller("test-plain", "unused-model", [], {}, str(tmp_path))
    try:
        controller.workers["worker-0"] = WorkerState(WorkerSpec("worker-0", "coserve", 0, 1.0, 0.0), holder)
        controller.stream_done("worker-0", 0, lost_handle=returned)
        assert not controller.workers["worker-0"].healthy
    finally:
        controller.shutdown()   # stops its monitor and kills the holder


def test_bad_input_names_the_problem(ray_session, tiny_llama_dir, tmp_path):
    with pytest.raises(DeploymentNotFoundError, match="no coserve deployment named 'nope'"):
        Deployment.connect("nope")
    with pytest.raises(FileNotFoundError, match="missing-model"):
        Deployment.start(model=str(tmp_path / "missing-model"), name="test-bad")
    with pytest.raises(TypeError, match="max_lora"):
        Deployment.start(model=str(tiny_llama_dir), name="test-bad", max_lora=3)
    with pytest.raises(ValueError, match="mode must be one of"):
        Deployment.start(model=str(tiny_llama_dir), name="test-bad", mode="temporal", use_gpu=False,
                         directory=tmp_path, **ENGINE)
    assert deployment_actors("test-bad") == []


def test_connect_finds_a_running_deployment_and_names_are_unique(ray_session, tiny_llama_dir, tmp_path):
    with Deployment.start(model=str(tiny_llama_dir), num_workers=1, name="test-connect", use_gpu=False,
                          directory=tmp_path, **ENGINE) as dep:
        other = Deployment.connect("test-connect")
        assert [w["name"] for w in other.workers()] == ["worker-0"]
        assert other.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].token_ids == \
            dep.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].token_ids
        with pytest.raises(ValueError, match="already running"):
            Deployment.start(model=str(tiny_llama_dir), name="test-connect", use_gpu=False, **ENGINE)
        with pytest.raises(TypeError, match="expected a FinetuneConfig"):
            dep.finetune({"adapter": "x"})
        with pytest.raises(ValueError, match="row 0"):
            dep.finetune(job_config("bad-rows", dataset=[{"input_ids": [1, 10**7]}]))
        assert [j["status"] for j in dep.jobs()] == ["failed"]
        assert dep.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].error is None


def test_lost_requests_fail_clearly_when_no_retry_succeeds_in_time(ray_session, tiny_llama_dir, tmp_path):
    with Deployment.start(model=str(tiny_llama_dir), num_workers=1, name="test-lost", use_gpu=False,
                          retry_timeout_s=1.0, directory=tmp_path, **ENGINE) as dep:
        params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
        result: dict = {}

        def run():
            try:
                result["outs"] = dep.generate(prompt_token_ids=[[7] * 64] * 2, sampling_params=params)
            except Exception as exc:  # checked below
                result["error"] = exc

        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 60
        while not any(w["load"] > 0 for w in dep.workers()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        started = time.monotonic()
        ray.kill(dep.workers()[0]["actor"])
        thread.join(timeout=60)
        assert not thread.is_alive(), "the request hung"
        assert isinstance(result.get("error"), WorkerLostError), result
        assert "worker-0" in str(result["error"]) and time.monotonic() - started < 30
        # The worker is replaced and the deployment serves again.
        deadline = time.monotonic() + 120
        while not all(w["healthy"] for w in dep.workers()):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert len(dep.generate(prompt_token_ids=[[5, 6]], sampling_params=GREEDY)[0].token_ids) == 4
