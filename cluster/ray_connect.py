"""Joining Ray: an embedded local instance, or an existing cluster that must answer.

`ray.init(address=...)` on an address where nothing listens retries for a long
time; a plain TCP check first turns that into a prompt, clear error.
"""
from __future__ import annotations

import socket

import ray

_CONNECT_TIMEOUT_S = 5.0


def connect_ray(address: str | None, allow_existing: bool = True) -> bool:
    """Make sure this process is connected to Ray; True if this call started a local instance."""
    if ray.is_initialized():
        return False
    if address is None:
        # "local": a new instance, never one that RAY_ADDRESS or a running head would make ray.init join.
        ray.init(address="local", include_dashboard=False, logging_level="WARNING")
        return True
    if address != "auto" and not address.startswith("ray://"):
        _check_answers(address)
    try:
        ray.init(address=address, logging_level="WARNING")
    except ConnectionError as exc:
        raise ConnectionError(f"no Ray cluster answers at {address!r} (start one with `ray start --head`, "
                              f"or leave the address out for a local one): {exc}") from None
    return False


def _check_answers(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address must be 'auto', 'host:port' or 'ray://host:port', got {address!r}")
    try:
        with socket.create_connection((host, int(port)), timeout=_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise ConnectionError(f"the Ray cluster at {address!r} does not answer: {exc}") from None
