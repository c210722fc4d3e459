"""Where a deployment's actors live in Ray: one namespace, names derived from the deployment's name."""
from __future__ import annotations

NAMESPACE = "coserve"


def controller_name(deployment: str) -> str:
    return f"{deployment}:controller"


def worker_actor_name(deployment: str, worker: str) -> str:
    return f"{deployment}:{worker}"
