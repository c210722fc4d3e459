"""Where a `Trainer` trains: one small interface over a local `LLM` and a cluster `Deployment`.

Both run the job co-served, in the iterations of engines that keep serving
inference. A job is driven step by step: it is submitted paused, and the
trainer lets it run one optimizer step at a time (`continue_to`) after
handling the callbacks of the previous one (`wait_step`). `coserve` never
imports `cluster` (dependencies point one way), so a Deployment is
recognised by its methods.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

WAIT_STEP_S = 5.0   # one long poll; the trainer polls again, so Ctrl-C and lost workers are noticed


class LLMClient:
    """A local `coserve.LLM`; the trainer's thread drives the engine while it waits."""

    kind = "local"

    def __init__(self, llm, owned: bool = False) -> None:
        self.llm = llm
        self.owned = owned
        self.tokenizer = llm.tokenizer

    @classmethod
    def start(cls, model: str | os.PathLike, **engine_kwargs) -> "LLMClient":
        from coserve.llm import LLM

        return cls(LLM(model=os.fspath(model), **engine_kwargs), owned=True)

    def submit(self, config, pause_at_step: int | None):
        return self.llm.finetune(config, pause_at_step=pause_at_step)

    def job_id(self, job) -> str:
        return job.job_id

    def wait_step(self, job, step: int) -> dict:
        return job.wait_step(step, timeout=WAIT_STEP_S)

    def continue_to(self, job, pause_at_step: int | None) -> bool:
        return job.continue_to(pause_at_step)

    def stop(self, job) -> bool:
        return job.stop()

    def checkpoint(self, job) -> str:
        return job.save_checkpoint()

    def evaluate(self, dataset, adapter: str | None, max_seq_len: int, packing: bool) -> dict:
        return self.llm.evaluate(dataset, adapter, max_seq_len=max_seq_len, packing=packing)

    def list_adapters(self) -> list[str]:
        return self.llm.list_adapters()

    def unload_adapter(self, name: str) -> None:
        self.llm.unload_adapter(name)

    def save_adapter(self, name: str, path: str) -> None:
        self.llm.save_adapter(name, path)

    def close(self) -> None:
        if self.owned:
            self.llm.shutdown()


class DeploymentClient:
    """A `cluster.Deployment`: calls go through its controller to the job's worker.

    output_dir must be a path every worker can write (a shared filesystem beyond one machine).
    """

    kind = "cluster"

    def __init__(self, deployment) -> None:
        self.deployment = deployment
        self._tokenizer = None

    @property
    def tokenizer(self):
        """Loaded on first use from the deployment's model (only to count packed examples)."""
        if self._tokenizer is None:
            from coserve.models import load_tokenizer, resolve_checkpoint

            self._tokenizer = load_tokenizer(resolve_checkpoint(self.deployment.stats()["model"]))
        return self._tokenizer

    def submit(self, config, pause_at_step: int | None):
        if not isinstance(config.dataset, (str, os.PathLike, list)):
            # NOTE: rows, not a datasets.Dataset, travel to the workers (Deployment reads paths itself).
            import dataclasses

            from coserve.finetune.dataset import load_rows

            config = dataclasses.replace(config, dataset=load_rows(config.dataset))
        return self.deployment.finetune(config, pause_at_step=pause_at_step).job_id

    def job_id(self, job) -> str:
        return job

    def wait_step(self, job, step: int) -> dict:
        return self.deployment.wait_job_step(job, step, WAIT_STEP_S)

    def continue_to(self, job, pause_at_step: int | None) -> bool:
        return self.deployment.continue_job(job, pause_at_step)

    def stop(self, job) -> bool:
        return self.deployment.stop_job(job)

    def checkpoint(self, job) -> str:
        return self.deployment.checkpoint_job(job)

    def evaluate(self, dataset, adapter: str | None, max_seq_len: int, packing: bool) -> dict:
        return self.deployment.evaluate(dataset, adapter, max_seq_len=max_seq_len, packing=packing)

    def list_adapters(self) -> list[str]:
        return self.deployment.list_adapters()

    def unload_adapter(self, name: str) -> None:
        self.deployment.unload_adapter(name)

    def save_adapter(self, name: str, path: str) -> None:
        self.deployment.save_adapter(name, path)

    def close(self) -> None:
        """The deployment belongs to whoever started it; the trainer leaves it running."""


def connect(model, engine_kwargs: dict):
    """The client for `model`: an LLM, a Deployment, or a model path (a local LLM is started)."""
    from coserve.llm import LLM

    if isinstance(model, LLM):
        return LLMClient(model)
    if all(hasattr(model, m) for m in ("finetune", "wait_job_step", "continue_job", "evaluate")):
        return DeploymentClient(model)
    if isinstance(model, (str, os.PathLike)):
        return LLMClient.start(model, **engine_kwargs)
    raise TypeError(f"model must be a model path, a coserve.LLM or a cluster.Deployment, got {type(model).__name__}")
