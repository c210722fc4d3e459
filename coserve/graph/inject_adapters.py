"""Graph pass 1: wrap target nn.Linear layers in multi-adapter LoRA layers.

`inject_adapters` replaces each targeted linear of the model, in place, with a
`MultiLoRALinear` holding the original as `base_layer`, all sharing one
`LoRAContext`. Targets use peft's rules: name suffixes ("q_proj",
"self_attn.o_proj"), full names, a regex fullmatched against the module name,
or "all-linear". The output head (lm_head) is never wrapped.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from peft_methods.lora.config import ALL_LINEAR, is_output_head
from peft_methods.lora.layer import LoRAContext, MultiLoRALinear
from peft_methods.lora.group import LoRAGroup


@dataclass
class InjectReport:
    """What inject_adapters changed."""

    wrapped: list[str] = field(default_factory=list)
    """Names of the modules now MultiLoRALinear, in model order."""
    max_loras: int = 0
    """Adapter slots per wrapped layer."""
    shared_shrinks: list[list[str]] = field(default_factory=list)
    """Groups of wrapped siblings that read one input and share one shrink GEMM."""


def inject_adapters(
    model: nn.Module,
    target_module_names: Iterable[str] | str,
    max_loras: int,
    context: LoRAContext,
    shared_input_groups: Iterable[Iterable[str]] = (),
) -> InjectReport:
    """Wrap the target linears of `model` in MultiLoRALinear, in place.

    Args:
        target_module_names: names matched as peft does (equal, or a suffix
            after a dot), "all-linear" (every nn.Linear but lm_head), or any
            other string as a regex fullmatched against the module name.
        max_loras: device adapter slots in each wrapped layer.
        context: the LoRAContext shared by every wrapped layer.
        shared_input_groups: child names of one parent that read the same input (e.g.
            ("q_proj", "k_proj", "v_proj")); wrapped siblings of a group share one LoRAGroup,
            whose shrink reads their input once.

    Raises:
        ValueError: a target that matches no module, matches a module that is
            not an nn.Linear or is lm_head, is already wrapped, or max_loras <= 0.
    """
    if isinstance(max_loras, bool) or not isinstance(max_loras, int) or max_loras <= 0:
        raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
    matches = _find_targets(model, target_module_names)
    output_head = _output_head(model)
    for name, module in matches:
        if isinstance(module, MultiLoRALinear):
            raise ValueError(f"{name} is already a MultiLoRALinear (inject_adapters ran twice?)")
        if module is output_head or is_output_head(name):
            raise ValueError(f"{name} is the output head; LoRA on lm_head is not supported")
        if not isinstance(module, nn.Linear):
            raise ValueError(f"target module {name} is a {type(module).__name__}, not an nn.Linear")
    report = InjectReport(max_loras=max_loras)
    for name, module in matches:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, MultiLoRALinear(module, max_loras, context))
        report.wrapped.append(name)
    report.shared_shrinks = _share_shrinks(model, report.wrapped, [tuple(g) for g in shared_input_groups])
    return report


def _share_shrinks(model: nn.Module, wrapped: list[str], groups: list[tuple[str, ...]]) -> list[list[str]]:
    by_parent: dict[str, set[str]] = {}
    for name in wrapped:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, set()).add(child)
    shared = []
    for parent, children in by_parent.items():
        for group in groups:
            members = [child for child in group if child in children]
            if len(members) >= 2:
                names = [f"{parent}.{child}" if parent else child for child in members]
                LoRAGroup([model.get_submodule(n) for n in names])
                shared.append(names)
    return shared


def _find_targets(model: nn.Module, targets: Iterable[str] | str) -> list[tuple[str, nn.Module]]:
    # NOTE: modules inside an existing MultiLoRALinear (its base_layer) are
    # never candidates, so a second pass finds the wrapper and reports it.
    candidates, wrapped_prefixes = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in wrapped_prefixes):
            continue
        if isinstance(module, MultiLoRALinear):
            wrapped_prefixes.append(name + ".")
        candidates.append((name, module))

    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        head = _output_head(model)
        return [
            (name, m) for name, m in candidates
            if isinstance(m, (nn.Linear, MultiLoRALinear)) and m is not head and not is_output_head(name)
        ]
    if isinstance(targets, str):
        found = [(name, m) for name, m in candidates if re.fullmatch(targets, name)]
        if not found:
            raise ValueError(f"target module regex {targets!r} matches no module of the model")
        return found
    targets = list(targets)
    if not targets:
        raise ValueError("target_module_names is empty")
    found = []
    for target in targets:
        hits = [(n, m) for n, m in candidates if n == target or n.endswith("." + target)]
        if not hits:
            raise ValueError(f"target module {target!r} not found in the model")
        found.extend(hits)
    # Several targets may hit one module; keep model order, once each.
    order = {name: i for i, (name, _) in enumerate(candidates)}
    return sorted(dict(found).items(), key=lambda item: order[item[0]])


def _output_head(model: nn.Module) -> nn.Module | None:
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    if callable(get_output_embeddings):
        try:
            return get_output_embeddings()
        except (AttributeError, NotImplementedError):
            return None
    return None
