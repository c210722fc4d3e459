"""Errors a deployment raises, each naming what went wrong."""
from __future__ import annotations


class WorkerLostError(RuntimeError):
    """Requests could not finish because their worker died and no retry succeeded in time."""


class DeploymentNotFoundError(ValueError):
    """No deployment of that name runs on the Ray cluster."""


class PlacementError(ValueError):
    """The Ray cluster lacks the devices or CPUs the deployment asks for."""
