"""`Deployment`: many engines on a Ray cluster behind one controller, used like one `LLM`.

    dep = Deployment.start(model=path, num_workers=2, name="coserve")   # embedded local Ray
    outs = dep.generate(prompts, SamplingParams(max_tokens=32), adapter=["sql", None])
    job = dep.finetune(FinetuneConfig(...)); job.wait()
    Deployment.connect("coserve")      # from another process or Ray job on the same cluster

The controller and the workers are detached named actors in Ray namespace
"coserve": the deployment outlives the process that started it only if that
process does not end (`coserve serve` blocks); a process that started one
shuts it down on exit.
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import ray
from ray.exceptions import RayActorError

from cluster.errors import DeploymentNotFoundError, PlacementError, WorkerLostError
from cluster.job_handle import ClusterJob
from cluster.names import NAMESPACE, controller_name
from cluster.placement import plan_workers, shortfall
from cluster.ray_connect import connect_ray
from coserve.config import EngineConfig, FinetuneConfig
from coserve.finetune.dataset import load_rows
from coserve.outputs import RequestOutput, StreamChunk
from coserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

CONTROLLER_MAX_CONCURRENCY = 512
CONTROLLER_RESTART_WAIT_S = 60.0
# Calls that read or that can run twice without harm; others are not retried across a controller restart.
_RETRYABLE = {"job", "jobs", "stats", "workers_info", "list_adapters", "generate", "route_stream", "ping",
              "incarnation", "wait_job_step", "evaluate"}


def default_directory(name: str) -> Path:
    root = os.environ.get("COSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "coserve"))
    return Path(root) / "deployments" / name


class Deployment:
    def __init__(self, name: str, controller, owns_ray: bool = False) -> None:
        self.name = name
        self._controller = controller
        self._owns_ray = owns_ray
        self._closed = False

    # ---- starting and connecting ---------------------------------------------------------------

    @classmethod
    def start(cls, model: str, num_workers: int = 1, name: str = "coserve", ray_address: str | None = None, *,
              mode: str = "coserve", use_gpu: bool | None = None, gpus_per_worker: float = 1.0,
              cpus_per_worker: float = 1.0, directory: str | os.PathLike | None = None,
              retry_timeout_s: float = 120.0, role_engine_kwargs: dict[str, dict] | None = None,
              placement_timeout_s: float = 60.0, **engine_kwargs) -> "Deployment":
        """Start a controller and its workers; bad input raises and leaves nothing running.

        Args:
            model: model directory or .gguf file, readable by every worker.
            num_workers: device shares (co-serving workers; in spatial mode each share holds two).
            ray_address: None = the Ray instance this process already joined, else a new local one
                (never one found through RAY_ADDRESS);
                "auto" or "host:port" = an existing cluster.
            mode: "coserve" or "spatial" (an inference-only and a finetuning-only worker per share).
            use_gpu: None = when the cluster has GPUs. gpus_per_worker may be a fraction (shared GPU).
            cpus_per_worker: CPUs per share on CPU clusters; also each worker's torch thread count.
            directory: where the job table, adapter registry and default job outputs live
                (default ~/.cache/coserve/deployments/<name>; must be shared by all nodes).
            placement_timeout_s: how long to wait for the cluster to free the CPUs or GPUs the workers
                need (others' actors may still be releasing them) before PlacementError.
            role_engine_kwargs: per role ("coserve", "inference", "finetune"), EngineConfig fields that
                override engine_kwargs for those workers (e.g. a larger token budget for finetuning-only ones).
            engine_kwargs: EngineConfig fields for every worker's engine (dtype, max_loras, tpot_slo_ms, ...).
        """
        role_engine_kwargs = dict(role_engine_kwargs or {})
        for role, overrides in role_engine_kwargs.items():
            if role not in ("coserve", "inference", "finetune"):
                raise ValueError(f"role_engine_kwargs: unknown role {role!r}; roles are coserve, inference, finetune")
            EngineConfig(model=model, **{**engine_kwargs, **overrides})
        EngineConfig(model=model, **engine_kwargs)   # unknown or bad engine settings fail here, before Ray
        if not os.path.exists(model):
            raise FileNotFoundError(f"model {model!r} does not exist (a model directory or a .gguf file)")
        owns_ray = connect_ray(ray_address)
        try:
            if _find_controller(name) is not None:
                raise ValueError(f"a deployment named {name!r} is already running; connect to it with "
                                 f"Deployment.connect({name!r}) or pick another name")
            specs = plan_workers(num_workers, mode, ray.cluster_resources(), use_gpu=use_gpu,
                                 gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
            _wait_for_free_resources(specs, placement_timeout_s)
            directory = Path(directory) if directory is not None else default_directory(name)
            from cluster.controller import Controller   # torch and the engine load only where needed

            controller = ray.remote(Controller).options(
                name=controller_name(name), namespace=NAMESPACE, lifetime="detached", num_cpus=0,
                max_restarts=-1, max_concurrency=CONTROLLER_MAX_CONCURRENCY,
            ).remote(name, os.path.abspath(model), specs, engine_kwargs, str(directory.resolve()),
                     retry_timeout_s, role_engine_kwargs)
            try:
                ray.get(controller.start.remote())
            except BaseException as exc:   # Ctrl-C included: nothing may be left running
                _kill_deployment(name, controller)
                if not isinstance(exc, Exception):
                    raise
                raise RuntimeError(f"deployment {name!r} failed to start: {getattr(exc, 'cause', None) or exc}") \
                    from None
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        deployment = cls(name, controller, owns_ray=owns_ray)
        atexit.register(deployment.shutdown)
        logger.info("deployment %s started with %d worker(s)", name, len(specs))
        return deployment

    @classmethod
    def connect(cls, name: str = "coserve", ray_address: str | None = None) -> "Deployment":
        """Attach to a running deployment (ray_address None: the joined Ray instance, else "auto")."""
        owns_ray = connect_ray(ray_address if ray_address is not None else "auto", allow_existing=True)
        controller = _find_controller(name)
        if controller is None:
            running = _running_deployments()
            if owns_ray:
                ray.shutdown()
            raise DeploymentNotFoundError(
                f"no coserve deployment named {name!r} runs on this Ray cluster"
                + (f"; running: {', '.join(running)}" if running else "; none is running (start one with "
                   "`coserve serve`)"))
        return cls(name, controller, owns_ray=False)

    # ---- inference -----------------------------------------------------------------------------

    def generate(self, prompts: str | Sequence[str] | None = None,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapter: str | None | Sequence[str | None] = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
        """Same arguments and results as `LLM.generate`; requests are spread over the workers."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        texts = None if prompts is None else ([prompts] if isinstance(prompts, str) else list(prompts))
        token_ids = None if prompt_token_ids is None else [list(t) for t in prompt_token_ids]
        count = len(texts) if texts is not None else len(token_ids)
        params = _per_prompt(sampling_params if sampling_params is not None else SamplingParams(), count,
                             "sampling_params", SamplingParams)
        adapters = _per_prompt(adapter, count, "adapter", (str, type(None)))
        if count == 0:
            return []
        return self._call("generate", texts, params, adapters, token_ids)

    def generate_stream(self, prompt: str | None = None, sampling_params: SamplingParams | None = None,
                        adapter: str | None = None, prompt_token_ids: Sequence[int] | None = None
                        ) -> Iterator[StreamChunk]:
        """One request, streamed as `LLM.generate_stream` does. A worker lost before the first chunk is
        replaced by another; after it, the stream fails with WorkerLostError."""
        if (prompt is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompt or prompt_token_ids")
        if self._closed:
            raise RuntimeError(f"deployment {self.name!r} was shut down")
        params = sampling_params if sampling_params is not None else SamplingParams()
        token_ids = None if prompt_token_ids is None else list(prompt_token_ids)
        # The controller routes; tokens stream from the worker straight to here (one hop, not two).
        lost_on: list[str] = []
        deadline = None
        while True:
            route = self._call("route_stream", prompt, params, adapter, token_ids, tuple(lost_on))
            deadline = deadline or time.monotonic() + route["retry_timeout_s"]
            name, worker, streamed, lost = route["worker"], route["actor"], 0, None
            chunks = worker.generate_stream.options(num_returns="streaming").remote(prompt, params, adapter, token_ids)
            try:
                for ref in chunks:
                    chunk = ray.get(ref)
                    streamed += len(chunk.token_ids)
                    yield chunk
                return
            except RayActorError:
                lost = worker
                lost_on.append(name)
                if streamed:
                    raise WorkerLostError(f"worker {name} died after {streamed} token(s) of the request were "
                                          f"streamed; a partly streamed request is not retried") from None
                if time.monotonic() > deadline:
                    raise WorkerLostError(f"the request was lost with worker(s) {lost_on} and no retry "
                                          f"finished in time") from None
            except ray.exceptions.RayTaskError as exc:
                raise (exc.cause if exc.cause is not None else exc) from None
            except GeneratorExit:
                _cancel_quietly(chunks)   # the caller stopped reading: stop the worker's generation too
                raise
            finally:
                try:
                    self._controller.stream_done.remote(name, route["tokens"], lost)
                except Exception:   # Ray already shut down: nothing left to account for
                    pass

    # ---- finetuning ----------------------------------------------------------------------------

    def finetune(self, config: FinetuneConfig, worker: str | None = None, *,
                 pause_at_step: int | None = None) -> ClusterJob:
        """Start a finetuning job on the worker with the most headroom (or `worker`); returns at once.

        A dataset given as a file path is read here, so workers on other machines need not see the file.
        pause_at_step: the job pauses after that many steps until `continue_job` (as `LLM.finetune`).
        """
        if not isinstance(config, FinetuneConfig):
            raise TypeError(f"expected a FinetuneConfig, got {type(config).__name__}")
        if isinstance(config.dataset, (str, os.PathLike)):
            config = dataclasses.replace(config, dataset=load_rows(config.dataset))
        if config.output_dir is not None:
            config = dataclasses.replace(config, output_dir=os.path.abspath(config.output_dir))
        return ClusterJob(self, self._call("submit_job", config, worker, pause_at_step))

    def wait_job_step(self, job_id: str, step: int, timeout_s: float = 5.0) -> dict:
        """The job's live progress (as `FinetuneJobHandle.progress()`) once it has done `step` steps or
        ended, or after about `timeout_s`; live=False while its worker is being replaced."""
        return self._call("wait_job_step", job_id, step, timeout_s)

    def continue_job(self, job_id: str, pause_at_step: int | None) -> bool:
        """Let a paused job run until it has done `pause_at_step` steps (None: to the end)."""
        return self._call("continue_job", job_id, pause_at_step)

    def stop_job(self, job_id: str) -> bool:
        """End a job after its current step, saved as if finished (unlike cancel); False if it had ended."""
        return self._call("stop_job", job_id)

    def checkpoint_job(self, job_id: str) -> str:
        """Write the job's output_dir/checkpoint-<step>/ now; returns its path."""
        return self._call("checkpoint_job", job_id)

    def evaluate(self, dataset, adapter: str | None = None, *, max_seq_len: int = 256,
                 packing: bool = False) -> dict:
        """Forward-only mean token loss of `adapter` on `dataset` (`LLM.evaluate`), on a worker holding it."""
        return self._call("evaluate", load_rows(dataset), adapter, max_seq_len, packing)

    def save_adapter(self, name: str, path: str) -> None:
        """Write adapter `name` (current weights, also while it trains) to `path` (seen by its worker)."""
        self._call("save_adapter", name, os.path.abspath(path))

    def job(self, job_id: str) -> ClusterJob:
        self._call("job", job_id)   # raises KeyError for an unknown id
        return ClusterJob(self, job_id)

    def jobs(self) -> list[dict]:
        return self._call("jobs")

    # ---- adapters, workers, stats --------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> None:
        self._call("load_adapter", name, os.path.abspath(path))

    def unload_adapter(self, name: str) -> None:
        self._call("unload_adapter", name)

    def list_adapters(self) -> list[str]:
        return self._call("list_adapters")

    def workers(self) -> list[dict]:
        """One record per worker: name, role, actor (Ray handle), device, healthy, load (queued tokens), ..."""
        return self._call("workers_info")

    def stats(self) -> dict:
        return self._call("stats")

    def controller_incarnation(self) -> str:
        """An id of the controller's process; it changes when Ray restarts a controller that died."""
        return self._call("incarnation")

    def shutdown(self) -> None:
        """Stop every worker and the controller (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not ray.is_initialized():
            return
        try:
            ray.get(self._controller.shutdown.remote(), timeout=60)
        except Exception as exc:  # a dead or restarting controller: its workers are killed by name below
            logger.warning("controller shutdown failed: %s", exc)
        _kill_deployment(self.name, self._controller)
        _wait_until_released(self.name)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> "Deployment":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- calls to the controller ---------------------------------------------------------------

    def _call(self, method: str, *args):
        """Call the controller; reads are retried while Ray restarts a dead controller."""
        if self._closed:
            raise RuntimeError(f"deployment {self.name!r} was shut down")
        deadline = time.monotonic() + CONTROLLER_RESTART_WAIT_S
        while True:
            try:
                return ray.get(getattr(self._controller, method).remote(*args))
            except RayActorError:
                if self._closed or method not in _RETRYABLE or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.RayTaskError as exc:
                raise (exc.cause if exc.cause is not None else exc) from None


def _cancel_quietly(ref_generator) -> None:
    try:
        ray.cancel(ref_generator)
    except Exception:   # already finished, or not cancellable: the worker ends it at its max_tokens
        pass


def _kill_deployment(name: str, controller) -> None:
    """Kill the controller and every worker actor of `name` (after a failed or interrupted start)."""
    try:
        ray.kill(controller, no_restart=True)
    except Exception:
        pass
    _kill_named(_actor_names_of(name))


def _kill_named(actor_names: list[str]) -> None:
    for actor_name in actor_names:
        try:
            ray.kill(ray.get_actor(actor_name, namespace=NAMESPACE), no_restart=True)
        except Exception:   # already gone
            pass


def _wait_for_free_resources(specs, timeout_s: float) -> None:
    """Wait until the cluster's free CPUs/GPUs cover the workers; else PlacementError naming the gap.

    Ray would leave workers that do not fit pending for ever, and `start` would hang.
    """
    deadline = time.monotonic() + timeout_s
    while missing := shortfall(specs, ray.available_resources()):
        if time.monotonic() > deadline:
            running = _running_deployments()
            gap = ", ".join(f"{amount:g} more {kind}" for kind, amount in missing.items())
            raise PlacementError(
                f"the Ray cluster's free resources stayed short of what the {len(specs)} worker(s) need "
                f"({gap}) for {timeout_s:g} s; other actors hold them"
                + (f" (running deployments: {', '.join(running)})" if running else "")
                + "; stop them or use fewer or smaller workers")
        time.sleep(0.2)


NAME_RELEASE_WAIT_S = 10.0


def _actor_names_of(name: str) -> list[str]:
    from ray.util import list_named_actors

    return [a["name"] for a in list_named_actors(all_namespaces=True)
            if a.get("namespace") == NAMESPACE and a["name"].startswith(f"{name}:")]


def _wait_until_released(name: str) -> None:
    """Wait (bounded) until Ray has dropped the actor names of deployment `name`.

    ray.kill returns before the actor is gone, and a deployment started under the same name right
    after a shutdown would find the old controller still registered. A name still there after a
    while is killed again: a worker the controller was creating as it died registers late.
    """
    deadline = time.monotonic() + NAME_RELEASE_WAIT_S
    next_kill = time.monotonic() + 1.0
    while (left := _actor_names_of(name)) and time.monotonic() < deadline:
        if time.monotonic() > next_kill:
            _kill_named(left)
            next_kill = time.monotonic() + 1.0
        time.sleep(0.05)
    if left:
        logger.warning("deployment %r: actors %s still registered %.0f s after shutdown", name, left,
                       NAME_RELEASE_WAIT_S)


def _find_controller(name: str):
    try:
        return ray.get_actor(controller_name(name), namespace=NAMESPACE)
    except ValueError:
        return None


def _running_deployments() -> list[str]:
    from ray.util import list_named_actors

    return sorted(a["name"].rsplit(":", 1)[0] for a in list_named_actors(all_namespaces=True)
                  if a.get("namespace") == NAMESPACE and a["name"].endswith(":controller"))


def _per_prompt(value, count: int, name: str, kind) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} entries for {count} prompts")
    for v in values:
        if not isinstance(v, kind):
            raise TypeError(f"{name} entries must be {kind}, got {type(v).__name__}")
    return values
