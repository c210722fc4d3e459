"""`FinetuneJobHandle`: what `LLM.finetune` returns; safe to use from any thread.

Reads of status, losses and progress are plain attribute reads of the job
(updated by the engine thread between iterations). `wait` blocks until the job
ends, stepping the engine meanwhile if no other thread does; `cancel` runs
between iterations and frees the job's KV blocks and buffers. A driver that
handles every step before the next (the Trainer) uses `wait_step`,
`continue_to` and `stop` (see `FinetuneJob.pause_at_step`).
"""
from __future__ import annotations

from coserve.finetune.job import FinetuneJob


class FinetuneJobHandle:
    def __init__(self, job: FinetuneJob, loop) -> None:
        self._job = job
        self._loop = loop

    @property
    def job_id(self) -> str:
        return self._job.job_id

    @property
    def adapter(self) -> str:
        return self._job.adapter

    @property
    def status(self) -> str:
        """"queued" | "running" | "succeeded" | "failed" | "cancelled"."""
        return self._job.status

    @property
    def error(self) -> str | None:
        return self._job.error

    @property
    def losses(self) -> list[float]:
        """One mean loss per optimizer step done so far."""
        return list(self._job.losses)

    @property
    def step(self) -> int:
        return self._job.step

    @property
    def tokens_trained(self) -> int:
        return self._job.tokens_trained

    @property
    def output_dir(self) -> str | None:
        return self._job.config.output_dir

    def progress(self) -> dict:
        return self._job.progress()

    def wait(self, timeout: float | None = None) -> str:
        """Block until the job ends (or `timeout` seconds pass); returns the status."""
        try:
            self._loop.wait(self._job.future, timeout=timeout)
        except TimeoutError:
            pass
        return self._job.status

    def cancel(self) -> bool:
        """Stop the job; False if it had already ended."""
        return self._loop.call(lambda: self._loop.engine.cancel_finetune_job(self._job.job_id))

    # ---- step by step ----------------------------------------------------------------------------

    def wait_step(self, step: int, timeout: float | None = None) -> dict:
        """Block until the job has done `step` optimizer steps or ended (or `timeout` passes); returns progress()."""
        manager = self._loop.engine.finetune
        future = self._loop.call(lambda: manager.step_future(self._job.job_id, step))
        try:
            return self._loop.wait(future, timeout=timeout)
        except TimeoutError:
            return self._loop.call(self._job.progress)

    def continue_to(self, pause_at_step: int | None) -> bool:
        """Let the job run until it has done `pause_at_step` steps, then pause; None = run to the end."""
        manager = self._loop.engine.finetune
        return self._loop.call(lambda: manager.continue_job(self._job.job_id, pause_at_step))

    def stop(self) -> bool:
        """End the job after the step in flight (at once when paused), saving its adapter to output_dir as a
        finished job does; its status becomes "succeeded" with progress()["stopped_early"]. False if it had ended."""
        manager = self._loop.engine.finetune
        return self._loop.call(lambda: manager.stop(self._job.job_id))

    def save_checkpoint(self) -> str:
        """Write output_dir/checkpoint-<step>/ now (the state after the last optimizer step); returns its path."""
        manager = self._loop.engine.finetune
        return self._loop.call(lambda: manager.save_checkpoint(self._job.job_id))

    def __repr__(self) -> str:
        return f"FinetuneJobHandle({self.job_id!r}, adapter={self.adapter!r}, status={self.status!r}, step={self.step})"
