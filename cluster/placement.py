"""Which worker actors a deployment runs and what Ray resources each one takes.

Co-serving (`mode="coserve"`): one worker per device share, doing inference
and finetuning in the same iterations. Spatial sharing (`mode="spatial"`): per
device share, an inference-only and a finetuning-only worker, each with half
of it. On a GPU cluster a share is `gpus_per_worker` GPUs (a fraction puts
several workers on one GPU); on CPU it is `cpus_per_worker` CPUs, which also
sets the worker's torch thread count.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.errors import PlacementError

MODES = ("coserve", "spatial")


@dataclass(frozen=True)
class WorkerSpec:
    name: str
    role: str            # "coserve" | "inference" | "finetune"
    device_index: int    # the device share it belongs to (both spatial halves share one)
    num_cpus: float
    num_gpus: float

    @property
    def num_threads(self) -> int:
        """torch threads on CPU: the CPUs Ray reserved for it, at least one."""
        return max(1, int(self.num_cpus))

    def actor_options(self) -> dict:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}


def plan_workers(num_workers: int, mode: str, cluster_resources: dict, *, use_gpu: bool | None = None,
                 gpus_per_worker: float = 1.0, cpus_per_worker: float = 1.0) -> list[WorkerSpec]:
    """The worker specs, or PlacementError when the cluster cannot hold them all."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not isinstance(num_workers, int) or isinstance(num_workers, bool) or num_workers < 1:
        raise ValueError(f"num_workers must be a positive integer, got {num_workers!r}")
    total_gpus = float(cluster_resources.get("GPU", 0.0))
    total_cpus = float(cluster_resources.get("CPU", 0.0))
    if use_gpu is None:
        use_gpu = total_gpus > 0
    share = gpus_per_worker if use_gpu else cpus_per_worker
    if not share > 0:
        raise ValueError(f"{'gpus' if use_gpu else 'cpus'}_per_worker must be positive, got {share!r}")
    needed = num_workers * share
    kind, available = ("GPU", total_gpus) if use_gpu else ("CPU", total_cpus)
    if needed > available + 1e-9:
        raise PlacementError(
            f"{num_workers} worker(s) with {share:g} {kind} each need {needed:g} {kind}s, but the Ray cluster "
            f"has {available:g}; use fewer workers or a smaller {kind.lower()}s_per_worker")

    def spec(name: str, role: str, index: int, fraction: float) -> WorkerSpec:
        if use_gpu:
            return WorkerSpec(name, role, index, num_cpus=0.0, num_gpus=gpus_per_worker * fraction)
        return WorkerSpec(name, role, index, num_cpus=cpus_per_worker * fraction, num_gpus=0.0)

    if mode == "coserve":
        return [spec(f"worker-{i}", "coserve", i, 1.0) for i in range(num_workers)]
    return [s for i in range(num_workers)
            for s in (spec(f"worker-{i}-inference", "inference", i, 0.5),
                      spec(f"worker-{i}-finetune", "finetune", i, 0.5))]


def shortfall(specs: list[WorkerSpec], free: dict) -> dict[str, float]:
    """What the workers need beyond the cluster's free resources now: {"CPU": 1.0} etc., {} when they fit.

    Ray would keep such workers pending forever; the caller turns a lasting shortfall into an error.
    """
    need = {"CPU": sum(s.num_cpus for s in specs), "GPU": sum(s.num_gpus for s in specs)}
    return {kind: amount - float(free.get(kind, 0.0)) for kind, amount in need.items()
            if amount > float(free.get(kind, 0.0)) + 1e-9}
