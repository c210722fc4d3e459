"""`EngineWorker`: one engine on one device share, the plain class inside a worker actor.

It owns an `LLM` whose engine steps on its own thread (`caller_drives=False`),
so the actor's thread pool can call `generate` from many threads at once and
they batch together. Everything here is plain Python: tests use it without Ray,
and `cluster.actors` wraps it in a Ray actor unchanged.

A worker has a role: "coserve" (inference and finetuning in the same
iterations), "inference" or "finetune" (the two halves of spatial sharing).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Iterator, Sequence

from coserve.config import FinetuneConfig
from coserve.finetune.handle import FinetuneJobHandle
from coserve.llm import LLM
from coserve.outputs import RequestOutput, StreamChunk
from coserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

ROLES = ("coserve", "inference", "finetune")


class EngineWorker:
    def __init__(self, name: str, model: str, role: str = "coserve", device_label: str | None = None,
                 num_threads: int | None = None, **engine_kwargs) -> None:
        if role not in ROLES:
            raise ValueError(f"worker role must be one of {ROLES}, got {role!r}")
        self.name = name
        self.role = role
        self.llm = _start_engine_thread(model, num_threads, engine_kwargs)
        self.device = device_label or str(self.llm.engine.device)
        self._jobs: dict[str, FinetuneJobHandle] = {}
        self._lock = threading.Lock()
        self._queued_tokens = 0

    # ---- identity and health ------------------------------------------------------------------

    def ping(self) -> str:
        return self.name

    def info(self) -> dict:
        return {"name": self.name, "role": self.role, "device": self.device, "pid": os.getpid(),
                "host": socket.gethostname(), "adapters": self.llm.list_adapters()}

    # ---- inference ----------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str] | None, sampling_params: Sequence[SamplingParams],
                 adapters: Sequence[str | None], prompt_token_ids: Sequence[Sequence[int]] | None = None
                 ) -> list[RequestOutput]:
        """One sub-batch routed here; per-prompt params and adapters (same as `LLM.generate`)."""
        if self.role == "finetune":
            raise RuntimeError(f"worker {self.name} is finetuning-only and serves no inference")
        tokens = sum(p.max_tokens or 0 for p in sampling_params)
        with self._lock:
            self._queued_tokens += tokens
        try:
            return self.llm.generate(prompts=list(prompts) if prompts is not None else None,
                                     sampling_params=list(sampling_params), adapter=list(adapters),
                                     prompt_token_ids=prompt_token_ids)
        finally:
            with self._lock:
                self._queued_tokens -= tokens

    def generate_stream(self, prompt: str | None, sampling_params: SamplingParams, adapter: str | None,
                        prompt_token_ids: Sequence[int] | None = None) -> Iterator[StreamChunk]:
        """One request, streamed (`LLM.generate_stream`); a Ray streaming generator in the actor."""
        if self.role == "finetune":
            raise RuntimeError(f"worker {self.name} is finetuning-only and serves no inference")
        tokens = sampling_params.max_tokens or 0
        with self._lock:
            self._queued_tokens += tokens
        try:
            yield from self.llm.generate_stream(prompt, sampling_params, adapter, prompt_token_ids)
        finally:
            with self._lock:
                self._queued_tokens -= tokens

    # ---- adapters -----------------------------------------------------------------------------

    def ensure_adapter(self, name: str, path: str) -> bool:
        """Load `name` from `path` unless it is already here; True if it was loaded now."""
        if name in self.llm.list_adapters():
            return False
        self.llm.load_adapter(name, path)
        return True

    def unload_adapter(self, name: str) -> bool:
        if name not in self.llm.list_adapters():
            return False
        self.llm.unload_adapter(name)
        return True

    def list_adapters(self) -> list[str]:
        return self.llm.list_adapters()

    def save_adapter(self, name: str, path: str) -> None:
        self.llm.save_adapter(name, path)

    def evaluate(self, rows: list, adapter: str | None, max_seq_len: int, packing: bool) -> dict:
        """Forward-only mean token loss of `adapter` on `rows` (`LLM.evaluate`); any role may run it."""
        return self.llm.evaluate(rows, adapter, max_seq_len=max_seq_len, packing=packing)

    # ---- finetuning ---------------------------------------------------------------------------

    def start_finetune(self, config: FinetuneConfig, pause_at_step: int | None = None) -> str:
        """Start a job; bad input raises here and starts nothing. Returns the engine's job id.

        pause_at_step: the job pauses after that many steps until `continue_job` (see `LLM.finetune`)."""
        if self.role == "inference":
            raise RuntimeError(f"worker {self.name} is inference-only and runs no finetuning")
        handle = self.llm.finetune(config, pause_at_step=pause_at_step)
        self._jobs[handle.job_id] = handle
        return handle.job_id

    def job_progress(self, job_id: str) -> dict | None:
        """The job's progress dict, None if this worker does not know the job (e.g. it restarted)."""
        handle = self._jobs.get(job_id)
        return handle.progress() if handle is not None else None

    def wait_job(self, job_id: str, timeout: float | None = None) -> str:
        return self._job(job_id).wait(timeout)

    def cancel_job(self, job_id: str) -> bool:
        return self._job(job_id).cancel()

    def wait_job_step(self, job_id: str, step: int, timeout: float | None = None) -> dict:
        """The job's progress once it has done `step` steps or ended (or after `timeout` seconds)."""
        return self._job(job_id).wait_step(step, timeout)

    def continue_job(self, job_id: str, pause_at_step: int | None) -> bool:
        return self._job(job_id).continue_to(pause_at_step)

    def stop_job(self, job_id: str) -> bool:
        """End the job gracefully after its current step, saved as if finished."""
        return self._job(job_id).stop()

    def checkpoint_job(self, job_id: str) -> str:
        return self._job(job_id).save_checkpoint()

    def _job(self, job_id: str) -> FinetuneJobHandle:
        try:
            return self._jobs[job_id]
        except KeyError:
            raise KeyError(f"worker {self.name} has no finetuning job {job_id!r}") from None

    # ---- load and stats -----------------------------------------------------------------------

    def load(self) -> dict:
        """What routing needs: resident adapters, queued inference tokens, finetuning headroom."""
        stats = self.llm.stats()
        running = sum(1 for h in self._jobs.values() if h.status in ("queued", "running"))
        with self._lock:
            queued = self._queued_tokens
        return {"name": self.name, "role": self.role, "adapters": self.llm.list_adapters(),
                "queued_tokens": queued, "running_jobs": running,
                "finetune_headroom": finetune_headroom(stats, running) if self.role != "inference" else 0.0}

    def stats(self) -> dict:
        stats = self.llm.stats()
        stats["worker"] = {"name": self.name, "role": self.role, "device": self.device}
        return stats

    def shutdown(self) -> None:
        self.llm.shutdown()


