"""What the HTTP server and the Trainer serve from: one local `LLM` or a cluster `Deployment`.

Both backends offer the same blocking calls (run them off the event loop):
generation (batched and streamed, token ids in, `RequestOutput` /
`StreamChunk` out), adapters, finetuning jobs by id, and stats in one shape:

    {"engines": {name: LLM.stats()-style dict}, "workers": [worker records], "jobs": [job dicts]}

A job dict has at least job_id, adapter, status, step, losses, error,
output_dir, worker and checkpoints (a list; empty where unknown).
"""
from __future__ import annotations

import os
import threading
from typing import Iterator, Sequence

from coserve.config import FinetuneConfig
from coserve.outputs import RequestOutput, StreamChunk
from coserve.sampling_params import SamplingParams


class LocalBackend:
    """One in-process engine (`coserve.LLM`)."""

    kind = "local"

    def __init__(self, llm) -> None:
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.model_path = llm.config.model
        self.max_model_len = llm.engine.max_model_len
        self._jobs: dict[str, object] = {}   # job id -> FinetuneJobHandle
        self._lock = threading.Lock()

    @classmethod
    def start(cls, model: str, **engine_kwargs) -> "LocalBackend":
        from coserve.llm import LLM

        return cls(LLM(model, **engine_kwargs))

    # ---- generation ----------------------------------------------------------------------------

    def generate(self, prompt_token_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 adapters: Sequence[str | None]) -> list[RequestOutput]:
        return self.llm.generate(prompt_token_ids=prompt_token_ids, sampling_params=list(params),
                                 adapter=list(adapters))

    def generate_stream(self, prompt_token_ids: Sequence[int], params: SamplingParams,
                        adapter: str | None) -> Iterator[StreamChunk]:
        return self.llm.generate_stream(prompt_token_ids=prompt_token_ids, sampling_params=params, adapter=adapter)

    # ---- adapters ------------------------------------------------------------------------------

    def list_adapters(self) -> list[str]:
        return self.llm.list_adapters()

    def load_adapter(self, name: str, path: str) -> None:
        self.llm.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.llm.unload_adapter(name)

    # ---- finetuning ----------------------------------------------------------------------------

    def finetune(self, config: FinetuneConfig) -> str:
        handle = self.llm.finetune(config)
        with self._lock:
            self._jobs[handle.job_id] = handle
        return handle.job_id

    def job(self, job_id: str) -> dict:
        handle = self._jobs.get(job_id)
        if handle is None:
            raise KeyError(f"no finetuning job {job_id!r}")
        return _local_job_dict(handle.progress(), handle.output_dir)

    def jobs(self) -> list[dict]:
        return [self.job(job_id) for job_id in list(self._jobs)]

    def cancel_job(self, job_id: str) -> bool:
        handle = self._jobs.get(job_id)
        if handle is None:
            raise KeyError(f"no finetuning job {job_id!r}")
        return handle.cancel()

    def wait_job(self, job_id: str, timeout: float | None = None) -> str:
        handle = self._jobs.get(job_id)
        if handle is None:
            raise KeyError(f"no finetuning job {job_id!r}")
        return handle.wait(timeout)

    # ---- state ---------------------------------------------------------------------------------

    def stats(self) -> dict:
        stats = self.llm.stats()
        worker = {"name": "local", "role": "coserve", "device": str(self.llm.engine.device), "healthy": True,
                  "load": stats.get("num_running", 0) + stats.get("num_waiting", 0),
                  "adapters": self.llm.list_adapters()}
        return {"engines": {"local": stats}, "workers": [worker], "jobs": self.jobs()}

    def shutdown(self) -> None:
        self.llm.shutdown()


class ClusterBackend:
    """A `cluster.Deployment`; the tokenizer is loaded here from the same model path."""

    kind = "cluster"

    def __init__(self, deployment, model_path: str, max_model_len: int | None = None) -> None:
        from coserve.models import load_hf_config, load_tokenizer, resolve_checkpoint

        self.deployment = deployment
        self.model_path = model_path
        resolved = resolve_checkpoint(model_path)
        self.tokenizer = load_tokenizer(resolved)
        self.max_model_len = max_model_len or load_hf_config(resolved.model_dir).max_position_embeddings

    def generate(self, prompt_token_ids, params, adapters) -> list[RequestOutput]:
        return self.deployment.generate(prompt_token_ids=prompt_token_ids, sampling_params=list(params),
                                        adapter=list(adapters))

    def generate_stream(self, prompt_token_ids, params, adapter) -> Iterator[StreamChunk]:
        return self.deployment.generate_stream(prompt_token_ids=prompt_token_ids, sampling_params=params,
                                               adapter=adapter)

    def list_adapters(self) -> list[str]:
        return self.deployment.list_adapters()

    def load_adapter(self, name: str, path: str) -> None:
        self.deployment.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        self.deployment.unload_adapter(name)

    def finetune(self, config: FinetuneConfig) -> str:
        return self.deployment.finetune(config).job_id

    def job(self, job_id: str) -> dict:
        return _cluster_job_dict(self.deployment.job(job_id).progress())

    def jobs(self) -> list[dict]:
        return [_cluster_job_dict(j) for j in self.deployment.jobs()]

    def cancel_job(self, job_id: str) -> bool:
        return self.deployment.job(job_id).cancel()

    def wait_job(self, job_id: str, timeout: float | None = None) -> str:
        return self.deployment.job(job_id).wait(timeout)

    def stats(self) -> dict:
        stats = self.deployment.stats()
        workers = [{k: v for k, v in w.items() if k != "actor"} for w in self.deployment.workers()]
        return {"engines": {name: s for name, s in stats["workers"].items() if "error" not in s},
                "workers": workers, "jobs": [_cluster_job_dict(j) for j in stats["jobs"]]}

    def shutdown(self) -> None:
        self.deployment.shutdown()


def _local_job_dict(progress: dict, output_dir: str | None) -> dict:
    return {**progress, "output_dir": output_dir, "worker": "local"}


def _cluster_job_dict(record: dict) -> dict:
    checkpoints = []
    output_dir = record.get("output_dir")
    if output_dir and os.path.isdir(output_dir):
        steps = sorted(int(d.split("-", 1)[1]) for d in os.listdir(output_dir)
                       if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit())
        checkpoints = [os.path.join(output_dir, f"checkpoint-{step}") for step in steps]
    return {**record, "checkpoints": checkpoints}
