"""coserve: multi-LoRA LLM serving and token-level finetuning in the same iterations.

Public names are imported lazily so that torch-free parts (the scheduler and
its tests) do not pay for loading torch.
"""
from __future__ import annotations

from importlib import import_module

__all__ = ["LLM", "SamplingParams", "RequestOutput", "EngineConfig", "FinetuneConfig", "Trainer",
           "TrainingArguments", "TrainerCallback"]

_EXPORTS = {
    "LLM": "coserve.llm",
    "SamplingParams": "coserve.sampling_params",
    "RequestOutput": "coserve.outputs",
    "EngineConfig": "coserve.config",
    "FinetuneConfig": "coserve.config",
    "Trainer": "coserve.train",
    "TrainingArguments": "coserve.train",
    "TrainerCallback": "coserve.train",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'coserve' has no attribute {name!r}")
