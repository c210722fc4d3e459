"""LoRA for multi-adapter serving: many adapters in one batch, one token each.

config.py  LoRAAdapterConfig from adapter_config.json (ranks, alphas, targets)
weights.py LoRAAdapter, load_adapter / save_adapter in PEFT format
ops.py     lora_apply_ref (gather + einsum) and lora_apply_grouped (segment GEMMs)
cpu_kernel.py  the AVX-512 kernel in csrc/ for decode-sized segments, and its plan
group.py   LoRAGroup: sibling layers reading one input, one shrink per segment
layer.py   MultiLoRALinear with per-slot adapters, LoRAContext, LoRABatch
"""
from peft_methods.lora.config import ALL_LINEAR, LoRAAdapterConfig, get_pattern_key
from peft_methods.lora.layer import LoRABatch, LoRAContext, MultiLoRALinear
from peft_methods.lora.ops import lora_apply_grouped, lora_apply_ref, segments_from_slots
from peft_methods.lora.weights import AdapterLoadError, LoRAAdapter, load_adapter, save_adapter

__all__ = [
    "ALL_LINEAR",
    "AdapterLoadError",
    "LoRAAdapter",
    "LoRAAdapterConfig",
    "LoRABatch",
    "LoRAContext",
    "MultiLoRALinear",
    "get_pattern_key",
    "load_adapter",
    "lora_apply_grouped",
    "lora_apply_ref",
    "save_adapter",
    "segments_from_slots",
]