def _start_engine_thread(model: str, num_threads: int | None, engine_kwargs: dict) -> LLM:
    """Build the engine on a new thread that then steps it until shutdown.

    NOTE: torch's OpenMP work runs about 1.7x slower on a thread other than the
    first one that used it (measured here: a [16, 512] x [512, 512] linear with
    2 threads takes 148 us on that thread, 258 us on another). Loading, the
    start-up latency profile and every step therefore all run on this one
    thread, and the actor's call threads only queue work and wait.
    """
    started: dict = {}
    ready = threading.Event()

    def run() -> None:
        import torch

        try:
            if num_threads is not None:
                torch.set_num_threads(num_threads)
            started["llm"] = LLM(model, caller_drives=False, start_driver=False, **engine_kwargs)
        except BaseException as exc:   # re-raised on the constructing thread
            started["error"] = exc
            return
        finally:
            ready.set()
        started["llm"].run_driver()

    threading.Thread(target=run, name="coserve-engine", daemon=True).start()
    ready.wait()
    if "error" in started:
        raise started["error"]
    return started["llm"]


def finetune_headroom(stats: dict, running_jobs: int) -> float:
    """Finetuning tokens per iteration a new job could expect here.

    The budget's forward-token capacity minus what inference used per iteration
    lately, shared with the jobs already running (the planner splits it fairly).
    """
    capacity = float(stats["budget"]["max_forward_tokens"])
    by_kind = stats.get("mean_tokens_per_iteration_by_kind") or {}
    inference = float(by_kind.get("decode", 0.0)) + float(by_kind.get("prefill", 0.0))
    return max(0.0, capacity - inference) / (running_jobs + 1)
