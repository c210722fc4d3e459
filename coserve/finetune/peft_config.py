"""Turn the `peft` argument of a FinetuneConfig (a peft.LoraConfig or its dict) into our LoRA config.

Training here runs without dropout (the backward recomputes each layer's
forward and would need the same mask twice), so a non-zero `lora_dropout` is
refused rather than silently ignored.
"""
from __future__ import annotations

import enum

from peft_methods.lora.config import LoRAAdapterConfig


def lora_config_from_peft(peft) -> LoRAAdapterConfig:
    if isinstance(peft, LoRAAdapterConfig):
        return peft
    raw = peft.to_dict() if hasattr(peft, "to_dict") else peft
    if not isinstance(raw, dict):
        raise TypeError(f"peft must be a peft.LoraConfig or a dict, got {type(peft).__name__}")
    raw = {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in raw.items()}
    raw.setdefault("peft_type", "LORA")
    if raw.get("target_modules") is None:
        raise ValueError("peft.target_modules is required, e.g. ['q_proj', 'v_proj'] or 'all-linear'")
    if isinstance(raw["target_modules"], (set, frozenset)):
        raw["target_modules"] = sorted(raw["target_modules"])
    if raw.get("lora_dropout"):
        raise ValueError(f"lora_dropout={raw['lora_dropout']} is not supported for finetuning; set it to 0.0")
    return LoRAAdapterConfig.from_dict(raw)
