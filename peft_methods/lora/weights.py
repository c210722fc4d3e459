"""LoRA adapter weights in Hugging Face PEFT format: load, validate, save.

An adapter on disk is a directory with `adapter_config.json` and
`adapter_model.safetensors` (or the older `adapter_model.bin`), tensors keyed
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight` (optionally with
the adapter name before `.weight`). In memory it is a `LoRAAdapter`: the config
plus `{module_name: (A [r, in], B [out, r])}` on CPU. Every problem with a file
raises `AdapterLoadError` naming the file and what is wrong.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peft_methods.lora.config import LoRAAdapterConfig

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
_KEY_PREFIX = "base_model.model."
# <module>.lora_A.weight or <module>.lora_A.<adapter_name>.weight
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class AdapterLoadError(ValueError):
    """An adapter directory or file is missing, corrupt or inconsistent."""


@dataclass
class LoRAAdapter:
    """One LoRA adapter in memory (it has no name: the manager names it)."""

    config: LoRAAdapterConfig
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """module name (e.g. model.layers.0.self_attn.q_proj) -> (A [r, in], B [out, r])."""

    def __post_init__(self) -> None:
        for module, pair in self.weights.items():
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise ValueError(f"weights[{module!r}] must be a pair (A, B)")
            lora_a, lora_b = pair
            if lora_a.dim() != 2 or lora_b.dim() != 2:
                raise ValueError(
                    f"{module}: A and B must be 2-D, got A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
                )
            if lora_a.shape[0] != lora_b.shape[1]:
                raise ValueError(
                    f"{module}: rank mismatch, A is {tuple(lora_a.shape)} [r, in] but "
                    f"B is {tuple(lora_b.shape)} [out, r]"
                )

    def rank_of(self, module_name: str) -> int:
        return self.weights[module_name][0].shape[0]

    @property
    def max_rank(self) -> int:
        return max((a.shape[0] for a, _ in self.weights.values()), default=0)


def load_adapter(path: str | os.PathLike) -> LoRAAdapter:
    """Load a PEFT LoRA adapter directory onto the CPU, validating it fully."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterLoadError(f"{root}: adapter directory not found")
    config_path = root / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterLoadError(f"{config_path}: missing adapter config")
    try:
        config = LoRAAdapterConfig.from_json_file(config_path)
    except (ValueError, OSError) as e:
        raise AdapterLoadError(f"{config_path}: {e}") from e

    weights_path, state = _read_state_dict(root)
    weights = _pair_lora_tensors(weights_path, state)
    for module, (lora_a, _) in weights.items():
        expected = config.rank_for(module)
        if lora_a.shape[0] != expected:
            raise AdapterLoadError(
                f"{weights_path}: {module} has rank {lora_a.shape[0]} but the config "
                f"(r / rank_pattern) says {expected}"
            )
    try:
        return LoRAAdapter(config=config, weights=weights)
    except ValueError as e:
        raise AdapterLoadError(f"{weights_path}: {e}") from e


def _read_state_dict(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    safetensors_path, bin_path = root / SAFETENSORS_NAME, root / BIN_NAME
    # NOTE: any exception from the readers means an unreadable file; name it.
    if safetensors_path.is_file():
        try:
            return safetensors_path, load_file(str(safetensors_path), device="cpu")
        except Exception as e:  # noqa: BLE001
            raise AdapterLoadError(f"{safetensors_path}: corrupt safetensors file ({e})") from e
    if bin_path.is_file():
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise AdapterLoadError(f"{bin_path}: unreadable torch file ({e})") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise AdapterLoadError(f"{bin_path}: expected a dict of tensors")
        return bin_path, state
    raise AdapterLoadError(f"{root}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found")


def _pair_lora_tensors(
    weights_path: Path, state: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names: set[str | None] = set()
    for key, tensor in state.items():
        name = key[len(_KEY_PREFIX):] if key.startswith(_KEY_PREFIX) else key
        match = _KEY_RE.match(name)
        if match is None:
            raise AdapterLoadError(
                f"{weights_path}: unsupported tensor {key!r} (only lora_A / lora_B weights of Linear layers)"
            )
        adapter_names.add(match["adapter"])
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    if len(adapter_names) > 1:
        found = sorted(n or "<none>" for n in adapter_names)
        raise AdapterLoadError(f"{weights_path}: tensors of several adapters in one file: {found}")
    if not halves:
        raise AdapterLoadError(f"{weights_path}: no LoRA weights in the file")

    weights = {}
    for module, pair in sorted(halves.items()):
        for ab in ("A", "B"):
            if ab not in pair:
                raise AdapterLoadError(f"{weights_path}: {module} has no lora_{ab} weight")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
            raise AdapterLoadError(
                f"{weights_path}: {module} shape mismatch, lora_A {tuple(lora_a.shape)} [r, in] "
                f"vs lora_B {tuple(lora_b.shape)} [out, r]"
            )
        weights[module] = (lora_a, lora_b)
    return weights


def save_adapter(adapter: LoRAAdapter, path: str | os.PathLike) -> None:
    """Write `adapter` in PEFT format under `path` (created if needed).

    Each file is written to a temporary name in the same directory and moved
    into place with os.replace, weights first, so a reader never sees a
    half-written file.
    """
    root = Path(path)
    config = adapter.config
    for module, (lora_a, _) in adapter.weights.items():
        if not config.is_target(module):
            raise ValueError(
                f"{module} has LoRA weights but target_modules={config.target_modules!r} does not "
                "target it; peft would ignore them"
            )
        if lora_a.shape[0] != config.rank_for(module):
            raise ValueError(
                f"{module} has rank {lora_a.shape[0]} but the config says {config.rank_for(module)}"
            )
    root.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for module, (lora_a, lora_b) in adapter.weights.items():
        # NOTE: clone so that safetensors never sees shared or strided storage.
        tensors[f"{_KEY_PREFIX}{module}.lora_A.weight"] = lora_a.detach().cpu().contiguous().clone()
        tensors[f"{_KEY_PREFIX}{module}.lora_B.weight"] = lora_b.detach().cpu().contiguous().clone()
    _write_atomic(root, SAFETENSORS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2, sort_keys=True)
    _write_atomic(root, CONFIG_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _write_atomic(root: Path, name: str, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, root / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
