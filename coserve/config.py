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

    def __post_init__(self) -> None:
        _check(_is_positive_int(self.max_num_batched_tokens),
               f"max_num_batched_tokens must be a positive integer, got {self.max_num_batched_tokens!r}")
        _check(_is_positive_int(self.max_num_seqs),
               f"max_num_seqs must be a positive integer, got {self.max_num_seqs!r}")
        _check(_is_positive_int(self.max_loras),
               f"max_loras must be a positive integer, got {self.max_loras!r}")
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

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and bool(self.model), f"model must be a path, got {self.model!r}")
        _check(self.dtype in _DTYPES, f"dtype must be one of {sorted(set(_DTYPES))}, got {self.dtype!r}")
        self.dtype = _DTYPES[self.dtype]
        _check(isinstance(self.device, str) and (self.device in ("auto", "cpu") or self.device.startswith("cuda")),
               f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        _check(_is_positive_int(self.max_lora_rank), f"max_lora_rank must be a positive integer, got {self.max_lora_rank!r}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = 4 * self.max_loras if _is_positive_int(self.max_loras) else 0
        _check(_is_positive_int(self.max_cpu_loras), f"max_cpu_loras must be a positive integer, got {self.max_cpu_loras!r}")
        _check(isinstance(self.kv_cache_memory_gb, (int, float)) and self.kv_cache_memory_gb > 0,
               f"kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb!r}")
        _check(self.max_model_len is None or _is_positive_int(self.max_model_len),
               f"max_model_len must be a positive integer or None, got {self.max_model_len!r}")
        # Validates the shared fields with the messages of the configs that own them.
        self.scheduler_config()
        self.cache_config()

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(self.max_num_batched_tokens, self.max_num_seqs, self.max_loras,
                               self.enable_chunked_prefill)

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
