"""`TrainingArguments`: Hugging Face's training settings, mapped onto a coserve finetuning job.

Field names, defaults and meanings follow `transformers.TrainingArguments`
(version 5) for everything that maps onto `FinetuneConfig`. Settings that only
concern a local PyTorch loop are accepted and ignored with one logged note
(`IGNORED`); settings whose meaning cannot be honoured are refused with a
`ValueError` that says what to do instead. `max_seq_length` and `packing`
come from TRL's `SFTConfig`: the engine tokenizes the data itself.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

# optim names of transformers that are plain torch AdamW / SGD here.
_OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw": "adamw", "sgd": "sgd"}
_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
_STRATEGIES = ("no", "steps")
# Fields kept for compatibility that change nothing here; set to a non-default value, they are logged once.
IGNORED = ("report_to", "logging_dir", "run_name", "dataloader_num_workers",
           "dataloader_pin_memory", "remove_unused_columns", "disable_tqdm", "gradient_checkpointing",
           "torch_compile", "tf32", "overwrite_output_dir", "do_train", "do_eval", "label_names")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class TrainingArguments:
    """What `Trainer` trains with. Fields as in transformers; see the module docstring for what is ignored."""

    output_dir: str = "trainer_output"
    """Checkpoints go to output_dir/checkpoint-<step>/, the final adapter to output_dir (PEFT format)."""
    max_steps: int = -1
    """Optimizer steps; <= 0 derives them from num_train_epochs and the dataset size."""
    num_train_epochs: float = 3.0
    """Passes over the data when max_steps <= 0: max_steps = ceil(epochs * examples / (batch * accumulation))."""
    per_device_train_batch_size: int = 8
    """Sequences per micro-batch (and at most this many in flight at once in the engine)."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm; 0 or None = no clipping."""
    optim: str = "adamw_torch"
    """adamw_torch, adamw_torch_fused or adamw (torch.optim.AdamW), or sgd."""
    lr_scheduler_type: str = "linear"
    """linear, cosine, constant or constant_with_warmup, after linear warmup."""
    warmup_steps: float = 0
    """Warmup steps; a value in (0, 1) is a fraction of max_steps (transformers 5)."""
    warmup_ratio: float = 0.0
    """Fraction of max_steps to warm up (transformers 4); used when warmup_steps is 0."""
    logging_strategy: str = "steps"
    logging_steps: float = 500
    """Log every this many steps; a value in (0, 1) is a fraction of max_steps."""
    logging_first_step: bool = False
    eval_strategy: str | None = None
    """"no" or "steps"; None: "steps" when eval_steps is given, else "no"."""
    eval_steps: float | None = None
    """Evaluate every this many steps (None: logging_steps); a value in (0, 1) is a fraction of max_steps."""
    eval_on_start: bool = False
    save_strategy: str = "steps"
    save_steps: float = 500
    """Write output_dir/checkpoint-<step>/ every this many steps; a value in (0, 1) is a fraction of max_steps."""
    save_total_limit: int | None = None
    """Keep at most this many checkpoints (the oldest are deleted)."""
    seed: int = 42
    """Orders the rows (shuffled every epoch) and initializes the adapter."""
    max_seq_length: int = 256
    """Rows are truncated (or packed) to this many tokens (TRL's SFTConfig name)."""
    packing: bool = False
    """Concatenate rows into sequences of max_seq_length tokens (TRL's SFTConfig)."""
    resume_from_checkpoint: str | None = None
    """Default for `Trainer.train(resume_from_checkpoint=...)`."""
    bf16: bool = False
    """With a model path: the engine the Trainer starts runs in bfloat16 (else the engine's dtype is used)."""
    fp16: bool = False
    """With a model path: the engine runs in float16."""
    use_cpu: bool = False
    """With a model path: the engine runs on the CPU."""
    data_seed: int | None = None
    """Refused unless None or equal to seed: one seed orders the data and initializes the adapter."""
    push_to_hub: bool = False
    """Refused when True (no network access is assumed)."""
    load_best_model_at_end: bool = False
    """Refused when True."""
    per_device_eval_batch_size: int = 8
    """Only for the eval_steps_per_second metric: the engine batches evaluation by tokens."""
    # Compatibility only; see IGNORED.
    report_to: str | list[str] | None = "none"
    logging_dir: str | None = None
    run_name: str | None = None
    dataloader_num_workers: int = 0
    dataloader_pin_memory: bool = True
    remove_unused_columns: bool = True
    disable_tqdm: bool = True
    gradient_checkpointing: bool = False
    torch_compile: bool = False
    tf32: bool | None = None
    overwrite_output_dir: bool = False
    do_train: bool = False
    do_eval: bool = False
    label_names: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(isinstance(self.output_dir, str) and bool(self.output_dir), f"output_dir must be a path, got "
              f"{self.output_dir!r}")
        check(_is_int(self.max_steps), f"max_steps must be an integer, got {self.max_steps!r}")
        check(self.max_steps > 0 or (isinstance(self.num_train_epochs, (int, float)) and self.num_train_epochs > 0),
              "give max_steps > 0 or num_train_epochs > 0")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length"):
            check(_is_int(getattr(self, name)) and getattr(self, name) > 0,
                  f"{name} must be a positive integer, got {getattr(self, name)!r}")
        check(self.optim in _OPTIMIZERS, f"optim {self.optim!r} is not supported; use one of {sorted(_OPTIMIZERS)}")
        check(self.lr_scheduler_type in _SCHEDULERS,
              f"lr_scheduler_type {self.lr_scheduler_type!r} is not supported; use one of {sorted(_SCHEDULERS)}")
        check(isinstance(self.warmup_steps, (int, float)) and self.warmup_steps >= 0,
              f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        check(isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio <= 1,
              f"warmup_ratio must be in [0, 1], got {self.warmup_ratio!r}")
        check(self.max_grad_norm is None or self.max_grad_norm >= 0,
              f"max_grad_norm must be >= 0 or None, got {self.max_grad_norm!r}")
        if self.eval_strategy is None:
            self.eval_strategy = "steps" if self.eval_steps is not None else "no"
        for name in ("logging_strategy", "eval_strategy", "save_strategy"):
            check(getattr(self, name) in _STRATEGIES, f"{name} {getattr(self, name)!r} is not supported; use "
                  f"{' or '.join(repr(s) for s in _STRATEGIES)} (epoch boundaries fall inside steps here)")
        for name in ("logging_steps", "save_steps"):
            check(isinstance(getattr(self, name), (int, float)) and getattr(self, name) > 0,
                  f"{name} must be > 0, got {getattr(self, name)!r}")
        check(self.eval_steps is None or (isinstance(self.eval_steps, (int, float)) and self.eval_steps > 0),
              f"eval_steps must be > 0 or None, got {self.eval_steps!r}")
        check(self.save_total_limit is None or (_is_int(self.save_total_limit) and self.save_total_limit > 0),
              f"save_total_limit must be a positive integer or None, got {self.save_total_limit!r}")
        check(_is_int(self.seed), f"seed must be an integer, got {self.seed!r}")
        check(self.data_seed is None or self.data_seed == self.seed,
              "data_seed is not supported: `seed` both orders the rows and initializes the adapter; set seed")
        check(not (self.bf16 and self.fp16), "set at most one of bf16 and fp16")
        check(not self.push_to_hub, "push_to_hub is not supported; upload output_dir yourself")
        check(not self.load_best_model_at_end, "load_best_model_at_end is not supported; pick a checkpoint from "
              "state.log_history and load it with LLM.load_adapter")
        defaults = TrainingArguments.__dataclass_fields__
        changed = [name for name in IGNORED if getattr(self, name) != defaults[name].default
                   and not (name == "report_to" and getattr(self, name) in (None, "none", [], ["none"]))]
        if changed:
            logger.info("TrainingArguments: %s have no effect in coserve (the engine batches, tokenizes and "
                        "logs itself)", ", ".join(changed))

    # ---- derived values -------------------------------------------------------------------------

    @property
    def sequences_per_step(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def resolve_max_steps(self, num_examples: int | None) -> int:
        """max_steps, or from num_train_epochs: every example is seen about num_train_epochs times."""
        if self.max_steps > 0:
            return self.max_steps
        if not num_examples:
            raise ValueError("max_steps <= 0 needs the dataset size to derive steps from num_train_epochs")
        return max(1, math.ceil(self.num_train_epochs * num_examples / self.sequences_per_step))

    def resolve_steps(self, value: float | None, max_steps: int) -> int | None:
        """A logging/eval/save interval: a fraction in (0, 1) of max_steps is rounded up (as transformers)."""
        if value is None:
            return None
        return max(1, math.ceil(max_steps * value)) if value < 1 else int(value)

    def num_warmup_steps(self, max_steps: int) -> int:
        if self.warmup_steps > 0:
            return int(self.warmup_steps) if self.warmup_steps >= 1 else math.ceil(max_steps * self.warmup_steps)
        return math.ceil(max_steps * self.warmup_ratio)

    @property
    def eval_interval(self) -> float | None:
        """eval_steps, defaulting to logging_steps (as transformers) when evaluating by steps."""
        if self.eval_strategy != "steps":
            return None
        return self.eval_steps if self.eval_steps is not None else self.logging_steps

    def engine_kwargs(self) -> dict:
        """EngineConfig fields implied by these arguments (used only when the Trainer starts the engine)."""
        kwargs = {}
        if self.bf16:
            kwargs["dtype"] = "bfloat16"
        elif self.fp16:
            kwargs["dtype"] = "float16"
        if self.use_cpu:
            kwargs["device"] = "cpu"
        return kwargs

    def finetune_config(self, *, adapter: str, dataset, peft, max_steps: int, resume_from_checkpoint=None):
        """The engine job these arguments describe."""
        from coserve.config import FinetuneConfig

        save_steps = self.resolve_steps(self.save_steps, max_steps) if self.save_strategy == "steps" else None
        return FinetuneConfig(
            adapter=adapter, dataset=dataset, peft=peft, max_steps=max_steps,
            batch_size=self.per_device_train_batch_size, gradient_accumulation_steps=self.gradient_accumulation_steps,
            learning_rate=self.learning_rate, optimizer=_OPTIMIZERS[self.optim], weight_decay=self.weight_decay,
            adam_betas=(self.adam_beta1, self.adam_beta2), adam_eps=self.adam_epsilon,
            lr_scheduler=_SCHEDULERS[self.lr_scheduler_type],
            # NOTE: transformers' "constant" ignores warmup; "constant_with_warmup" is constant after warmup.
            warmup_steps=0 if self.lr_scheduler_type == "constant" else self.num_warmup_steps(max_steps),
            max_grad_norm=self.max_grad_norm or None, max_seq_len=self.max_seq_length, packing=self.packing,
            shuffle=True, seed=self.seed, output_dir=self.output_dir, save_steps=save_steps,
            resume_from_checkpoint=resume_from_checkpoint)
