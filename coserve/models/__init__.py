"""Models: finding checkpoints, local presets, and the compact model itself.

- `checkpoint.py`: resolve an HF directory or a `.gguf` file (converted once into
  a cached HF directory) and stream its tensors from mmap'd safetensors.
- `presets.py`: tiny and "bench-small" configs, a locally trained tokenizer, and
  `make_model_dir`, which saves random-weight models in HF format (no hub needed).
- `llama.py`: the compact Llama / Mistral / Qwen2 model with HF parameter names.
"""

from coserve.models.checkpoint import (
    SUPPORTED_MODEL_TYPES,
    ResolvedCheckpoint,
    gguf_cache_dir,
    iter_checkpoint_tensors,
    load_hf_config,
    load_tokenizer,
    resolve_checkpoint,
)
from coserve.models.presets import (
    LLAMA3_ROPE,
    bench_small_config,
    build_tokenizer,
    make_model_dir,
    smollm2_gguf_path,
    tiny_config,
    tiny_corpus,
)

__all__ = [
    "LLAMA3_ROPE",
    "SUPPORTED_MODEL_TYPES",
    "ResolvedCheckpoint",
    "bench_small_config",
    "build_tokenizer",
    "gguf_cache_dir",
    "iter_checkpoint_tensors",
    "load_hf_config",
    "load_tokenizer",
    "make_model_dir",
    "resolve_checkpoint",
    "smollm2_gguf_path",
    "tiny_config",
    "tiny_corpus",
]
