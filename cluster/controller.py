"""The deployment's controller: knows every worker and every finetuning job.

It is a named, detached Ray actor (`cluster.deployment` starts it) that
restarts when it dies (Ray `max_restarts`): the workers are detached named
actors it finds again by name, and the job table is a SQLite file in the
deployment's directory, so a new incarnation picks up where the old one was.

- Inference: `generate` routes each prompt (adapter affinity, then power of
  two choices on queued tokens; `cluster.routing`), loads the adapter where it
  is routed if needed, and sends one sub-batch per worker. A sub-batch whose
  worker dies is routed again (nothing was streamed yet); after
  `retry_timeout_s` without success its requests fail with WorkerLostError.
- Finetuning: a job goes to the worker with the most finetuning headroom (or
  a named one). A monitor thread polls every worker's load and every job's
  progress; when a worker dies it is replaced under the same name and its jobs
  resume from their latest checkpoint (or from the start if there is none).
- A driver (the Trainer) can run a job step by step (`wait_job_step`,
  `continue_job`, `stop_job`, `checkpoint_job`, asked of the job's worker
  directly) and evaluate or save an adapter on a worker holding it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import threading
import time
import uuid
import warnings
from pathlib import Path

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from cluster.actors import RemoteWorker
from cluster.adapter_registry import AdapterRegistry
from cluster.errors import WorkerLostError
from cluster.job_store import JobRecord, JobStore
from cluster.names import NAMESPACE, worker_actor_name
from cluster.placement import WorkerSpec
from cluster.routing import NoWorkerError, Router, WorkerLoad
from coserve.config import FinetuneConfig
from coserve.finetune.checkpoint import latest_checkpoint

logger = logging.getLogger(__name__)

TERMINAL = ("succeeded", "failed", "cancelled")
MONITOR_INTERVAL_S = 0.5
LOAD_TIMEOUT_S = 30.0
WORKER_START_TIMEOUT_S = 600.0


@dataclasses.dataclass
class WorkerState:
    spec: WorkerSpec
    handle: object
    healthy: bool = True
    adapters: frozenset = frozenset()
    queued_tokens: int = 0          # routed here by this controller and not finished
    running_jobs: int = 0
    finetune_headroom: float = 0.0
    device: str = ""
    restarts: int = 0

    def as_load(self) -> WorkerLoad:
        return WorkerLoad(name=self.spec.name, role=self.spec.role, healthy=self.healthy, adapters=self.adapters,
                          queued_tokens=self.queued_tokens, finetune_headroom=self.finetune_headroom,
                          running_jobs=self.running_jobs)


def _unwrap(exc: BaseException) -> BaseException:
    """The user-facing error inside a RayTaskError (bad input raised by a worker)."""
    return exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc


class Controller:
    def __init__(self, name: str, model: str, specs: list[WorkerSpec], engine_kwargs: dict, directory: str,
                 retry_timeout_s: float = 120.0, role_engine_kwargs: dict[str, dict] | None = None) -> None:
        self.name = name
        self.model = model
        self.specs = list(specs)
        self.engine_kwargs = dict(engine_kwargs)
        self.role_engine_kwargs = dict(role_engine_kwargs or {})
        self.directory = Path(directory)
        self.retry_timeout_s = retry_timeout_s
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store = JobStore(self.directory / "jobs.sqlite")
        self.registry = AdapterRegistry(self.directory / "adapters.json")
        self.router = Router()
        self.workers: dict[str, WorkerState] = {}
        self._pause_at: dict[str, int | None] = {}   # job id -> the step its driver lets it run to
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._started = False
        self.incarnation_id = uuid.uuid4().hex   # changes when Ray restarts this actor
        if _restarted_by_ray():
            self._attach_existing_workers()
        self._monitor = threading.Thread(target=self._monitor_loop, name="coserve-monitor", daemon=True)
        self._monitor.start()

    # ---- workers -------------------------------------------------------------------------------

    def start(self) -> list[dict]:
        """Create every worker and wait until all have loaded the model; on failure none is left.

        A new deployment starts with an empty job table and adapter registry, even under a reused name.
        """
        self.store.close()
        for stale in ("jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm", "adapters.json"):
            (self.directory / stale).unlink(missing_ok=True)
        self.store = JobStore(self.directory / "jobs.sqlite")
        self.registry = AdapterRegistry(self.directory / "adapters.json")
        handles = {s.name: self._create_worker(s) for s in self.specs}
        try:
            infos = ray.get([h.info.remote() for h in handles.values()], timeout=WORKER_START_TIMEOUT_S)
        except Exception as exc:
            for handle in handles.values():
                ray.kill(handle, no_restart=True)
            raise RuntimeError(f"a worker failed to start: {_unwrap(exc)}") from None
        with self._lock:
            for spec, info in zip(self.specs, infos):
                self.workers[spec.name] = WorkerState(spec, handles[spec.name], adapters=frozenset(info["adapters"]),
                                                      device=info["device"])
            self._started = True
        self._write_manifest()
        return self.workers_info()

    def _create_worker(self, spec: WorkerSpec):
        actor_name = worker_actor_name(self.name, spec.name)
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return RemoteWorker.options(name=actor_name, namespace=NAMESPACE, lifetime="detached",
                                            **spec.actor_options()).remote(
                    spec.name, self.model, spec.role, spec.num_threads,
                    {**self.engine_kwargs, **self.role_engine_kwargs.get(spec.role, {})})
            except ValueError:
                # The name of a worker that just died is released shortly after its death.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _attach_existing_workers(self) -> None:
        """After a controller restart: find the workers by name; missing ones are replaced by the monitor."""
        for spec in self.specs:
            try:
                handle = ray.get_actor(worker_actor_name(self.name, spec.name), namespace=NAMESPACE)
                healthy = True
            except ValueError:
                handle, healthy = None, False
            self.workers[spec.name] = WorkerState(spec, handle, healthy=healthy)
        self._started = True
        logger.info("controller %s restarted; %d worker(s) found", self.name,
                    sum(w.healthy for w in self.workers.values()))

    def _write_manifest(self) -> None:
        manifest = {"name": self.name, "model": self.model, "workers": [dataclasses.asdict(s) for s in self.specs]}
        (self.directory / "deployment.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")

    def workers_info(self) -> list[dict]:
        with self._lock:
            return [{"name": w.spec.name, "role": w.spec.role, "actor": w.handle, "device": w.device,
                     "healthy": w.healthy, "load": w.queued_tokens, "adapters": sorted(w.adapters),
                     "running_jobs": w.running_jobs, "restarts": w.restarts,
                     "resources": {"num_cpus": w.spec.num_cpus, "num_gpus": w.spec.num_gpus}}
                    for w in self.workers.values()]

    def _mark_lost(self, name: str, handle) -> None:
        with self._lock:
            worker = self.workers.get(name)
            if worker is not None and _same_actor(worker.handle, handle) and worker.healthy:
                worker.healthy = False
                logger.warning("worker %s of deployment %s is lost", name, self.name)
        self._wake.set()

    def _replace_worker(self, name: str) -> None:
        """Monitor thread: start a new actor under the lost worker's name and resume its jobs."""
        worker = self.workers[name]
        if worker.handle is not None:
            try:
                ray.kill(worker.handle, no_restart=True)
            except Exception:  # already gone
                pass
        try:
            handle = self._create_worker(worker.spec)
            info = ray.get(handle.info.remote(), timeout=WORKER_START_TIMEOUT_S)
        except Exception as exc:
            logger.error("could not replace worker %s: %s", name, _unwrap(exc))
            return
        with self._lock:
            worker.handle, worker.healthy, worker.device = handle, True, info["device"]
            worker.adapters, worker.queued_tokens, worker.restarts = frozenset(info["adapters"]), 0, worker.restarts + 1
        logger.info("worker %s replaced", name)

    # ---- inference -----------------------------------------------------------------------------

    def generate(self, prompts, sampling_params, adapters, prompt_token_ids=None) -> list:
        """Route, run and collect one batch; lost sub-batches are routed again until retry_timeout_s."""
        count = len(prompts) if prompts is not None else len(prompt_token_ids)
        results: list = [None] * count
        pending = list(range(count))
        deadline = time.monotonic() + self.retry_timeout_s
        lost_on: list[str] = []
        while pending:
            try:
                groups = self._route(pending, prompts, sampling_params, adapters, prompt_token_ids)
            except NoWorkerError as exc:
                if time.monotonic() > deadline:
                    lost = f" (lost with worker(s) {sorted(set(lost_on))})" if lost_on else ""
                    raise WorkerLostError(f"{len(pending)} request(s){lost} could not be served within "
                                          f"{self.retry_timeout_s:.0f} s: {exc}") from None
                time.sleep(0.1)
                continue
            calls = []
            for name, indices in groups.items():
                with self._lock:
                    handle = self.workers[name].handle
                    tokens = sum(_request_tokens(i, prompts, prompt_token_ids, sampling_params[i]) for i in indices)
                    self.workers[name].queued_tokens += tokens
                try:
                    ref = self._dispatch(name, handle, indices, prompts, sampling_params, adapters, prompt_token_ids)
                except BaseException as exc:
                    ref = exc
                calls.append((name, handle, indices, tokens, ref))
            pending = []
            first_error: BaseException | None = None
            for name, handle, indices, tokens, ref in calls:
                try:
                    if isinstance(ref, BaseException):
                        raise ref
                    outputs = ray.get(ref)
                except RayActorError:
                    self._mark_lost(name, handle)
                    lost_on.append(name)
                    pending.extend(indices)
                    continue
                except Exception as exc:
                    first_error = first_error or _unwrap(exc)
                    continue
                finally:
                    with self._lock:
                        self.workers[name].queued_tokens -= tokens
                for i, out in zip(indices, outputs):
                    results[i] = out
            if first_error is not None:
                raise first_error
            if pending and time.monotonic() > deadline:
                raise WorkerLostError(f"{len(pending)} request(s) were lost with worker(s) {sorted(set(lost_on))} "
                                      f"and no retry finished within {self.retry_timeout_s:.0f} s")
            pending.sort()
        return results

    def route_stream(self, prompt, sampling_params, adapter, prompt_token_ids=None, lost_on: tuple = ()) -> dict:
        """Pick the worker for one streamed request and load its adapter there; the caller streams
        from the worker directly (tokens never pass through here) and calls `stream_done` after.

        Waits up to retry_timeout_s for a healthy worker; then WorkerLostError naming `lost_on`.
        """
        prompts = None if prompt is None else [prompt]
        token_ids = None if prompt_token_ids is None else [prompt_token_ids]
        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                name = next(iter(self._route([0], prompts, [sampling_params], [adapter], token_ids)))
                with self._lock:
                    handle = self.workers[name].handle
                self._dispatch_adapters(name, handle, [adapter])
                break
            except (NoWorkerError, RayActorError) as exc:
                if isinstance(exc, RayActorError):
                    self._mark_lost(name, handle)
                if time.monotonic() > deadline:
                    lost = f" (lost with worker(s) {sorted(set(lost_on))})" if lost_on else ""
                    raise WorkerLostError(f"the request{lost} could not be served within "
                                          f"{self.retry_timeout_s:.0f} s: {exc}") from None
                time.sleep(0.1)
        tokens = _request_tokens(0, prompts, token_ids, sampling_params)
        with self._lock:
            self.workers[name].queued_tokens += tokens
        return {"worker": name, "actor": handle, "tokens": tokens, "retry_timeout_s": self.retry_timeout_s}

    def stream_done(self, worker: str, tokens: int, lost_handle=None) -> None:
        """A stream routed by `route_stream` ended; `lost_handle`: its worker died under it."""
        with self._lock:
            if worker in self.workers:
                self.workers[worker].queued_tokens -= tokens
        if lost_handle is not None:
            self._mark_lost(worker, lost_handle)

    def _route(self, indices: list[int], prompts, sampling_params, adapters, prompt_token_ids
               ) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {}
        with self._lock:
            loads = {w.spec.name: w.as_load() for w in self.workers.values()}
            for i in indices:
                adapter = adapters[i]
                candidates = list(loads.values())
                if adapter is not None and self.registry.get(adapter) is None:
                    # Not loadable elsewhere (unknown, or being trained): only its holders can serve it.
                    candidates = [w for w in candidates if adapter in w.adapters]
                    if not candidates:
                        raise KeyError(f"unknown adapter {adapter!r}: load it with load_adapter(name, path) first")
                chosen = self.router.choose_inference_worker(adapter, candidates)
                groups.setdefault(chosen, []).append(i)
                # Later prompts of the batch see this one's load (and the adapter it will bring).
                load = loads[chosen]
                loads[chosen] = dataclasses.replace(
                    load, queued_tokens=load.queued_tokens + _request_tokens(i, prompts, prompt_token_ids,
                                                                             sampling_params[i]),
                    adapters=load.adapters | ({adapter} if adapter is not None else set()))
        return groups

    def _dispatch(self, name: str, handle, indices: list[int], prompts, sampling_params, adapters,
                  prompt_token_ids):
        """Load missing adapters on the worker (where routed), then send it the sub-batch."""
        self._dispatch_adapters(name, handle, [adapters[i] for i in indices])
        return handle.generate.remote(
            [prompts[i] for i in indices] if prompts is not None else None,
            [sampling_params[i] for i in indices], [adapters[i] for i in indices],
            [prompt_token_ids[i] for i in indices] if prompt_token_ids is not None else None)

    def _dispatch_adapters(self, name: str, handle, adapters) -> None:
        with self._lock:
            needed = {a for a in adapters if a is not None} - self.workers[name].adapters
        for adapter in sorted(needed):
            ray.get(handle.ensure_adapter.remote(adapter, self.registry.get(adapter)))
            with self._lock:
                self.workers[name].adapters = self.workers[name].adapters | {adapter}

    # ---- adapters ------------------------------------------------------------------------------

    def load_adapter(self, name: str, path: str) -> str:
        """Register an adapter for the whole deployment; it is loaded (and so checked) on one worker now."""
        if self.registry.get(name) is not None or any(name in w.adapters for w in self.workers.values()):
            raise ValueError(f"adapter {name!r} is already loaded in deployment {self.name!r}")
        with self._lock:
            loads = [w.as_load() for w in self.workers.values()]
        target = self.router.choose_inference_worker(None, loads)
        handle = self.workers[target].handle
        try:
            ray.get(handle.ensure_adapter.remote(name, path))
        except RayTaskError as exc:
            raise _unwrap(exc) from None
        with self._lock:
            self.workers[target].adapters = self.workers[target].adapters | {name}
        self.registry.add(name, path)
        return target

    def unload_adapter(self, name: str) -> None:
        holders = [w for w in self.workers.values() if name in w.adapters and w.healthy]
        if not self.registry.remove(name) and not holders:
            raise KeyError(f"adapter {name!r} is not loaded in deployment {self.name!r}")
        for worker in holders:
            try:
                ray.get(worker.handle.unload_adapter.remote(name))
            except RayActorError:
                continue
            with self._lock:
                worker.adapters = worker.adapters - {name}

    def list_adapters(self) -> list[str]:
        with self._lock:
            resident = set().union(*(w.adapters for w in self.workers.values())) if self.workers else set()
        return sorted(resident | set(self.registry.names()))

    # ---- finetuning ----------------------------------------------------------------------------

    def submit_job(self, config: FinetuneConfig, worker: str | None = None, pause_at_step: int | None = None) -> str:
        if not isinstance(config, FinetuneConfig):
            raise TypeError(f"expected a FinetuneConfig, got {type(config).__name__}")
        self._check_adapter_free(config.adapter)
        job_id = f"ftjob-{uuid.uuid4().hex[:10]}"
        if config.output_dir is None:
            config = dataclasses.replace(config, output_dir=str(self.directory / "jobs" / job_id))
        with self._lock:
            target = self.router.choose_finetune_worker([w.as_load() for w in self.workers.values()], worker)
        self.store.add(JobRecord(job_id=job_id, adapter=config.adapter, config=pickle.dumps(config),
                                 status="queued", worker=target, output_dir=config.output_dir))
        try:
            engine_job_id = ray.get(self.workers[target].handle.start_finetune.remote(config, pause_at_step))
        except (RayTaskError, RayActorError) as exc:
            error = _unwrap(exc)
            self.store.update(job_id, status="failed", error=f"{type(error).__name__}: {error}")
            raise error from None
        # NOTE: in memory only: a job resumed after its worker died keeps pausing where its driver wants.
        self._pause_at[job_id] = pause_at_step
        self.store.update(job_id, status="running", engine_job_id=engine_job_id, attempts=1)
        with self._lock:
            self.workers[target].running_jobs += 1
            self.workers[target].adapters = self.workers[target].adapters | {config.adapter}
        return job_id

    def _check_adapter_free(self, adapter: str) -> None:
        if adapter in self.list_adapters():
            raise ValueError(f"adapter name {adapter!r} is already in use in deployment {self.name!r}")
        for record in self.store.unfinished():
            if record.adapter == adapter:
                raise ValueError(f"adapter name {adapter!r} is being trained by job {record.job_id}")

    def job(self, job_id: str) -> dict:
        record = self.store.get(job_id)
        if record is None:
            raise KeyError(f"no finetuning job {job_id!r} in deployment {self.name!r}")
        return _record_dict(record)

    def jobs(self) -> list[dict]:
        return [_record_dict(r) for r in self.store.all()]

    def cancel_job(self, job_id: str) -> bool:
        record = self.store.get(job_id)
        if record is None:
            raise KeyError(f"no finetuning job {job_id!r} in deployment {self.name!r}")
        if record.status in TERMINAL:
            return False
        worker = self.workers.get(record.worker)
        if worker is not None and worker.healthy and record.engine_job_id is not None:
            try:
                ray.get(worker.handle.cancel_job.remote(record.engine_job_id))
            except (RayActorError, RayTaskError):
                pass
        with self._lock:
            self.store.update(job_id, status="cancelled")
        return True

    # ---- jobs driven step by step (the Trainer) --------------------------------------------------

    def wait_job_step(self, job_id: str, step: int, timeout_s: float) -> dict:
        """The job's live progress once it has done `step` steps or ended, or after `timeout_s`.

        Asks the job's worker directly (the job table lags by a monitor round). While the worker is
        lost or replaced, returns the table's record after a short wait, marked live=False.
        """
        record = self._record(job_id)
        worker = self.workers.get(record.worker)
        if worker is not None and worker.healthy and record.engine_job_id is not None:
            try:
                progress = ray.get(worker.handle.wait_job_step.remote(record.engine_job_id, step, timeout_s),
                                   timeout=timeout_s + LOAD_TIMEOUT_S)
                return {**progress, "job_id": job_id, "engine_job_id": progress["job_id"],
                        "worker": record.worker, "live": True}
            except (RayActorError, RayTaskError, GetTimeoutError):
                pass
        time.sleep(min(timeout_s, MONITOR_INTERVAL_S))
        return {**_record_dict(self._record(job_id)), "live": False}

    def continue_job(self, job_id: str, pause_at_step: int | None) -> bool:
        self._pause_at[job_id] = pause_at_step
        return self._call_job_worker(job_id, "continue_job", pause_at_step)

    def stop_job(self, job_id: str) -> bool:
        """End the job after its current step, saved as if finished (status "succeeded")."""
        return self._call_job_worker(job_id, "stop_job")

    def checkpoint_job(self, job_id: str) -> str:
        return self._call_job_worker(job_id, "checkpoint_job")

    def _call_job_worker(self, job_id: str, method: str, *args):
        record = self._record(job_id)
        if record.status in TERMINAL and method != "checkpoint_job":
            return False
        worker = self.workers.get(record.worker)
        if worker is None or not worker.healthy or record.engine_job_id is None:
            raise WorkerLostError(f"job {job_id}'s worker {record.worker} is not available now; try again")
        try:
            return ray.get(getattr(worker.handle, method).remote(record.engine_job_id, *args))
        except RayTaskError as exc:
            raise _unwrap(exc) from None

    def _record(self, job_id: str) -> JobRecord:
        record = self.store.get(job_id)
        if record is None:
            raise KeyError(f"no finetuning job {job_id!r} in deployment {self.name!r}")
        return record

    # ---- evaluation and saving -----------------------------------------------------------------

    def evaluate(self, rows: list, adapter: str | None, max_seq_len: int, packing: bool) -> dict:
        """Forward-only mean token loss on a worker that holds `adapter` (any worker for the base model)."""
        name, handle = self._worker_with(adapter)
        try:
            return {**ray.get(handle.evaluate.remote(rows, adapter, max_seq_len, packing)), "worker": name}
        except RayTaskError as exc:
            raise _unwrap(exc) from None

    def save_adapter(self, adapter: str, path: str) -> None:
        _, handle = self._worker_with(adapter)
        try:
            ray.get(handle.save_adapter.remote(adapter, path))
        except RayTaskError as exc:
            raise _unwrap(exc) from None

    def _worker_with(self, adapter: str | None):
        """A healthy worker holding `adapter` (a job's worker holds its adapter while it trains), else one
        that loads it from the registry now; for None, the least loaded."""
        with self._lock:
            healthy = [w for w in self.workers.values() if w.healthy and w.handle is not None]
            holders = [w for w in healthy if adapter is None or adapter in w.adapters]
        if not healthy:
            raise NoWorkerError("no healthy worker")
        if holders:
            worker = min(holders, key=lambda w: w.queued_tokens)
            return worker.spec.name, worker.handle
        path = self.registry.get(adapter)
        if path is None:
            raise KeyError(f"unknown adapter {adapter!r} in deployment {self.name!r}")
        worker = min(healthy, key=lambda w: w.queued_tokens)
        self._dispatch_adapters(worker.spec.name, worker.handle, [adapter])
        return worker.spec.name, worker.handle

    def _resume_job(self, record: JobRecord) -> None:
        """Start a job again on its (replaced) worker, or elsewhere, from its latest checkpoint."""
        config: FinetuneConfig = pickle.loads(record.config)
        checkpoint = latest_checkpoint(record.output_dir) if record.output_dir else None
        config = dataclasses.replace(config, resume_from_checkpoint=checkpoint)
        with self._lock:
            loads = [w.as_load() for w in self.workers.values()]
        preferred = record.worker if any(w.name == record.worker and w.healthy for w in loads) else None
        try:
            target = self.router.choose_finetune_worker(loads, preferred)
            engine_job_id = ray.get(self.workers[target].handle.start_finetune.remote(
                config, self._pause_at.get(record.job_id)))
        except NoWorkerError:
            return   # tried again on the next round, once a worker is back
        except (RayTaskError, RayActorError) as exc:
            error = _unwrap(exc)
            self.store.update(record.job_id, status="failed",
                              error=f"could not resume after losing its worker: {type(error).__name__}: {error}")
            return
        logger.info("job %s resumed on %s from %s", record.job_id, target, checkpoint or "the start")
        self.store.update(record.job_id, status="running", worker=target, engine_job_id=engine_job_id,
                          attempts=record.attempts + 1)
        with self._lock:
            self.workers[target].adapters = self.workers[target].adapters | {record.adapter}

    # ---- monitoring ----------------------------------------------------------------------------

    def _monitor_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(MONITOR_INTERVAL_S)
            self._wake.clear()
            if not self._started or self._stop.is_set():
                continue
            try:
                self._poll_workers()
                for name in [n for n, w in self.workers.items() if not w.healthy]:
                    self._replace_worker(name)
                self._poll_jobs()
            except Exception:  # the monitor must outlive any one failure
                logger.exception("controller monitor round failed")

    def _poll_workers(self) -> None:
        with self._lock:
            workers = [(w, w.handle) for w in self.workers.values() if w.healthy and w.handle is not None]
        refs = [(w, h, h.load.remote()) for w, h in workers]
        for worker, handle, ref in refs:
            try:
                load = ray.get(ref, timeout=LOAD_TIMEOUT_S)
            except RayActorError:
                self._mark_lost(worker.spec.name, handle)
                continue
            except GetTimeoutError:
                continue   # busy, not dead
            with self._lock:
                worker.adapters = frozenset(load["adapters"])
                worker.running_jobs = load["running_jobs"]
                worker.finetune_headroom = load["finetune_headroom"]

    def _poll_jobs(self) -> None:
        for record in self.store.unfinished():
            worker = self.workers.get(record.worker)
            if worker is None or not worker.healthy or record.engine_job_id is None:
                continue
            try:
                progress = ray.get(worker.handle.job_progress.remote(record.engine_job_id), timeout=LOAD_TIMEOUT_S)
            except RayActorError:
                self._mark_lost(worker.spec.name, worker.handle)
                continue
            except GetTimeoutError:
                continue
            if progress is None:   # the worker was replaced: the job is not running anywhere
                self._resume_job(record)
                continue
            with self._lock:   # a cancel may have landed since the table was read
                current = self.store.get(record.job_id)
                if current is None or current.status in TERMINAL or current.engine_job_id != record.engine_job_id:
                    continue
                self.store.update(record.job_id, status=progress["status"], step=progress["step"],
                                  losses=progress["losses"], error=progress["error"])
            if progress["status"] == "succeeded":
                self.registry.add(record.adapter, record.output_dir)

    # ---- stats and shutdown --------------------------------------------------------------------

    def stats(self) -> dict:
        with self._lock:
            workers = [(w.spec.name, w.handle) for w in self.workers.values() if w.healthy]
        per_worker = {}
        for name, handle in workers:
            try:
                per_worker[name] = ray.get(handle.stats.remote(), timeout=LOAD_TIMEOUT_S)
            except (RayActorError, GetTimeoutError) as exc:
                per_worker[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return {"deployment": self.name, "model": self.model, "workers": per_worker,
                "totals": _totals(per_worker.values()), "jobs": self.jobs(), "adapters": self.registry.as_dict()}

    def ping(self) -> str:
        return self.name

    def incarnation(self) -> str:
        """An id of this controller process: a new one after Ray restarted the controller."""
        return self.incarnation_id

    def shutdown(self) -> None:
        """Stop monitoring and kill every worker (the caller then kills this actor)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            handles = [w.handle for w in self.workers.values() if w.handle is not None]
        for handle in handles:
            try:
                ray.kill(handle, no_restart=True)
            except Exception:
                pass
        self.store.close()


def _same_actor(a, b) -> bool:
    """Whether two handles name one actor: a handle that came back through Ray is a new object."""
    return a is b or (a is not None and b is not None and a._actor_id == b._actor_id)


def _restarted_by_ray() -> bool:
    """True in an incarnation Ray started after the controller died (max_restarts)."""
    try:
        with warnings.catch_warnings():   # Ray warns about an attribute it reads internally
            warnings.simplefilter("ignore", DeprecationWarning)
            return ray.get_runtime_context().was_current_actor_reconstructed
    except Exception:   # not inside an actor (tests of the plain class)
        return False


def _request_tokens(i: int, prompts, prompt_token_ids, params) -> int:
    """Queued-token estimate for routing: prompt tokens (about 4 characters each for text) plus max_tokens."""
    prompt = len(prompt_token_ids[i]) if prompt_token_ids is not None else len(prompts[i]) // 4 + 1
    return prompt + (params.max_tokens or 0)


def _record_dict(record: JobRecord) -> dict:
    out = dataclasses.asdict(record)
    out.pop("config")
    return out


def _totals(stats) -> dict:
    totals = {"num_iterations": 0, "num_finished": 0, "tokens_by_kind": {}}
    for s in stats:
        if "error" in s:
            continue
        totals["num_iterations"] += s.get("num_iterations", 0)
        totals["num_finished"] += s.get("num_finished", 0)
        for kind, n in s.get("tokens_by_kind", {}).items():
            totals["tokens_by_kind"][kind] = totals["tokens_by_kind"].get(kind, 0) + n
    return totals
