"""LoRA adapter configuration, read from a Hugging Face PEFT `adapter_config.json`.

`LoRAAdapterConfig` keeps the fields that decide the forward math (ranks, alphas,
rsLoRA) and which modules an adapter targets, with peft's matching rules copied
exactly: `target_modules` as name suffixes, a regex, or "all-linear", and
`rank_pattern` / `alpha_pattern` keys resolved as peft's `get_pattern_key`.
PEFT features that change the forward in ways the batched op cannot express
(DoRA, LoRA bias, modules_to_save, ...) are rejected with a ValueError.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

ALL_LINEAR = "all-linear"
# NOTE: lm_head is excluded from "all-linear" as peft does for causal LMs.
OUTPUT_HEAD_NAME = "lm_head"

# PEFT config keys whose truthy value changes the forward (or the weight layout)
# in ways the batched multi-adapter op does not reproduce.
_UNSUPPORTED_FEATURES = {
    "use_dora": "DoRA (use_dora=true)",
    "fan_in_fan_out": "fan_in_fan_out=true (Conv1D-style transposed weights)",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
    "lora_bias": "lora_bias=true",
    "use_qalora": "QALoRA (use_qalora=true)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "layer_replication": "layer_replication",
    "target_parameters": "target_parameters (LoRA on raw parameters)",
    "trainable_token_indices": "trainable_token_indices",
    "arrow_config": "Arrow routing (arrow_config)",
    "kasa_config": "KaSA (kasa_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
}


def get_pattern_key(pattern_keys: Iterable[str], module_name: str) -> str:
    """Return the first pattern key matching `module_name`, else `module_name`.

    Semantics: identical to `peft.utils.other.get_pattern_key`: key `k` matches
    when `re.match(rf"(.*\\.)?({k})$", module_name)` does, so "q_proj" matches
    every q_proj and "layers.0.self_attn.q_proj" only layer 0's.
    """
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return module_name


def is_output_head(module_name: str) -> bool:
    return module_name == OUTPUT_HEAD_NAME or module_name.endswith("." + OUTPUT_HEAD_NAME)


@dataclass
class LoRAAdapterConfig:
    """What one LoRA adapter applies where, in peft's vocabulary."""

    r: int = 8
    """Default rank of every targeted module."""
    lora_alpha: float = 8
    """Default alpha; scaling is alpha / r (alpha / sqrt(r) with rsLoRA)."""
    target_modules: list[str] | str = field(default_factory=list)
    """Name suffixes (peft style), a regex fullmatched against the module name,
    or "all-linear" (every nn.Linear except lm_head)."""
    use_rslora: bool = False
    """Rank-stabilised LoRA: scaling = alpha / sqrt(r)."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank overrides; keys are regex suffixes (peft get_pattern_key)."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha overrides, keys as in rank_pattern."""
    base_model_name_or_path: str | None = None
    """The base model the adapter was trained on (informational)."""
    exclude_modules: list[str] | str | None = None
    """Modules never targeted: suffixes or a regex, as target_modules."""
    layers_to_transform: list[int] | int | None = None
    """Restrict targeting to these layer indices (peft semantics)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list used with layers_to_transform (e.g. "layers")."""

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        if isinstance(self.target_modules, str):
            if self.target_modules.lower() == ALL_LINEAR:
                self.target_modules = ALL_LINEAR
        elif self.target_modules is None:
            raise ValueError("target_modules is required (names, a regex or 'all-linear')")
        else:
            self.target_modules = list(self.target_modules)
            if not all(isinstance(t, str) for t in self.target_modules):
                raise ValueError(f"target_modules must be strings, got {self.target_modules!r}")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, rank in self.rank_pattern.items():
            if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                raise ValueError(f"rank_pattern[{key!r}] must be a positive integer, got {rank!r}")
        for key, alpha in self.alpha_pattern.items():
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
                raise ValueError(f"alpha_pattern[{key!r}] must be a number, got {alpha!r}")

    # -- per-module values -------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        key = get_pattern_key(self.rank_pattern.keys(), module_name)
        return self.rank_pattern.get(key, self.r)

    def alpha_for(self, module_name: str) -> float:
        key = get_pattern_key(self.alpha_pattern.keys(), module_name)
        return self.alpha_pattern.get(key, self.lora_alpha)

    def scaling_for(self, module_name: str) -> float:
        rank = self.rank_for(module_name)
        if self.use_rslora:
            return self.alpha_for(module_name) / math.sqrt(rank)
        return self.alpha_for(module_name) / rank

    def is_target(self, module_name: str) -> bool:
        """Whether peft would put LoRA on `module_name` (assumed to be a Linear).

        For "all-linear" every name but lm_head matches; the caller checks that
        the module really is an nn.Linear.
        """
        if self._is_excluded(module_name):
            return False
        targets = self.target_modules
        if targets == ALL_LINEAR:
            return not is_output_head(module_name)
        if isinstance(targets, str):
            return re.fullmatch(targets, module_name) is not None
        if not any(module_name == t or module_name.endswith("." + t) for t in targets):
            return False
        return self._in_transformed_layer(module_name)

    def _is_excluded(self, module_name: str) -> bool:
        excluded = self.exclude_modules
        if not excluded:
            return False
        if isinstance(excluded, str):
            return re.fullmatch(excluded, module_name) is not None
        return any(module_name == e or module_name.endswith("." + e) for e in excluded)

    def _in_transformed_layer(self, module_name: str) -> bool:
        # NOTE: mirrors peft's check_target_module_exists, which applies
        # layers_to_transform only to list-style target_modules.
        indexes = self.layers_to_transform
        if indexes is None or (isinstance(indexes, list) and not indexes):
            return True
        indexes = [indexes] if isinstance(indexes, int) else indexes
        patterns = self.layers_pattern
        if not patterns:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module_name)
        else:
            patterns = [patterns] if isinstance(patterns, str) else patterns
            match = None
            for pattern in patterns:
                match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", module_name)
                if match is not None:
                    break
        return match is not None and int(match.group("idx")) in indexes

    # -- PEFT json -------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "LoRAAdapterConfig":
        """Parse a PEFT adapter_config dict; ValueError names what is unsupported."""
        if not isinstance(raw, dict):
            raise ValueError(f"adapter config must be a JSON object, got {type(raw).__name__}")
        peft_type = raw.get("peft_type")
        if peft_type is None or str(peft_type).upper() != "LORA":
            raise ValueError(f"peft_type must be 'LORA', got {peft_type!r}")
        bias = raw.get("bias", "none")
        if bias not in (None, "none"):
            raise ValueError(f"bias={bias!r} is not supported (only 'none')")
        for key, what in _UNSUPPORTED_FEATURES.items():
            if raw.get(key):
                raise ValueError(f"{what} is not supported by multi-adapter serving")
        return cls(
            r=raw.get("r", 8),
            lora_alpha=raw.get("lora_alpha", 8),
            target_modules=raw.get("target_modules"),
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            exclude_modules=raw.get("exclude_modules"),
            layers_to_transform=raw.get("layers_to_transform"),
            layers_pattern=raw.get("layers_pattern"),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LoRAAdapterConfig":
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: malformed JSON ({e})") from e
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """The PEFT adapter_config.json content (fields peft needs to load it)."""
        targets = self.target_modules
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "target_modules": targets if isinstance(targets, str) else sorted(targets),
            "exclude_modules": self.exclude_modules,
            "layers_to_transform": self.layers_to_transform,
            "layers_pattern": self.layers_pattern,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": self.use_rslora,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "lora_dropout": 0.0,
            "modules_to_save": None,
            "inference_mode": True,
        }
