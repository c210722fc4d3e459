"""What every route reaches through `request.app.state.coserve`: backend, settings, metrics, stores."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import Request

ADAPTER_PATHS = "adapter_paths"


@dataclass
class ServerState:
    backend: object
    """A `LocalBackend` or `ClusterBackend` (coserve/api/backend.py); its calls block: run them in a thread."""
    settings: object
    """`ServerSettings`."""
    extras: dict = field(default_factory=dict)
    """Per-feature state (metrics, file store, fine-tuning job table, ...), keyed by feature name.

    `extras["adapter_paths"]`: adapter name -> directory it was loaded from (command line, HTTP, or a
    fine-tuning job's output dir); `/v1/models` shows it as the adapter's `root`. Created here so every
    feature writes into the same dict whatever order their `setup` runs in.
    """
    started_at: int = field(default_factory=lambda: int(time.time()))
    """Unix time the app was created (the `created` of models with no better date)."""

    def __post_init__(self) -> None:
        self.extras.setdefault(ADAPTER_PATHS, {})

    @property
    def adapter_paths(self) -> dict[str, str]:
        return self.extras[ADAPTER_PATHS]


def get_state(request: Request) -> ServerState:
    return request.app.state.coserve
