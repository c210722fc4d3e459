"""Trainer state, control flags and callbacks, with Hugging Face's names, signatures and semantics.

`TrainerState`, `TrainerControl` and `TrainerCallback` mirror
`transformers.trainer_callback` (version 5): events are called as
`on_x(args, state, control, **kwargs)`, a callback may return a new control
or change it in place, and `CallbackHandler` resets the same flags at the
same events. `DefaultFlowCallback` decides when to log, evaluate, save and
stop, exactly as transformers' does for the "steps" strategies. Any object
with these methods works as a callback (a transformers callback included, as
far as it needs only what these events pass).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)

EVENTS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
          "on_pre_optimizer_step", "on_optimizer_step", "on_substep_end", "on_step_end", "on_evaluate",
          "on_predict", "on_save", "on_log", "on_prediction_step", "on_push_begin")


class TrainOutput(NamedTuple):
    """What `Trainer.train` returns (as transformers' TrainOutput)."""

    global_step: int
    training_loss: float
    metrics: dict


@dataclass
class TrainerState:
    """Where training stands; saved as trainer_state.json in every checkpoint (transformers' fields)."""

    epoch: float | None = None
    """Passes over the data so far, fractional: global_step * sequences per step / examples."""
    global_step: int = 0
    """Optimizer steps done."""
    max_steps: int = 0
    logging_steps: int = 500
    eval_steps: int = 500
    save_steps: int = 500
    train_batch_size: int | None = None
    num_train_epochs: float = 0
    num_input_tokens_seen: int = 0
    """Tokens whose forward and backward are done."""
    total_flos: float = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    """Every log: {"loss", "grad_norm", "learning_rate", "epoch", "step"}, eval metrics, the final summary."""
    best_metric: float | None = None
    best_global_step: int | None = None
    best_model_checkpoint: str | None = None
    is_local_process_zero: bool = True
    is_world_process_zero: bool = True
    is_hyper_param_search: bool = False
    trial_name: str | None = None
    trial_params: dict | None = None
    stateful_callbacks: dict = field(default_factory=dict)

    def save_to_json(self, json_path: str) -> None:
        with open(json_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load_from_json(cls, json_path: str) -> "TrainerState":
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class TrainerControl:
    """Switches callbacks flip to steer the loop; reset by the handler as transformers does."""

    should_training_stop: bool = False
    """Stop after the current step: the adapter is saved as of that step and train() returns normally."""
    should_epoch_stop: bool = False
    """Accepted for compatibility; an epoch boundary falls inside a step here, so it stops nothing."""
    should_save: bool = False
    """Write output_dir/checkpoint-<step>/ after this step."""
    should_evaluate: bool = False
    should_log: bool = False

    def _new_step(self) -> None:
        self.should_save = self.should_evaluate = self.should_log = False


class TrainerCallback:
    """Base class with every event as a no-op; override the ones you need.

    kwargs of every event: model (the LLM or Deployment), processing_class (the tokenizer, where
    local), and optimizer, lr_scheduler, train_dataloader, eval_dataloader (always None: they live
    in the engine). on_log also gets logs, on_evaluate metrics.
    """

    def on_init_end(self, args, state, control, **kwargs):
        pass

    def on_train_begin(self, args, state, control, **kwargs):
        pass

    def on_train_end(self, args, state, control, **kwargs):
        pass

    def on_epoch_begin(self, args, state, control, **kwargs):
        pass

    def on_epoch_end(self, args, state, control, **kwargs):
        pass

    def on_step_begin(self, args, state, control, **kwargs):
        pass

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """Never called: the optimizer steps inside the engine."""

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Never called: the optimizer steps inside the engine."""

    def on_substep_end(self, args, state, control, **kwargs):
        """Never called: micro-batches run inside the engine."""

    def on_step_end(self, args, state, control, **kwargs):
        pass

    def on_evaluate(self, args, state, control, **kwargs):
        pass

    def on_predict(self, args, state, control, metrics, **kwargs):
        """Never called: there is no predict()."""

    def on_save(self, args, state, control, **kwargs):
        pass

    def on_log(self, args, state, control, **kwargs):
        pass

    def on_prediction_step(self, args, state, control, **kwargs):
        """Never called: evaluation batches run inside the engine."""

    def on_push_begin(self, args, state, control, **kwargs):
        """Never called: there is no push_to_hub()."""


class DefaultFlowCallback(TrainerCallback):
    """When to log, evaluate, save and stop: transformers' rules for the "steps" strategies."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1 and args.logging_first_step:
            control.should_log = True
        if args.logging_strategy == "steps" and state.global_step % state.logging_steps == 0:
            control.should_log = True
        if args.eval_strategy == "steps" and state.global_step % state.eval_steps == 0:
            control.should_evaluate = True
        if args.save_strategy == "steps" and state.save_steps > 0 and state.global_step % state.save_steps == 0:
            control.should_save = True
        if state.global_step >= state.max_steps:
            control.should_training_stop = True
            if args.eval_strategy == "steps" and state.global_step % state.eval_steps != 0:
                control.should_evaluate = True
            if args.save_strategy == "steps":
                control.should_save = True
        return control


class CallbackHandler:
    """Calls the callbacks in order; resets control flags at the events where transformers does."""

    def __init__(self, callbacks, model=None, processing_class=None) -> None:
        self.callbacks: list = []
        for callback in callbacks:
            self.add_callback(callback)
        self.model = model
        self.processing_class = processing_class

    def add_callback(self, callback) -> None:
        instance = callback() if isinstance(callback, type) else callback
        missing = [e for e in ("on_train_begin", "on_step_end", "on_log") if not hasattr(instance, e)]
        if missing:
            raise TypeError(f"{type(instance).__name__} is not a trainer callback (no {', '.join(missing)}); "
                            "subclass coserve.TrainerCallback")
        if type(instance) in [type(c) for c in self.callbacks]:
            logger.warning("a %s is already among the callbacks; adding another", type(instance).__name__)
        self.callbacks.append(instance)

    def pop_callback(self, callback):
        for existing in self.callbacks:
            if (isinstance(callback, type) and isinstance(existing, callback)) or existing is callback:
                self.callbacks.remove(existing)
                return existing
        return None

    def remove_callback(self, callback) -> None:
        self.pop_callback(callback)

    def call(self, event: str, args, state: TrainerState, control: TrainerControl, **kwargs: Any) -> TrainerControl:
        if event == "on_train_begin":
            control.should_training_stop = False
        elif event == "on_epoch_begin":
            control.should_epoch_stop = False
        elif event == "on_step_begin":
            control._new_step()
        elif event == "on_evaluate":
            control.should_evaluate = False
        elif event == "on_save":
            control.should_save = False
        elif event == "on_log":
            control.should_log = False
        for callback in self.callbacks:
            method = getattr(callback, event, None)
            if method is None:
                continue
            result = method(args, state, control, model=self.model, processing_class=self.processing_class,
                            optimizer=None, lr_scheduler=None, train_dataloader=None, eval_dataloader=None,
                            **kwargs)
            if result is not None:   # a callback may return control or change it in place
                control = result
        return control
