"""Runs finetuning jobs inside the engine: admission, per-iteration bookkeeping, steps, saving.

`prepare` turns a FinetuneConfig into a ready `FinetuneJob` (data read and
tokenized, adapter initialized or restored from a checkpoint, every check
done) and may run on any thread.
Everything else runs on the engine's thread between iterations: `submit`
registers the adapter for serving and hands the first step's sequences to the
scheduler; `after_iteration` books losses and finished backwards, steps the
optimizer when a step is complete, pushes the new weights to the serving slot
and writes checkpoints. A job that fails or is cancelled frees its KV blocks
and buffers and fails alone. A job may pause between steps (`pause_at_step`,
raised by `continue_job`) and be stopped gracefully (`stop`: after the step in
flight, saved like a finished job). `eval_batch` runs a forward-only loss of an
adapter on whole sequences, on a private KV cache, between iterations.
"""
from __future__ import annotations

import itertools
import logging
import os
import time

import torch
import torch.nn.functional as F

from coserve.config import FinetuneConfig
from coserve.engine.adapter_manager import AdapterManager
from coserve.engine.finetune_planner import FinetunePlanner
from coserve.engine.outputs import RunnerOutput, SchedulerOutput
from coserve.engine.training_sequence import BackwardWindow, TrainingSequence
from coserve.finetune.checkpoint import Checkpoint, load_checkpoint, resume_path
from coserve.finetune.dataset import IGNORE_INDEX, TrainingExample, load_rows, tokenize_rows
from coserve.finetune.executor import FinetuneExecutor
from coserve.finetune.job import FinetuneJob
from coserve.finetune.peft_config import lora_config_from_peft
from coserve.finetune.trainable import TrainableLoRA
from coserve.models.attention import allocate_kv_cache, build_attention_metadata
from coserve.models.llama import head_dim_of
from peft_methods.lora.layer import LoRABatch
from peft_methods.lora.weights import load_adapter

logger = logging.getLogger(__name__)
_job_counter = itertools.count()
_MAX_LOGIT_ELEMENTS = 1 << 24   # as in finetune/loss.py: no [tokens, vocab] matrix beyond ~64 MB of fp32


