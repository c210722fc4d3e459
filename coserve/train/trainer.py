"""`Trainer`: Hugging Face's Trainer API over a co-served finetuning job.

The training itself runs in the engine, next to inference (an `LLM` or a
`Deployment` you pass, or a local `LLM` started from a model path). The
Trainer drives the job one optimizer step at a time: the job pauses after
each step until the step's callbacks have run (`on_step_end`, then logging,
evaluation and saving as transformers orders them), so a callback that sets
`control.should_training_stop` stops training after exactly that step. The
per-step pause costs one wake-up of the trainer's thread per step; inference
is never paused.
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from pathlib import Path

from coserve.train.arguments import TrainingArguments
from coserve.train.callbacks import (
    CallbackHandler,
    DefaultFlowCallback,
    TrainerControl,
    TrainerState,
    TrainOutput,
)
from coserve.train.engine_client import connect

logger = logging.getLogger(__name__)

TRAINER_STATE_NAME = "trainer_state.json"
_FAILED = ("failed", "cancelled")


class Trainer:
    """Finetune a LoRA adapter in a serving engine, with transformers' Trainer interface.

    Args:
        model: a model path (a local LLM is started and shut down by `close()`), a `coserve.LLM`, or a
            `cluster.Deployment` (both are shared with inference and left running).
        args: the training settings (`TrainingArguments`).
        train_dataset, eval_dataset: a .jsonl/.json/.csv/.parquet path, a `datasets.Dataset` or a list of
            rows, in any format `FinetuneConfig.dataset` accepts ("text", "prompt"/"completion",
            "messages", "input_ids").
        peft_config: a `peft.LoraConfig` (lora_dropout must be 0).
        callbacks: TrainerCallback instances or classes, called after the built-in DefaultFlowCallback.
        adapter_name: the name the adapter is trained and served under; default: the last component
            of args.output_dir (e.g. "out" for "runs/out").
        engine_kwargs: EngineConfig fields for the LLM started from a model path.
        processing_class: ignored (the engine tokenizes with the model's own tokenizer).
    """

    def __init__(self, model, args: TrainingArguments | None = None, train_dataset=None, eval_dataset=None,
                 peft_config=None, callbacks=None, *, adapter_name: str | None = None,
                 engine_kwargs: dict | None = None, processing_class=None, data_collator=None,
                 compute_metrics=None, optimizers=(None, None)) -> None:
        if data_collator is not None or compute_metrics is not None or any(o is not None for o in optimizers):
            raise ValueError("data_collator, compute_metrics and optimizers are not supported: the engine "
                             "batches the data and owns the optimizer (set optim and lr_scheduler_type in args)")
        self.args = args if args is not None else TrainingArguments()
        if not isinstance(self.args, TrainingArguments):
            raise TypeError(f"args must be coserve.TrainingArguments, got {type(self.args).__name__}")
        if processing_class is not None:
            logger.info("Trainer: processing_class is ignored; the engine uses the model's tokenizer")
        if engine_kwargs and not isinstance(model, (str, os.PathLike)):
            raise ValueError("engine_kwargs apply only when model is a path (the Trainer then starts the engine)")
        implied = self.args.engine_kwargs()
        if implied and not isinstance(model, (str, os.PathLike)):
            logger.info("Trainer: bf16/fp16/use_cpu have no effect on an engine that is already running")
        # Callbacks are checked before an engine is started, so a bad one leaves nothing running.
        self.callback_handler = CallbackHandler([DefaultFlowCallback, *(callbacks or [])])
        self._closed = True
        self._client = connect(model, {**implied, **(engine_kwargs or {})})
        self._closed = False
        self.model = self._client.llm if self._client.kind == "local" else self._client.deployment
        self.callback_handler.model = self.model
        self.callback_handler.processing_class = self._client.tokenizer if self._client.kind == "local" else None
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.peft_config = peft_config
        self.adapter_name = adapter_name or default_adapter_name(self.args.output_dir)
        self.state = TrainerState()
        self.control = TrainerControl()
        self._job = None
        self._num_train_examples: int | None = None
        self._event("on_init_end")

    # ---- callbacks ---------------------------------------------------------------------------------

    def add_callback(self, callback) -> None:
        self.callback_handler.add_callback(callback)

    def pop_callback(self, callback):
        return self.callback_handler.pop_callback(callback)

    def remove_callback(self, callback) -> None:
        self.callback_handler.remove_callback(callback)

    def _event(self, name: str, **kwargs) -> None:
        self.control = self.callback_handler.call(name, self.args, self.state, self.control, **kwargs)

    # ---- training ----------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> TrainOutput:
        """Train to max_steps (or until a callback stops it); returns TrainOutput(global_step, training_loss,
        metrics). training_loss is the mean step loss over the steps this call ran (as transformers).

        resume_from_checkpoint: None, True (the latest output_dir/checkpoint-<step>) or a checkpoint path;
            the engine resumes it exactly (same weights, optimizer, schedule and data order).
        """
        if kwargs:
            raise TypeError(f"train() got unsupported arguments: {', '.join(sorted(kwargs))}")
        args = self.args
        if self._closed:
            raise RuntimeError("this Trainer was closed")
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset")
        if args.eval_strategy == "steps" and self.eval_dataset is None:
            raise ValueError("eval_strategy is 'steps' (or eval_steps is set) but no eval_dataset was given")
        resume = resume_from_checkpoint if resume_from_checkpoint is not None else args.resume_from_checkpoint
        checkpoint = self._checkpoint_path(resume)
        if checkpoint is None and self.peft_config is None:
            raise ValueError("Trainer: give peft_config (a peft.LoraConfig) for the adapter to train")
        max_steps = args.resolve_max_steps(self._num_examples() if args.max_steps <= 0 else None)
        self._release_previous_adapter()

        config = args.finetune_config(adapter=self.adapter_name, dataset=self.train_dataset, peft=self.peft_config,
                                      max_steps=max_steps, resume_from_checkpoint=checkpoint)
        # Submitted paused before its first step: bad data or settings raise here, before any callback.
        self._job = self._client.submit(config, pause_at_step=0)
        try:
            progress = self._wait_for_step(0)
            self.state = state = self._initial_state(max_steps, progress, checkpoint)
            self._last_logged, self._loss_since_log, self._loss_this_call = state.global_step, 0.0, 0.0
            first_step, start = state.global_step, time.time()
            logger.info("training adapter %r: steps %d..%d on %s (job %s)", self.adapter_name, first_step + 1,
                        max_steps, self._client.kind, self._client.job_id(self._job))
            self._event("on_train_begin")
            if args.eval_on_start:
                self.evaluate()
            self._event("on_epoch_begin")
            while state.global_step < max_steps and progress["status"] == "running":
                self._event("on_step_begin")
                self._client.continue_to(self._job, state.global_step + 1)
                progress = self._wait_for_step(state.global_step + 1)
                for step in range(state.global_step + 1, min(progress["step"], max_steps) + 1):
                    self._step_done(step, progress)
                if self.control.should_training_stop:
                    break
            self._event("on_epoch_end")
            self._maybe_log_save_evaluate(progress)
            if progress["status"] == "running":   # stopped by a callback: end the job, saving its adapter
                self._client.stop(self._job)
                progress = self._wait_for_step(max_steps + 1)
        except BaseException:
            self._stop_quietly()
            raise
        num_steps = state.global_step - first_step
        runtime = time.time() - start
        train_loss = self._loss_this_call / max(num_steps, 0.001)
        metrics = {"train_runtime": round(runtime, 4),
                   "train_samples_per_second": round(num_steps * args.sequences_per_step / runtime, 3),
                   "train_steps_per_second": round(num_steps / runtime, 3),
                   "total_flos": state.total_flos, "train_loss": train_loss}
        self.log(metrics)
        self._event("on_train_end")
        return TrainOutput(state.global_step, train_loss, metrics)

    def _step_done(self, step: int, progress: dict) -> None:
        """The callbacks, logs, evaluation and saving of optimizer step `step` (the job is paused after it)."""
        state = self.state
        previous_epoch = state.epoch or 0.0
        state.global_step = step
        state.epoch = self._epoch(step, progress)
        state.num_input_tokens_seen = progress.get("tokens_trained", state.num_input_tokens_seen)
        loss = progress["losses"][step - 1]
        self._loss_since_log += loss
        self._loss_this_call += loss
        self._event("on_step_end")
        self._maybe_log_save_evaluate(progress)
        # NOTE: a step may straddle two epochs (rows are drawn across the boundary); the epoch events
        # fire after the step in which an epoch ends, and the last on_epoch_end after the last step.
        if (math.floor(state.epoch) > math.floor(previous_epoch) and step < state.max_steps
                and not self.control.should_training_stop):
            self._event("on_epoch_end")
            self._maybe_log_save_evaluate(progress)
            self._event("on_epoch_begin")

    def _maybe_log_save_evaluate(self, progress: dict) -> None:
        state, step = self.state, self.state.global_step
        if self.control.should_log and step > self._last_logged:
            logs = {"loss": self._loss_since_log / (step - self._last_logged)}
            grad_norm = _at(progress, "grad_norms", step)
            if grad_norm is not None:
                logs["grad_norm"] = grad_norm
            logs["learning_rate"] = _at(progress, "learning_rates", step)
            self._loss_since_log, self._last_logged = 0.0, step
            self.log(logs)
        if self.control.should_evaluate:
            self.evaluate()
        if self.control.should_save:
            path = os.path.join(os.path.abspath(self.args.output_dir), f"checkpoint-{step}")
            written = {os.path.abspath(p) for p in progress.get("checkpoints", [])}
            if path not in written or not os.path.isdir(path):
                path = self._client.checkpoint(self._job)   # a step save_steps does not cover (final, callback)
            state.save_to_json(os.path.join(path, TRAINER_STATE_NAME))
            self._rotate_checkpoints()
            self._event("on_save")

    def _wait_for_step(self, step: int) -> dict:
        """Progress once the job has done `step` steps or ended; raises if it failed or was cancelled."""
        while True:
            progress = self._client.wait_step(self._job, step)
            if progress.get("status") in _FAILED:
                raise RuntimeError(f"finetuning job {self._client.job_id(self._job)} {progress['status']} at step "
                                   f"{progress.get('step')}: {progress.get('error') or 'no error recorded'}")
            live = progress.get("live", True)   # False: a Deployment's table record while the worker is replaced
            if progress["status"] == "succeeded" or (live and progress["step"] >= step):
                return progress

    def _stop_quietly(self) -> None:
        """After an error or Ctrl-C in the loop: end the paused job, keeping its adapter (best effort)."""
        if self._job is None:
            return
        try:
            self._client.stop(self._job)
        except Exception as exc:
            logger.warning("could not stop finetuning job %s: %s", self._client.job_id(self._job), exc)

    def _initial_state(self, max_steps: int, progress: dict, checkpoint: str | None) -> TrainerState:
        args = self.args
        state = TrainerState()
        if checkpoint is not None and os.path.isfile(os.path.join(checkpoint, TRAINER_STATE_NAME)):
            state = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME))
            # NOTE: entries logged after this checkpoint by the interrupted run are not part of this one.
            state.log_history = [e for e in state.log_history if e.get("step", 0) <= progress["step"]]
        state.global_step = progress["step"]
        state.max_steps = max_steps
        state.logging_steps = args.resolve_steps(args.logging_steps, max_steps)
        state.eval_steps = args.resolve_steps(args.eval_interval, max_steps) or state.eval_steps
        state.save_steps = args.resolve_steps(args.save_steps, max_steps)
        state.train_batch_size = args.per_device_train_batch_size
        num_examples = progress.get("num_examples") or 1
        state.num_train_epochs = math.ceil(max_steps * args.sequences_per_step / num_examples)
        state.epoch = self._epoch(state.global_step, progress)
        state.num_input_tokens_seen = progress.get("tokens_trained", 0)
        return state

    def _epoch(self, step: int, progress: dict) -> float:
        """Passes over the data after `step` steps (the job reports how many sequences the data made)."""
        self._num_train_examples = progress.get("num_examples") or self._num_train_examples
        if not self._num_train_examples:
            return self.state.epoch or 0.0
        return step * self.args.sequences_per_step / self._num_train_examples

    # ---- evaluation --------------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
        """Mean token loss on the eval dataset with the adapter as it is now, computed in the engine
        (forward only, between its iterations); same loss as training. Before any training, the base
        model is evaluated (what a fresh LoRA, whose B is zero, computes)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset")
        adapter = self.adapter_name if self.adapter_name in self._client.list_adapters() else None
        start = time.time()
        result = self._client.evaluate(dataset, adapter, self.args.max_seq_length, self.args.packing)
        runtime = time.time() - start
        metrics = {f"{metric_key_prefix}_loss": result["eval_loss"],
                   f"{metric_key_prefix}_runtime": round(runtime, 4),
                   f"{metric_key_prefix}_samples_per_second": round(result["num_examples"] / runtime, 3),
                   f"{metric_key_prefix}_steps_per_second": round(
                       math.ceil(result["num_examples"] / self.args.per_device_eval_batch_size) / runtime, 3),
                   f"{metric_key_prefix}_num_tokens": result["num_tokens"]}
        self.log(metrics)
        self._event("on_evaluate", metrics=metrics)
        return metrics

    # ---- logs and saving ---------------------------------------------------------------------------

    def log(self, logs: dict, start_time: float | None = None) -> None:
        """Append logs (with epoch and step) to state.log_history and call on_log (as transformers)."""
        if self.state.epoch is not None:
            logs["epoch"] = self.state.epoch
        self.state.log_history.append({**logs, "step": self.state.global_step})
        logger.info("step %d: %s", self.state.global_step, logs)
        self._event("on_log", logs=logs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the adapter as it is now in PEFT format (adapter_config.json + adapter_model.safetensors),
        loadable with peft.PeftModel.from_pretrained; default directory: args.output_dir."""
        path = os.path.abspath(output_dir if output_dir is not None else self.args.output_dir)
        if self.adapter_name not in self._client.list_adapters():
            raise ValueError(f"adapter {self.adapter_name!r} is not loaded: train() first")
        self._client.save_adapter(self.adapter_name, path)

    def save_state(self) -> None:
        """Write state to output_dir/trainer_state.json."""
        os.makedirs(self.args.output_dir, exist_ok=True)
        self.state.save_to_json(os.path.join(self.args.output_dir, TRAINER_STATE_NAME))

    def _rotate_checkpoints(self) -> None:
        limit = self.args.save_total_limit
        if limit is None:
            return
        root = Path(self.args.output_dir)
        found = sorted((int(p.name.split("-", 1)[1]), p) for p in root.glob("checkpoint-*")
                       if p.name.split("-", 1)[1].isdigit() and p.is_dir())
        for _, path in found[:-limit]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- helpers -----------------------------------------------------------------------------------

    def _checkpoint_path(self, resume) -> str | None:
        if resume is None or resume is False:
            return None
        if resume is True:
            from coserve.finetune.checkpoint import latest_checkpoint

            path = latest_checkpoint(self.args.output_dir)
            if path is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            return os.path.abspath(path)
        return os.path.abspath(os.fspath(resume))

    def _num_examples(self) -> int:
        """Training sequences the data makes (for max_steps from num_train_epochs)."""
        from coserve.finetune.dataset import load_rows, tokenize_rows

        rows = load_rows(self.train_dataset)
        if not self.args.packing:
            return len(rows)   # one sequence per row (a row that cannot be trained on fails the job)
        return len(tokenize_rows(rows, self._client.tokenizer, self.args.max_seq_length, packing=True))

    def _release_previous_adapter(self) -> None:
        """A second train() on this Trainer retrains its adapter from scratch (or a checkpoint)."""
        if self._job is not None and self.adapter_name in self._client.list_adapters():
            self._client.unload_adapter(self.adapter_name)

    def close(self) -> None:
        """Shut down the engine this Trainer started from a model path (a given LLM or Deployment stays)."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if getattr(self, "_client", None) is not None:
                self.close()
        except Exception:   # interpreter shutdown: the engine's threads may be gone already
            pass


def default_adapter_name(output_dir: str) -> str:
    """The adapter name a Trainer uses by default: the last component of output_dir."""
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir))) or "adapter"


def _at(progress: dict, key: str, step: int):
    values = progress.get(key) or []
    return values[step - 1] if 0 < step <= len(values) else None
