"""One finetuning job's training state: data plan, trainable adapter, optimizer, progress.

The job knows nothing of iterations: the manager asks it for the sequences of
its current optimizer step (`step_sequences`), reports losses and finished
sequences back, and calls `optimizer_step` once every sequence of the step has
done its backward. The loss of a step is the sum of token losses over all its
target tokens divided by their count; each token's gradient is weighted by
1 / that count (`loss_scale`), so the gradients sum to the step's mean loss.
A job resumed from a checkpoint (`resume_from`) continues exactly where the
one that wrote it stood: same weights, optimizer, schedule and rows.
A driver that must see every step before the next one starts (the Trainer's
callbacks) sets `pause_at_step`: the job then waits, nothing in flight, once
it has done that many steps, until the limit is raised or the job is stopped.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cached_property

import torch

from coserve.config import FinetuneConfig
from coserve.finetune.checkpoint import FORMAT_VERSION, Checkpoint, check_same_job, job_identity, write_checkpoint
from coserve.finetune.dataset import IGNORE_INDEX, TrainingExample, iter_step_batches
from coserve.finetune.optim import build_lr_scheduler, build_optimizer
from coserve.finetune.trainable import TrainableLoRA
from peft_methods.lora.weights import save_adapter

TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


@dataclass
class StepSequence:
    seq_id: str
    token_ids: list[int]
    targets: list[int]
    """targets[i]: the token that must follow token i, IGNORE_INDEX for none."""


class FinetuneJob:
    def __init__(self, job_id: str, config: FinetuneConfig, examples: list[TrainingExample],
                 lora: TrainableLoRA) -> None:
        self.job_id = job_id
        self.config = config
        self.examples = examples
        self.lora = lora
        self._plan = iter_step_batches(len(examples), config.sequences_per_step, config.max_steps,
                                       shuffle=config.shuffle, seed=config.seed)
        self.optimizer = build_optimizer(config, lora.parameters())
        self.lr_scheduler = build_lr_scheduler(config, self.optimizer)
        self.status = "queued"
        self.error: str | None = None
        self.step = 0                      # optimizer steps done
        self.losses: list[float] = []
        self.learning_rates: list[float] = []       # the lr each step used
        self.grad_norms: list[float | None] = []    # global gradient norm before clipping, per step
        self.pause_at_step: int | None = None       # pause once `step` reaches it (None: never)
        self.is_paused = False                      # waiting at pause_at_step, nothing in flight
        self.stop_requested = False                 # finish after the step in flight
        self.stopped_early = False                  # ended by `stop` before max_steps
        self.tokens_trained = 0            # tokens whose forward and backward are done
        self.checkpoints: list[str] = []
        self.resumed_from: str | None = None
        self.created_at = time.time()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.future: Future = Future()     # resolves when the job reaches a terminal status
        self._loss_sum = 0.0
        self._num_targets = 0
        self._outstanding: set[str] = set()
        self._step_waiters: list[tuple[int, Future]] = []   # engine thread only

    @property
    def adapter(self) -> str:
        return self.config.adapter

    @property
    def is_finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    # ---- one optimizer step -------------------------------------------------------------------

    def step_sequences(self) -> tuple[list[StepSequence], float]:
        """The sequences of the current step and the loss weight of one target token."""
        sequences = []
        for i, index in enumerate(next(self._plan)):
            example = self.examples[index]
            targets = list(example.labels[1:]) + [IGNORE_INDEX]
            sequences.append(StepSequence(f"{self.job_id}/s{self.step}/{i}", list(example.input_ids), targets))
        num_targets = sum(sum(t != IGNORE_INDEX for t in seq.targets) for seq in sequences)
        self._outstanding = {seq.seq_id for seq in sequences}
        self._loss_sum, self._num_targets = 0.0, 0
        return sequences, 1.0 / num_targets

    def record_loss(self, loss_sum: float, num_targets: int) -> None:
        self._loss_sum += loss_sum
        self._num_targets += num_targets

    def sequence_done(self, seq_id: str, num_tokens: int) -> bool:
        """Note a finished backward; True when the whole step is done."""
        self._outstanding.discard(seq_id)
        self.tokens_trained += num_tokens
        return not self._outstanding

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule; returns the step's mean loss."""
        params = self.lora.parameters()
        if self.config.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.config.max_grad_norm)
        else:
            # NOTE: the same norm clip_grad_norm_ computes, for the logs only; nothing is scaled.
            grads = [p.grad.detach() for p in params if p.grad is not None]
            grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])) \
                if grads else torch.zeros(())
        self.grad_norms.append(float(grad_norm))
        self.learning_rates.append(float(self.optimizer.param_groups[0]["lr"]))
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._loss_sum / max(1, self._num_targets)
        self.losses.append(loss)
        self.step += 1
        return loss

    @property
    def is_last_step(self) -> bool:
        return self.step >= self.config.max_steps

    @property
    def should_pause(self) -> bool:
        return self.pause_at_step is not None and self.step >= self.pause_at_step

    def step_future(self, step: int) -> Future:
        """Engine thread: a future that resolves (with `progress()`) once `step` steps are done or the job ends."""
        future: Future = Future()
        self._step_waiters.append((step, future))
        self.notify_step_waiters()
        return future

    def notify_step_waiters(self) -> None:
        """Engine thread: resolve the waiters whose step is reached (all of them once the job ended)."""
        if not self._step_waiters:
            return
        ready = [(s, f) for s, f in self._step_waiters if self.is_finished or self.step >= s]
        if not ready:
            return
        self._step_waiters = [(s, f) for s, f in self._step_waiters if not (self.is_finished or self.step >= s)]
        progress = self.progress()
        for _, future in ready:
            if not future.done():
                future.set_result(progress)

    # ---- saving -------------------------------------------------------------------------------

    def save_adapter(self, path: str | os.PathLike) -> None:
        save_adapter(self.lora.to_adapter(), path)

    @cached_property
    def identity(self) -> dict:
        """The data fingerprint and settings a job resuming from this one's checkpoints must share."""
        return job_identity(self.config, self.examples)

    def save_checkpoint(self) -> str:
        """output_dir/checkpoint-<step>/: adapter, optimizer, schedule, data position; written atomically."""
        state = {"format_version": FORMAT_VERSION, "step": self.step, "losses": list(self.losses),
                 "tokens_trained": self.tokens_trained, "checkpoints": list(self.checkpoints),
                 "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                 "param_modules": list(self.lora.params), "identity": self.identity,
                 "learning_rates": list(self.learning_rates), "grad_norms": list(self.grad_norms),
                 # NOTE: kept for inspection only; a resume does not restore it (see resume_from).
                 "rng": torch.get_rng_state()}
        path = write_checkpoint(self.config.output_dir, self.step, self.lora.to_adapter(), state)
        if path not in self.checkpoints:   # a step saved twice (on request, then by save_steps) is one entry
            self.checkpoints.append(path)
        return path

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Continue from `checkpoint`; the job's LoRA must have been built from `checkpoint.adapter`.

        Raises ValueError naming the field in which this job differs from the one that wrote it.
        """
        if self.step != 0:
            raise RuntimeError(f"job {self.job_id} has already trained {self.step} steps; resume a fresh job")
        check_same_job(checkpoint, self.identity)
        state = checkpoint.state
        try:
            # NOTE: the schedule was built first (its constructor rewrites the lr); the optimizer's
            # state brings back the lr of the next step, then the schedule its position.
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        except (ValueError, KeyError, RuntimeError) as exc:
            raise ValueError(f"resume_from_checkpoint: {checkpoint.path}: optimizer or schedule state does not "
                             f"fit this job's parameters ({type(exc).__name__}: {exc})") from exc
        self.step = checkpoint.step
        self.losses = list(state["losses"])
        # NOTE: checkpoints of an older version lack these two; the logs then show None for them.
        self.learning_rates = list(state.get("learning_rates") or [None] * self.step)
        self.grad_norms = list(state.get("grad_norms") or [None] * self.step)
        self.tokens_trained = state["tokens_trained"]
        self.checkpoints = list(state["checkpoints"]) + [checkpoint.path]
        self.resumed_from = checkpoint.path
        # Same seed, same plan: drop the batches of the steps already done, so step k uses the rows
        # an uninterrupted run would (epoch boundaries included). The global torch RNG is not restored:
        # training draws nothing from it (no dropout; rows and init use their own seeded generators),
        # and inference sampling shares it.
        for _ in range(self.step):
            next(self._plan)

    def progress(self) -> dict:
        return {"job_id": self.job_id, "adapter": self.adapter, "status": self.status, "error": self.error,
                "step": self.step, "max_steps": self.config.max_steps, "losses": list(self.losses),
                "last_loss": self.losses[-1] if self.losses else None, "tokens_trained": self.tokens_trained,
                "checkpoints": list(self.checkpoints), "resumed_from": self.resumed_from,
                "learning_rates": list(self.learning_rates), "grad_norms": list(self.grad_norms),
                "num_examples": len(self.examples), "sequences_per_step": self.config.sequences_per_step,
                "paused": self.is_paused, "pause_at_step": self.pause_at_step, "stopped_early": self.stopped_early,
                "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at}