class FinetuneManager:
    def __init__(self, model, tokenizer, adapters: AdapterManager, planner: FinetunePlanner,
                 executor: FinetuneExecutor, max_model_len: int, kv_bytes_per_block: int, block_size: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.planner = planner
        self.executor = executor
        self.max_model_len = max_model_len
        self.kv_bytes_per_block = kv_bytes_per_block
        self.block_size = block_size
        self.jobs: dict[str, FinetuneJob] = {}
        self.saved_bytes_per_token: float | None = None   # measured at a sequence's first backward window
        self._measured_seq: str | None = None

    # ---- creating jobs ------------------------------------------------------------------------

    def prepare(self, config: FinetuneConfig) -> FinetuneJob:
        """Build a job from its config; raises ValueError (DatasetError, AdapterLoadError) on bad input."""
        if not isinstance(config, FinetuneConfig):
            raise TypeError(f"expected a FinetuneConfig, got {type(config).__name__}")
        self._check_name_free(config.adapter)
        if config.max_seq_len > self.max_model_len:
            raise ValueError(f"max_seq_len {config.max_seq_len} is longer than the model's maximum length "
                             f"{self.max_model_len}")
        if config.save_steps is not None and config.output_dir is None:
            raise ValueError("save_steps needs output_dir: checkpoints are written to output_dir/checkpoint-<step>/")
        # A bad checkpoint fails before the dataset is read.
        path = resume_path(config)
        checkpoint = load_checkpoint(path) if path is not None else None
        lora = self._resumed_lora(config, checkpoint) if checkpoint is not None else self._initial_lora(config)
        rows = load_rows(config.dataset)
        source = config.dataset if isinstance(config.dataset, (str, os.PathLike)) else "dataset"
        examples = tokenize_rows(rows, self.tokenizer, config.max_seq_len, packing=config.packing,
                                 vocab_size=self.model.config.vocab_size, source_name=str(source))
        job = FinetuneJob(f"ftjob-{next(_job_counter)}", config, examples, lora)
        if checkpoint is not None:
            job.resume_from(checkpoint)
        return job

    def _resumed_lora(self, config: FinetuneConfig, checkpoint: Checkpoint) -> TrainableLoRA:
        if config.peft is not None or config.init_adapter is not None:
            logger.info("resume_from_checkpoint given: the checkpoint's LoRA config and weights are used, "
                        "peft and init_adapter are ignored")
        self.adapters.validate(checkpoint.adapter, source=checkpoint.path)
        return TrainableLoRA.from_adapter(checkpoint.adapter, self.model.lm_head.weight.device)

    def _initial_lora(self, config: FinetuneConfig) -> TrainableLoRA:
        device = self.model.lm_head.weight.device
        if config.init_adapter is not None:
            adapter = load_adapter(config.init_adapter)
            if config.peft is not None:
                logger.info("init_adapter given: its own LoRA config is used, the peft argument is ignored")
            self.adapters.validate(adapter, source=str(config.init_adapter))
            return TrainableLoRA.from_adapter(adapter, device)
        lora_config = lora_config_from_peft(config.peft)
        lora = TrainableLoRA.initialize(lora_config, self.adapters.layers, config.seed, device)
        self.adapters.validate(lora.to_adapter(), source=f"LoRA config of {config.adapter!r}")
        return lora

    def _check_name_free(self, name: str) -> None:
        if self.adapters.has(name):
            raise ValueError(f"adapter name {name!r} is already in use; pick another name or unload it first")
        for job in self.jobs.values():
            if job.adapter == name and not job.is_finished:
                raise ValueError(f"adapter name {name!r} is being trained by job {job.job_id}")

    def submit(self, job: FinetuneJob) -> FinetuneJob:
        """Engine thread: register the adapter for serving and queue the first step."""
        self._check_name_free(job.adapter)
        self.adapters.register_weights(job.adapter, job.lora.to_adapter())
        self.jobs[job.job_id] = job
        self.planner.add_job(job.job_id, job.adapter, max_in_flight=job.config.batch_size)
        job.status, job.started_at = "running", time.time()
        logger.info("finetuning job %s started: adapter %r, %d examples, %d steps%s", job.job_id, job.adapter,
                    len(job.examples), job.config.max_steps,
                    f", resumed at step {job.step} from {job.resumed_from}" if job.resumed_from else "")
        try:
            if job.is_last_step:
                # Resumed from the checkpoint of its last step: nothing left to train.
                self._succeed(job)
            else:
                self._next_step(job)
        except Exception as exc:
            self.fail(job.job_id, f"{type(exc).__name__}: {exc}")
        job.notify_step_waiters()
        return job

    def _next_step(self, job: FinetuneJob) -> None:
        """After a step (or at submit): stop, pause at the job's limit, or queue the next step."""
        if job.stop_requested:
            job.stopped_early = True
            logger.info("job %s stopped after step %d/%d", job.job_id, job.step, job.config.max_steps)
            self._succeed(job)
        elif job.should_pause:
            job.is_paused = True
        else:
            job.is_paused = False
            self._start_step(job)

    def _start_step(self, job: FinetuneJob) -> None:
        sequences, loss_scale = job.step_sequences()
        for seq in sequences:
            self.executor.register(seq.seq_id, seq.targets, job.lora, loss_scale, job_id=job.job_id)
        self.planner.add_sequences(job.job_id, [TrainingSequence(s.seq_id, job.job_id, job.adapter, s.token_ids)
                                                for s in sequences])

    # ---- per iteration ------------------------------------------------------------------------

    def run_backward(self, windows: list[BackwardWindow]) -> None:
        """Run the iteration's backward windows; a failure fails that window's job only."""
        for window in windows:
            job_id = self.executor.job_of(window.seq_id)
            job = self.jobs.get(job_id) if job_id is not None else None
            if job is None or job.is_finished:
                continue
            seq = self.planner.sequences.get(window.seq_id)
            try:
                self.executor.backward(window.seq_id, window.start, window.end, window.block_ids,
                                       window.layer_start, window.layer_end, window.resume_cut, window.stop_cut)
                if seq is not None and window.end == seq.length:
                    # The first window allocated the accumulators (and its token cuts grow them):
                    # the sequence's peak is reached during it.
                    self._measure_saved_bytes(window.seq_id, seq.length)
            except Exception as exc:
                logger.exception("backward failed in job %s", job_id)
                self.fail(job_id, f"backward failed: {type(exc).__name__}: {exc}")

    def after_iteration(self, output: SchedulerOutput, runner_output: RunnerOutput) -> None:
        for chunk in output.sequences:
            if not chunk.is_training:
                continue
            job = self.jobs.get(self.executor.job_of(chunk.request_id) or "")
            loss = runner_output.training_losses.get(chunk.request_id)
            if job is not None and loss is not None:
                job.record_loss(*loss)
        for seq in self.planner.pop_completed():
            self.executor.release(seq.seq_id)
            job = self.jobs.get(seq.job_id)
            if job is None or job.is_finished:
                continue
            if job.sequence_done(seq.seq_id, seq.length):
                self._finish_step(job)

    def _measure_saved_bytes(self, seq_id: str, length: int) -> None:
        """Bytes kept for this sequence's backward (buffers + its KV blocks) per token."""
        buffer_bytes = self.executor.sequence_bytes(seq_id)
        kv_bytes = self.planner.block_manager.num_blocks_needed(length) * self.kv_bytes_per_block
        per_token = (buffer_bytes + kv_bytes) / length
        if seq_id == self._measured_seq:   # a later piece of the same first window: keep the peak
            per_token = max(per_token, self.saved_bytes_per_token)
        self.saved_bytes_per_token, self._measured_seq = per_token, seq_id

    def _finish_step(self, job: FinetuneJob) -> None:
        try:
            loss = job.optimizer_step()
            self.adapters.update_weights(job.adapter, job.lora.to_adapter())
            if job.config.save_steps and job.step % job.config.save_steps == 0:
                job.save_checkpoint()
            logger.info("job %s step %d/%d loss %.4f", job.job_id, job.step, job.config.max_steps, loss)
            if job.is_last_step:
                self._succeed(job)
            else:
                self._next_step(job)
        except Exception as exc:
            logger.exception("job %s failed after step %d", job.job_id, job.step)
            self.fail(job.job_id, f"{type(exc).__name__}: {exc}")
        job.notify_step_waiters()

    def _succeed(self, job: FinetuneJob) -> None:
        if job.config.output_dir is not None:
            job.save_adapter(job.config.output_dir)
        self.planner.remove_job(job.job_id)
        self._end(job, "succeeded")

    # ---- driving a job step by step -----------------------------------------------------------

    def continue_job(self, job_id: str, pause_at_step: int | None) -> bool:
        """Let a job run until it has done `pause_at_step` steps (None: to the end); False if it ended."""
        job = self._job(job_id)
        if job.is_finished:
            return False
        job.pause_at_step = pause_at_step
        if job.is_paused and not job.should_pause:
            try:
                self._next_step(job)
            except Exception as exc:
                self.fail(job.job_id, f"{type(exc).__name__}: {exc}")
        return True

    def stop(self, job_id: str) -> bool:
        """End a job gracefully after the step in flight (at once if paused), saved as if finished.

        Its status becomes "succeeded" with `stopped_early`; False if the job had already ended.
        """
        job = self._job(job_id)
        if job.is_finished:
            return False
        job.stop_requested = True
        if job.is_paused:
            job.is_paused = False
            try:
                self._next_step(job)
            except Exception as exc:   # e.g. the final adapter could not be written
                self.fail(job.job_id, f"{type(exc).__name__}: {exc}")
            job.notify_step_waiters()
        return True

    def save_checkpoint(self, job_id: str) -> str:
        """Write output_dir/checkpoint-<step>/ now. The state saved is the one after the last optimizer
        step (gradients of a step in flight are not part of it), so any moment between iterations works."""
        job = self._job(job_id)
        if job.status not in ("running", "succeeded"):
            raise ValueError(f"job {job_id} is {job.status}; only a running or finished job can be checkpointed")
        if job.config.output_dir is None:
            raise ValueError(f"job {job_id} has no output_dir to write a checkpoint to")
        return job.save_checkpoint()

    def step_future(self, job_id: str, step: int):
        """A future resolved with the job's progress once it has done `step` steps or ended."""
        return self._job(job_id).step_future(step)

    def _job(self, job_id: str) -> FinetuneJob:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise KeyError(f"no finetuning job {job_id!r}") from None

    # ---- evaluation ---------------------------------------------------------------------------

    def prepare_eval(self, dataset, max_seq_len: int, packing: bool = False) -> list[TrainingExample]:
        """Read and tokenize evaluation data exactly as training data (any thread)."""
        if max_seq_len > self.max_model_len:
            raise ValueError(f"max_seq_len {max_seq_len} is longer than the model's maximum length "
                             f"{self.max_model_len}")
        source = dataset if isinstance(dataset, (str, os.PathLike)) else "eval dataset"
        return tokenize_rows(load_rows(dataset), self.tokenizer, max_seq_len, packing=packing,
                             vocab_size=self.model.config.vocab_size, source_name=str(source))

    @torch.no_grad()
    def eval_batch(self, adapter: str | None, examples: list[TrainingExample]) -> tuple[float, int]:
        """Engine thread: (sum of token losses, number of target tokens) of `adapter` on whole examples.

        The loss is the training loss without its backward: token i predicts labels[i + 1]. The
        sequences run in one forward on their own KV cache, so no running request is disturbed.
        """
        cfg = self.model.config
        device = self.model.lm_head.weight.device
        slot = self.adapters.activate({adapter})[adapter] if adapter is not None else -1
        num_blocks = [self.planner.block_manager.num_blocks_needed(len(e.input_ids)) for e in examples]
        caches = allocate_kv_cache(cfg.num_hidden_layers, sum(num_blocks), self.block_size,
                                   cfg.num_key_value_heads, head_dim_of(cfg), self.executor.dtype, device)
        input_ids, positions, targets, seqs, first_block = [], [], [], [], 0
        for example, blocks in zip(examples, num_blocks):
            n = len(example.input_ids)
            input_ids += example.input_ids
            positions += range(n)
            targets += list(example.labels[1:]) + [IGNORE_INDEX]
            seqs.append((0, n, list(range(first_block, first_block + blocks))))
            first_block += blocks
        meta = build_attention_metadata(seqs, self.block_size, self.model.sliding_window, device)
        with self.adapters.context.use(LoRABatch.from_slots([slot] * len(input_ids), device)):
            hidden = self.model(torch.tensor(input_ids, device=device), torch.tensor(positions, device=device),
                                caches, meta)                                         # [tokens, hidden], normed
        targets_t = torch.tensor(targets, dtype=torch.long, device=device)
        loss_sum, rows = 0.0, max(1, _MAX_LOGIT_ELEMENTS // cfg.vocab_size)
        for start in range(0, hidden.shape[0], rows):
            logits = self.model.compute_logits(hidden[start:start + rows])               # [rows, vocab]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss_sum += float(F.cross_entropy(logits, targets_t[start:start + rows], ignore_index=IGNORE_INDEX,
                                              reduction="sum"))
        return loss_sum, sum(1 for t in targets if t != IGNORE_INDEX)

    # ---- ending jobs --------------------------------------------------------------------------

    def cancel(self, job_id: str) -> bool:
        job = self.jobs.get(job_id)
        if job is None or job.is_finished:
            return False
        self._drop(job)
        self._end(job, "cancelled")
        return True

    def fail(self, job_id: str, error: str) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.is_finished:
            return
        job.error = error
        self._drop(job)
        self._end(job, "failed")

    def fail_sequences(self, seq_ids: list[str], error: str) -> None:
        """The iteration holding these training chunks failed: fail their jobs."""
        for job_id in {self.executor.job_of(s) for s in seq_ids} - {None}:
            self.fail(job_id, error)

    def _drop(self, job: FinetuneJob) -> None:
        """Free the job's KV blocks, buffers and (when nobody uses it) its serving adapter."""
        for seq_id in self.planner.remove_job(job.job_id):
            self.executor.release(seq_id)
        self.executor.release_job(job.job_id)
        job.optimizer.zero_grad(set_to_none=True)
        try:
            self.adapters.unregister(job.adapter)
        except Exception:  # still served to running requests; it stays loaded at its last weights
            logger.info("adapter %r of job %s kept loaded", job.adapter, job.job_id)

    def _end(self, job: FinetuneJob, status: str) -> None:
        job.status, job.finished_at = status, time.time()
        job.is_paused = False
        if not job.future.done():
            job.future.set_result(job)
        job.notify_step_waiters()

    def stats(self) -> dict:
        return {"jobs": {job_id: job.progress() for job_id, job in self.jobs.items()},
                "num_sequences_in_flight": self.planner.num_in_flight(),
                "held_bytes": self.executor.held_bytes(),
                "saved_bytes_per_token": self.saved_bytes_per_token}
