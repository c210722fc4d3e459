"""Adapter manager: named LoRA adapters, a CPU cache, and the device slots.

Adapters are registered by name from a PEFT directory (validated against the
model at once) or from memory. Loaded adapters sit in a CPU LRU cache of
`max_cpu_loras` entries; evicted ones are reloaded from their path on demand,
and in-memory ones are pinned. `activate(names)` puts the adapters of one
iteration into the model's `max_loras` device slots, copying weights only on a
miss and evicting the least recently used slot. Every error leaves it usable.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from peft_methods.lora.layer import LoRAContext, MultiLoRALinear
from peft_methods.lora.weights import LoRAAdapter, load_adapter, save_adapter

logger = logging.getLogger(__name__)


class UnknownAdapterError(KeyError):
    """An adapter name that was never registered (or was unregistered)."""

    def __str__(self) -> str:
        # NOTE: KeyError.__str__ would print the message with quotes around it.
        return str(self.args[0]) if self.args else ""


@dataclass
class _Entry:
    path: str | None  # None: built in memory, pinned in the CPU cache


class AdapterManager:
    """Registry of named adapters and their placement in device slots."""

    def __init__(
        self,
        model: nn.Module,
        context: LoRAContext,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int,
        device: torch.device | str,
        dtype: torch.dtype,
    ) -> None:
        for label, value in (("max_loras", max_loras), ("max_lora_rank", max_lora_rank),
                             ("max_cpu_loras", max_cpu_loras)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        self.layers: dict[str, MultiLoRALinear] = {
            name: m for name, m in model.named_modules() if isinstance(m, MultiLoRALinear)
        }
        if not self.layers:
            raise ValueError("the model has no MultiLoRALinear layers; run inject_adapters first")
        for name, layer in self.layers.items():
            if layer.max_loras < max_loras:
                raise ValueError(f"{name} has {layer.max_loras} slots but max_loras is {max_loras}")
            if layer.context is not context:
                raise ValueError(f"{name} was injected with a different LoRAContext")
            weight = layer.weight
            if weight.dtype != dtype or weight.device.type != torch.device(device).type:
                raise ValueError(
                    f"{name} weight is {weight.dtype} on {weight.device}, but the manager was given "
                    f"{dtype} on {device}; inject and place the model first"
                )
        self.context = context
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.device = torch.device(device)
        self.dtype = dtype
        self._entries: dict[str, _Entry] = {}  # registration order
        self._pinned: dict[str, LoRAAdapter] = {}
        self._cpu_cache: OrderedDict[str, LoRAAdapter] = OrderedDict()  # LRU first
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # LRU first
        self.num_disk_loads = 0
        self.num_slot_loads = 0

    # ---- registry ---------------------------------------------------------------------

    def register(self, name: str, path: str | os.PathLike) -> None:
        """Load and validate the PEFT adapter at `path` under `name`.

        Re-registering a name with the same path is a no-op.

        Raises:
            AdapterLoadError: unreadable or inconsistent files.
            ValueError: name taken by another adapter, rank above max_lora_rank,
                or a module the model has no wrapped linear for.
        """
        self._check_name(name)
        path = os.path.realpath(os.fspath(path))
        entry = self._entries.get(name)
        if entry is not None:
            if entry.path == path:
                return
            where = entry.path or "memory"
            raise ValueError(f"adapter {name!r} is already registered (from {where}); unregister it first")
        adapter = self._load_checked(path)
        self._entries[name] = _Entry(path=path)
        self._cache_put(name, adapter)
        logger.info("registered adapter %r from %s (max rank %d)", name, path, adapter.max_rank)

    def register_weights(self, name: str, adapter: LoRAAdapter) -> None:
        """Register an adapter built in memory; it stays pinned in the CPU cache."""
        self._check_name(name)
        if name in self._entries:
            raise ValueError(f"adapter {name!r} is already registered; unregister it first")
        self._validate(adapter, source="in-memory adapter")
        self._entries[name] = _Entry(path=None)
        self._pinned[name] = adapter

    def update_weights(self, name: str, adapter: LoRAAdapter) -> None:
        """Replace an in-memory adapter's weights (a finetuning step); a resident slot is rewritten."""
        self._require(name)
        if name not in self._pinned:
            raise ValueError(f"adapter {name!r} was loaded from a file; only in-memory adapters are updated")
        self._validate(adapter, source=f"update of {name!r}")
        self._pinned[name] = adapter
        slot = self._slot_of.get(name)
        if slot is not None:
            self._load_into_slot(name, adapter, slot)

    def validate(self, adapter: LoRAAdapter, source: str) -> None:
        """Raise ValueError if the adapter does not fit the model or max_lora_rank."""
        self._validate(adapter, source)

    def unregister(self, name: str) -> None:
        """Forget `name` and free its device slot."""
        self._require(name)
        slot = self._slot_of.pop(name, None)
        if slot is not None:
            for layer in self.layers.values():
                layer.clear_slot(slot)
        del self._entries[name]
        self._pinned.pop(name, None)
        self._cpu_cache.pop(name, None)

    def names(self) -> list[str]:
        return list(self._entries)

    def has(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> LoRAAdapter:
        """The adapter's CPU weights, reloading from its path if evicted."""
        self._require(name)
        if name in self._pinned:
            return self._pinned[name]
        if name in self._cpu_cache:
            self._cpu_cache.move_to_end(name)
            return self._cpu_cache[name]
        adapter = self._load_checked(self._entries[name].path)
        self._cache_put(name, adapter)
        return adapter

    def save(self, name: str, path: str | os.PathLike) -> None:
        """Write adapter `name` to `path` in PEFT format."""
        save_adapter(self.get(name), path)

    # ---- device slots -----------------------------------------------------------------

    def active(self) -> dict[str, int]:
        """Adapters now in device slots: name -> slot."""
        return dict(self._slot_of)

    def residency(self) -> dict:
        """Where each registered adapter lives now (read-only; for stats and the dashboard).

        Returns: {"max_loras", "max_cpu_loras", "device": {name: slot}, "cpu": [names in the
        LRU cache, least recently used first], "pinned": [in-memory adapters, never evicted],
        "on_disk": [registered from a path but evicted from the CPU cache]}.
        """
        cached = set(self._cpu_cache) | set(self._pinned)
        return {"max_loras": self.max_loras, "max_cpu_loras": self.max_cpu_loras,
                "device": dict(self._slot_of), "cpu": list(self._cpu_cache), "pinned": list(self._pinned),
                "on_disk": [name for name in self._entries if name not in cached]}

    def activate(self, names: set[str]) -> dict[str, int]:
        """Make every adapter in `names` resident in a device slot; return name -> slot.

        Resident adapters are not copied again. Slots of adapters outside
        `names` are reused least recently used first.
        """
        names = set(names)
        for name in sorted(names):
            self._require(name)
        if len(names) > self.max_loras:
            raise ValueError(f"{len(names)} adapters requested at once but max_loras is {self.max_loras}")
        for name in sorted(names):
            if name in self._slot_of:
                self._slot_of.move_to_end(name)
            else:
                adapter = self.get(name)  # may raise; nothing resident is evicted yet
                self._load_into_slot(name, adapter, self._free_slot(keep=names))
        return {name: self._slot_of[name] for name in names}

    def _free_slot(self, keep: set[str]) -> int:
        used = set(self._slot_of.values())
        for slot in range(self.max_loras):
            if slot not in used:
                return slot
        victim = next(n for n in self._slot_of if n not in keep)  # LRU first
        return self._slot_of.pop(victim)

    def _load_into_slot(self, name: str, adapter: LoRAAdapter, slot: int) -> None:
        config = adapter.config
        try:
            for module_name, layer in self.layers.items():
                pair = adapter.weights.get(module_name)
                if pair is None:
                    layer.clear_slot(slot)
                    continue
                layer.set_slot(slot, pair[0], pair[1], config.scaling_for(module_name))
        except BaseException:
            # NOTE: a half-written slot must not serve anyone: empty it everywhere.
            for layer in self.layers.values():
                layer.clear_slot(slot)
            raise
        self._slot_of[name] = slot
        self.num_slot_loads += 1

    # ---- helpers ----------------------------------------------------------------------

    def _load_checked(self, path: str) -> LoRAAdapter:
        adapter = load_adapter(path)
        self.num_disk_loads += 1
        self._validate(adapter, source=path)
        return adapter

    def _validate(self, adapter: LoRAAdapter, source: str) -> None:
        for module_name, (lora_a, lora_b) in adapter.weights.items():
            layer = self.layers.get(module_name)
            if layer is None:
                raise ValueError(f"{source}: target module {module_name} not found in the model")
            rank = lora_a.shape[0]
            if rank > self.max_lora_rank:
                raise ValueError(
                    f"{source}: {module_name} has rank {rank}, above max_lora_rank={self.max_lora_rank}"
                )
            if lora_a.shape[1] != layer.in_features or lora_b.shape[0] != layer.out_features:
                raise ValueError(
                    f"{source}: {module_name} LoRA shapes A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)} "
                    f"do not fit Linear({layer.in_features} -> {layer.out_features})"
                )

    def _cache_put(self, name: str, adapter: LoRAAdapter) -> None:
        self._cpu_cache[name] = adapter
        self._cpu_cache.move_to_end(name)
        while len(self._cpu_cache) > self.max_cpu_loras:
            evicted, _ = self._cpu_cache.popitem(last=False)
            logger.debug("adapter %r evicted from the CPU cache", evicted)

    def _require(self, name: str) -> None:
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r}; known adapters: {known}")

    @staticmethod
    def _check_name(name: str) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
