"""`ClusterJob`: what `Deployment.finetune` returns; reads the controller's job table.

Every property is one call to the controller, so it shows where the job is
now: `worker` changes when the job was moved after its worker died, `status`
survives a controller restart (the table is on disk).
"""
from __future__ import annotations

import time

TERMINAL = ("succeeded", "failed", "cancelled")


class ClusterJob:
    def __init__(self, deployment, job_id: str) -> None:
        self._deployment = deployment
        self.job_id = job_id

    def progress(self) -> dict:
        """The job's record: status, worker, step, losses, error, attempts, output_dir, ..."""
        return self._deployment._call("job", self.job_id)

    @property
    def status(self) -> str:
        return self.progress()["status"]

    @property
    def losses(self) -> list[float]:
        return list(self.progress()["losses"])

    @property
    def step(self) -> int:
        return self.progress()["step"]

    @property
    def worker(self) -> str | None:
        return self.progress()["worker"]

    @property
    def error(self) -> str | None:
        return self.progress()["error"]

    @property
    def adapter(self) -> str:
        return self.progress()["adapter"]

    @property
    def output_dir(self) -> str | None:
        return self.progress()["output_dir"]

    def wait(self, timeout: float | None = None, poll_s: float = 0.2) -> str:
        """Block until the job ends (or `timeout` seconds pass); returns the status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status
            if status in TERMINAL or (deadline is not None and time.monotonic() >= deadline):
                return status
            time.sleep(poll_s)

    def cancel(self) -> bool:
        return self._deployment._call("cancel_job", self.job_id)

    def __repr__(self) -> str:
        return f"ClusterJob({self.job_id!r})"
