"""Where inference requests and finetuning jobs go: pure policy, no Ray.

The controller snapshots each worker's load into a `WorkerLoad` and asks the
`Router`. Inference follows Ray Serve's multiplexed LoRA routing: prefer a
worker that already holds the request's adapter (no load, no slot churn)
unless it is overloaded, else balance load by power of two choices.
Finetuning goes to the worker with the most spare token budget under its SLO.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

INFERENCE_ROLES = ("coserve", "inference")
FINETUNE_ROLES = ("coserve", "finetune")
ROLES = ("coserve", "inference", "finetune")


@dataclass(frozen=True)
class WorkerLoad:
    """A snapshot of one worker, as the router sees it."""

    name: str
    role: str
    """"coserve" (inference + finetuning), "inference" (inference only), "finetune" (finetuning only)."""
    healthy: bool
    adapters: frozenset[str]
    """Adapters resident on the worker (loaded in its engine)."""
    queued_tokens: int
    """Tokens of inference requests routed there and not finished (prompt + max_tokens)."""
    finetune_headroom: float
    """Finetuning tokens per iteration the worker can still take under its SLO budget."""
    running_jobs: int
    """Finetuning jobs running there."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"worker {self.name!r}: role must be one of {ROLES}, got {self.role!r}")


class NoWorkerError(RuntimeError):
    """No worker can take the request or job; the message says why."""


class Router:
    """Chooses workers for inference requests and finetuning jobs.

    Inference (healthy "coserve"/"inference" workers):
      1. Adapter affinity: candidates holding `adapter` that are not overloaded,
         i.e. whose queued_tokens are at most the least-loaded candidate's
         queued_tokens + `overload_tokens`. Power of two choices among them.
      2. Otherwise (no such holder, or `adapter` is None: the base model, which
         every worker holds), power of two choices over all candidates.
    Power of two choices: draw two distinct candidates at random and take the
    one with fewer queued_tokens. It avoids herding every request onto the one
    worker that looked least loaded in a stale snapshot.

    Finetuning (healthy "coserve"/"finetune" workers): the requested worker if
    named, else the largest finetune_headroom, then fewer running_jobs, then name.
    """

    def __init__(self, overload_tokens: int = 4096, seed: int | None = None):
        if not isinstance(overload_tokens, int) or isinstance(overload_tokens, bool) or overload_tokens < 0:
            raise ValueError(f"overload_tokens must be an integer >= 0, got {overload_tokens!r}")
        self.overload_tokens = overload_tokens
        self._rng = random.Random(seed)

    def choose_inference_worker(self, adapter: str | None, workers: Sequence[WorkerLoad]) -> str:
        """Returns the name of the worker that should serve a request for `adapter` (None = base model)."""
        candidates = [w for w in workers if w.healthy and w.role in INFERENCE_ROLES]
        if not candidates:
            raise NoWorkerError(_none_healthy(workers, INFERENCE_ROLES, "inference"))
        if adapter is not None:
            limit = min(w.queued_tokens for w in candidates) + self.overload_tokens
            holders = [w for w in candidates if adapter in w.adapters and w.queued_tokens <= limit]
            if holders:
                return self._power_of_two(holders).name
        return self._power_of_two(candidates).name

    def choose_finetune_worker(self, workers: Sequence[WorkerLoad], requested: str | None = None) -> str:
        """Returns the name of the worker that should run a new finetuning job.

        Args:
            requested: a worker name the user asked for; it must exist, be
                healthy and take finetuning, else NoWorkerError.
        """
        if requested is not None:
            named = next((w for w in workers if w.name == requested), None)
            if named is None:
                known = ", ".join(sorted(w.name for w in workers)) or "none"
                raise NoWorkerError(f"no worker named {requested!r}; workers: {known}")
            if not named.healthy:
                raise NoWorkerError(f"worker {requested!r} is unhealthy")
            if named.role not in FINETUNE_ROLES:
                raise NoWorkerError(f"worker {requested!r} has role {named.role!r}, which does not "
                                    f"finetune; use a worker with role {' or '.join(map(repr, FINETUNE_ROLES))}")
            return named.name
        candidates = [w for w in workers if w.healthy and w.role in FINETUNE_ROLES]
        if not candidates:
            raise NoWorkerError(_none_healthy(workers, FINETUNE_ROLES, "finetuning"))
        return min(candidates, key=lambda w: (-w.finetune_headroom, w.running_jobs, w.name)).name

    def _power_of_two(self, candidates: list[WorkerLoad]) -> WorkerLoad:
        if len(candidates) == 1:
            return candidates[0]
        first, second = self._rng.sample(candidates, 2)
        return second if second.queued_tokens < first.queued_tokens else first


def _none_healthy(workers: Sequence[WorkerLoad], roles: tuple[str, ...], what: str) -> str:
    of_role = [w for w in workers if w.role in roles]
    roles_text = " or ".join(map(repr, roles))
    if not of_role:
        return f"no worker takes {what}: none of the {len(workers)} worker(s) has role {roles_text}"
    return f"no healthy worker takes {what}: all {len(of_role)} worker(s) with role {roles_text} are unhealthy"
