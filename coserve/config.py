"""Configuration dataclasses passed to the engine's constructors.

Each config is a plain `@dataclass` validated in `__post_init__`: a bad value
raises `ValueError` with a message that names the field and the fix. This
module imports nothing heavy (no torch) so the scheduler and its tests can use
it without a model. More config classes are appended here by other parts.
"""
from __future__ import annotations

from dataclasses import dataclass


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_positive_int(value: object) -> bool:
    # NOTE: bool is a subclass of int; `True` as a token budget is a bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass
class SchedulerConfig:
    """How much work one iteration may hold."""

    max_num_batched_tokens: int = 256
    """Token budget per iteration: decodes, prefill chunks and new prompts together."""
    max_num_seqs: int = 64
    """Most requests running at once (each holds KV blocks until it finishes)."""
    max_loras: int = 8
    """Most distinct adapters used by running requests at once (the base model takes no slot)."""
    enable_chunked_prefill: bool = True
    """Split a long prompt over several iterations; if False a prompt must fit the budget whole."""
    sharing: str = "coserve"
    """"coserve": finetuning fills each iteration's leftover budget; "temporal": turns alternate."""
    temporal_turn_tokens: int = 256
    """Finetuning tokens (forward or backward) in one temporal-sharing turn."""
    temporal_turn_every: int = 1
    """Temporal sharing: inference iterations between two finetuning turns (while both have work)."""
    finetune_kv_fraction: float = 0.5
    """Most of the KV blocks finetuning sequences may hold."""
    min_prefill_chunk: int = 32
    """With a TPOT SLO, a prefill chunk beside running decodes is cut so the iteration's predicted
    latency stays under the SLO, but never below this many tokens (new prompts keep moving)."""
    ttft_slo_ms: float | None = None
    """With a TPOT SLO: prefill chunks beside decodes are never cut below what keeps every prompt
    within this time to first token. None: they are cut to the TPOT SLO alone."""
    min_finetune_tokens: int = 16
    """Smallest finetuning chunk or window worth scheduling (unless less work is left)."""
    finetune_slo_headroom: float = 0.0
    """With a TPOT SLO: finetuning fills an iteration only as far as keeps every running decode's mean
    time per token within (1 - this) x the SLO, so decodes bank time for the prompt bursts that push
    later iterations past the SLO. Decodes already ahead of that pace let finetuning fill up to the SLO.
    0: finetuning takes the largest budget whose predicted latency stays under the SLO."""
    finetune_starvation_iterations: int = 256
    """A finetuning job that got no budget for this many iterations in a row gets one small piece
    anyway (so it always finishes; at most one iteration in this many overruns). A safety net:
    layer windows and the calibrated profile normally leave some room long before."""

    def __post_init__(self) -> None:
        _check(_is_positive_int(self.max_num_batched_tokens),
               f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}")
        _check(_is_positive_int(self.max_num_seqs),
               f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        _check(_is_positive_int(self.max_loras),
               f"max_loras must be a positive integer, got {self.max_loras!r}")
        _check(self.ttft_slo_ms is None or (isinstance(self.ttft_slo_ms, (int, float)) and self.ttft_slo_ms > 0),
               f"ttft_slo_ms must be positive or None, got {self.ttft_slo_ms!r}")
        _check(_is_positive_int(self.temporal_turn_every),
               f"temporal_turn_every must be a positive integer, got {self.temporal_turn_every!r}")
        _check(_is_positive_int(self.min_prefill_chunk),
               f"min_prefill_chunk must be a positive integer, got {self.min_prefill_chunk!r}")
        _check(isinstance(self.finetune_slo_headroom, (int, float)) and 0 <= self.finetune_slo_headroom < 1,
               f"finetune_slo_headroom must be in [0, 1), got {self.finetune_slo_headroom!r}")
        _check(_is_positive_int(self.finetune_starvation_iterations),
               f"finetune_starvation_iterations must be a positive integer, got {self.finetune_starvation_iterations!r}")
        _check(isinstance(self.enable_chunked_prefill, bool),
               f"enable_chunked_prefill must be True or False, got {self.enable_chunked_prefill!r}")


@dataclass
class CacheConfig:
    """Layout of the paged KV cache."""

    block_size: int = 16
    """Tokens per KV block: the unit of allocation in the paged cache."""
    num_kv_blocks: int | None = None
    """Blocks in the cache; None lets the engine size it from the memory it measures."""

    def __post_init__(self) -> None:
        _check(_is_positive_int(self.block_size),
               f"block_size must be a positive integer, got {self.block_size!r}")
        _check(self.num_kv_blocks is None or _is_positive_int(self.num_kv_blocks),
               f"num_kv_blocks must be a positive integer or None (sized by the engine), "
               f"got {self.num_kv_blocks!r}")


_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16", "auto": "auto"}


@dataclass
class EngineConfig:
    """Everything `LLM(...)` / `Engine` takes; the keyword arguments of `LLM` are these fields."""

    model: str
    """A Hugging Face model directory, or a .gguf file (dequantized on load)."""
    dtype: str = "auto"
    """float32, bfloat16, float16, or auto (bfloat16 on CUDA, float32 on CPU)."""
    device: str = "auto"
    """cpu, cuda, cuda:N, or auto (CUDA when available)."""
    max_loras: int = 8
    """Device adapter slots: most distinct adapters in one iteration."""
    max_lora_rank: int = 64
    """Adapters with a larger rank in any module are refused at load time."""
    max_cpu_loras: int | None = None
    """Loaded adapters kept in host memory (LRU); None = 4 x max_loras."""
    max_num_batched_tokens: int = 256
    """Token budget per iteration."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    enable_chunked_prefill: bool = True
    """Split long prompts over several iterations."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    num_kv_blocks: int | None = None
    """Fixed KV pool size in blocks; None sizes it from kv_cache_memory_gb."""
    kv_cache_memory_gb: float = 2.0
    """Memory budget for the KV cache when num_kv_blocks is None."""
    max_model_len: int | None = None
    """Longest sequence (prompt + output); None = the model's max_position_embeddings."""
    use_lora_ref: bool = False
    """Run the reference (gather) LoRA op instead of the grouped one; for tests."""
    tpot_slo_ms: float | None = None
    """Per-iteration latency target; finetuning fills only what inference leaves under it.
    None: no SLO, the iteration budget is max_num_batched_tokens (backward tokens weighted)."""
    ttft_slo_ms: float | None = None
    """Time-to-first-token target, used with tpot_slo_ms: prompts are cut into chunks that keep
    running decodes under the TPOT SLO, but never so small that a prompt would miss this target."""
    finetune_slo_headroom: float = 0.0
    """With tpot_slo_ms: share of the SLO finetuning leaves to running decodes so they bank time for
    prompt bursts (see SchedulerConfig.finetune_slo_headroom); 0, the default, lets finetuning fill
    every iteration up to the SLO."""
    latency_profile: str | None = None
    """JSON file with a saved latency profile: loaded if it exists, else written after profiling."""
    sharing: str = "coserve"
    """"coserve": finetuning shares each iteration; "temporal": separate iterations take turns."""
    temporal_turn_tokens: int = 256
    """With sharing="temporal": tokens of finetuning work in one finetuning turn."""
    temporal_turn_every: int = 1
    """With sharing="temporal": inference iterations between two finetuning turns."""
    finetune_kv_fraction: float = 0.5
    """Most of the KV cache finetuning sequences may hold, so inference is never starved."""

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and bool(self.model), f"model must be a path, got {self.model!r}")
        _check(self.dtype in _DTYPES, f"dtype must be one of {sorted(set(_DTYPES))}, got {self.dtype!r}")
        self.dtype = _DTYPES[self.dtype]
        _check(isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check(_is_positive_int(self.max_lora_rank), f"max_lora_rank must be a positive integer, got {self.max_lora_rank!r}")
        _check(_is_positive_int(self.max_loras), f"max_loras must be a positive integer, got {self.max_loras!r}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = 4 * self.max_loras
        _check(_is_positive_int(self.max_cpu_loras), f"max_cpu_loras must be a positive integer, got {self.max_cpu_loras!r}")
        _check(isinstance(self.kv_cache_memory_gb, (int, float)) and self.kv_cache_memory_gb > 0,
               f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        _check(self.max_model_len is None or _is_positive_int(self.max_model_len),
               f"max_model_len must be a positive integer or None, got {self.max_model_len!r}")
        _check(self.tpot_slo_ms is None or (isinstance(self.tpot_slo_ms, (int, float)) and self.tpot_slo_ms > 0),
               f"tpot_slo_ms must be positive or None, got {self.tpot_slo_ms!r}")
        _check(self.sharing in ("coserve", "temporal"),
               f"sharing must be 'coserve' or 'temporal', got {self.sharing!r}")
        _check(_is_positive_int(self.temporal_turn_tokens),
               f"temporal_turn_tokens must be a positive integer, got {self.temporal_turn_tokens!r}")
        _check(isinstance(self.finetune_kv_fraction, (int, float)) and 0 < self.finetune_kv_fraction <= 1,
               f"finetune_kv_fraction must be in (0, 1], got {self.finetune_kv_fraction!r}")
        # Validates the shared fields with the messages of the configs that own them.
        self.scheduler_config()
        self.cache_config()

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.max_loras,
                               self.enable_chunked_prefill, sharing=self.sharing,
                               temporal_turn_tokens=self.temporal_turn_tokens,
                               temporal_turn_every=self.temporal_turn_every,
                               finetune_kv_fraction=self.finetune_kv_fraction, ttft_slo_ms=self.ttft_slo_ms,
                               finetune_slo_headroom=self.finetune_slo_headroom)

    def cache_config(self) -> CacheConfig:
        return CacheConfig(self.block_size, self.num_kv_blocks)

    def resolved_device(self):
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for, but CUDA is not available")
        return device

    def resolved_dtype(self, device):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


_OPTIMIZERS = ("adamw", "sgd")
_LR_SCHEDULERS = ("constant", "linear", "cosine")


def _is_non_negative_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


@dataclass
class FinetuneConfig:
    """One finetuning job: which adapter, on what data, with which optimizer.

    The loss of an optimizer step is the mean over all target tokens of the
    step (every sequence of `batch_size * gradient_accumulation_steps`), not a
    mean of per-sequence or per-micro-batch means.
    """

    adapter: str
    """Name the trained adapter is served and saved under; must not be loaded already."""
    dataset: object = None
    """A .jsonl/.json/.csv/.parquet path, a `datasets.Dataset` or a list of row dicts."""
    peft: object = None
    """A `peft.LoraConfig` (or its dict); optional with `init_adapter`, whose config is then used."""
    init_adapter: str | None = None
    """A PEFT adapter directory to start from instead of peft's initialization."""
    max_steps: int = 100
    """Optimizer steps to run."""
    batch_size: int = 4
    """Sequences per micro-batch (also how many sequences are in flight at once)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-4
    optimizer: str = "adamw"
    """"adamw" (torch.optim.AdamW) or "sgd" (torch.optim.SGD)."""
    weight_decay: float = 0.0
    momentum: float = 0.0
    """SGD momentum."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_scheduler: str = "constant"
    """"constant", "linear" or "cosine" (transformers' schedules), after `warmup_steps` of linear warmup."""
    warmup_steps: int = 0
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this value; None = no clipping."""
    max_seq_len: int = 256
    """Sequences are truncated (or packed) to this many tokens."""
    packing: bool = False
    """Concatenate rows into sequences of max_seq_len tokens instead of one row per sequence."""
    shuffle: bool = True
    """Shuffle rows with `seed`; False takes them in file order."""
    seed: int = 0
    """Seeds the row order and peft-style initialization."""
    output_dir: str | None = None
    """Where the final adapter is saved (PEFT format); checkpoints go to output_dir/checkpoint-<step>/."""
    save_steps: int | None = None
    """Write a checkpoint every this many optimizer steps; None = only the final adapter."""
    resume_from_checkpoint: str | bool | None = None
    """Continue a job from a `checkpoint-<step>` directory (its path, or True for the latest one in
    output_dir): its adapter, LoRA config, optimizer, schedule, losses and data position. The data and
    the training settings must be those of the job that wrote it (checked). A checkpoint of the last
    step finishes the job at once, saving the final adapter. None or False: start fresh."""

    def __post_init__(self) -> None:
        _check(isinstance(self.adapter, str) and bool(self.adapter),
               f"adapter must be a non-empty name, got {self.adapter!r}")
        _check(self.dataset is not None, "dataset is required: a file path, a datasets.Dataset or a list of rows")
        import os

        if self.resume_from_checkpoint is False:
            self.resume_from_checkpoint = None
        if isinstance(self.resume_from_checkpoint, os.PathLike):
            self.resume_from_checkpoint = os.fspath(self.resume_from_checkpoint)
        _check(self.resume_from_checkpoint is None or self.resume_from_checkpoint is True
               or (isinstance(self.resume_from_checkpoint, str) and bool(self.resume_from_checkpoint)),
               "resume_from_checkpoint must be a checkpoint directory (output_dir/checkpoint-<step>), True "
               f"(the latest checkpoint in output_dir) or None, got {self.resume_from_checkpoint!r}")
        _check(self.resume_from_checkpoint is not True or self.output_dir is not None,
               "resume_from_checkpoint=True looks for the latest checkpoint in output_dir; set output_dir "
               "or give the checkpoint's path")
        # NOTE: a checkpoint carries its own LoRA config, so resuming needs neither peft nor init_adapter.
        _check(self.peft is not None or self.init_adapter is not None or self.resume_from_checkpoint is not None,
               "give peft (a peft.LoraConfig), init_adapter (a saved adapter to continue) or "
               "resume_from_checkpoint")
        _check(_is_positive_int(self.max_steps), f"max_steps must be a positive integer, got {self.max_steps!r}")
        _check(_is_positive_int(self.batch_size), f"batch_size must be a positive integer, got {self.batch_size!r}")
        _check(_is_positive_int(self.gradient_accumulation_steps),
               f"gradient_accumulation_steps must be a positive integer, got {self.gradient_accumulation_steps!r}")
        _check(isinstance(self.learning_rate, (int, float)) and not isinstance(self.learning_rate, bool)
               and self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate!r}")
        _check(self.optimizer in _OPTIMIZERS, f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.lr_scheduler in _LR_SCHEDULERS,
               f"lr_scheduler must be one of {_LR_SCHEDULERS}, got {self.lr_scheduler!r}")
        _check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0,
               f"weight_decay must be >= 0, got {self.weight_decay!r}")
        _check(isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1,
               f"momentum must be in [0, 1), got {self.momentum!r}")
        _check(_is_non_negative_int(self.warmup_steps), f"warmup_steps must be >= 0, got {self.warmup_steps!r}")
        _check(self.max_grad_norm is None or (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0),
               f"max_grad_norm must be positive or None, got {self.max_grad_norm!r}")
        _check(_is_positive_int(self.max_seq_len) and self.max_seq_len >= 2,
               f"max_seq_len must be an integer >= 2, got {self.max_seq_len!r}")
        _check(self.save_steps is None or _is_positive_int(self.save_steps),
               f"save_steps must be a positive integer or None, got {self.save_steps!r}")
        _check(isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}")
        self.adam_betas = tuple(self.adam_betas)

    @property
    def sequences_per_step(self) -> int:
        return self.batch_size * self.gradient_accumulation_steps
