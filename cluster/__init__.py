"""Ray actors that share devices between inference and token-level finetuning.

`Deployment` starts (or connects to) a controller actor and one engine worker
actor per device share; see `cluster.deployment`. The plain `EngineWorker`
class runs without Ray (tests, single process).
"""
from __future__ import annotations

__all__ = ["Deployment", "ClusterJob", "EngineWorker", "WorkerLostError", "DeploymentNotFoundError",
           "PlacementError", "load_job_config"]


def __getattr__(name: str):
    # Lazy: importing `cluster` must not import Ray or torch until something is used.
    if name == "Deployment":
        from cluster.deployment import Deployment
        return Deployment
    if name == "ClusterJob":
        from cluster.job_handle import ClusterJob
        return ClusterJob
    if name == "EngineWorker":
        from cluster.worker import EngineWorker
        return EngineWorker
    if name == "load_job_config":
        from cluster.job_config import load_job_config
        return load_job_config
    if name in ("WorkerLostError", "DeploymentNotFoundError", "PlacementError"):
        from cluster import errors
        return getattr(errors, name)
    raise AttributeError(f"module 'cluster' has no attribute {name!r}")
