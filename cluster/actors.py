"""The Ray actor around `EngineWorker`: picks the device Ray assigned and the thread count.

Everything else is `EngineWorker` unchanged. The actor is threaded
(`max_concurrency`) so many `generate` calls wait at once and are batched by
the engine, while pings and load reports answer between iterations.
"""
from __future__ import annotations

import ray

from cluster.worker import EngineWorker

WORKER_MAX_CONCURRENCY = 256


class WorkerActor(EngineWorker):
    def __init__(self, name: str, model: str, role: str, num_threads: int, engine_kwargs: dict) -> None:
        import torch

        engine_kwargs = dict(engine_kwargs)
        gpu_ids = ray.get_gpu_ids()
        if gpu_ids and torch.cuda.is_available():
            # Ray sets CUDA_VISIBLE_DEVICES, so the assigned GPU is cuda:0 in here.
            engine_kwargs["device"] = "cuda"
            label = f"cuda (Ray GPU {','.join(str(g) for g in gpu_ids)})"
        else:
            if engine_kwargs.get("device", "auto") == "auto":
                engine_kwargs["device"] = "cpu"
            label = f"{engine_kwargs['device']} ({num_threads} threads"
            label += f", Ray GPU {','.join(str(g) for g in gpu_ids)})" if gpu_ids else ")"
        super().__init__(name, model, role=role, device_label=label,
                         num_threads=None if engine_kwargs["device"] == "cuda" else num_threads, **engine_kwargs)


RemoteWorker = ray.remote(max_concurrency=WORKER_MAX_CONCURRENCY)(WorkerActor)
