"""The inference benchmark's inputs: a seeded request mix and random PEFT LoRA adapters.

Requests carry random token ids (no tokenizer involved), exact output lengths
and an adapter name (None = base model). Adapters are written with the real
`peft` library (`get_peft_model` + `save_pretrained`) so the engine and the
Hugging Face baseline read the very same files; they are cached on disk.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

MIN_TOKEN_ID = 10
"""Random prompt ids are drawn from [MIN_TOKEN_ID, vocab): clear of the special tokens."""


@dataclass(frozen=True)
class Workload:
    """One batch of requests, all submitted at once."""

    prompts: list[list[int]]
    output_lens: list[int]
    adapters: list[str | None]
    """Adapter name per request; None = base model."""

    @property
    def num_requests(self) -> int:
        return len(self.prompts)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_tokens(self) -> int:
        """Useful tokens: each request's own prompt plus its own output."""
        return self.num_prompt_tokens + self.num_output_tokens

    def all_base(self) -> "Workload":
        return replace(self, adapters=[None] * self.num_requests)

    def prefill_only(self) -> "Workload":
        return replace(self, output_lens=[1] * self.num_requests)

    def variant(self, index: int, vocab_size: int) -> "Workload":
        """Same lengths and adapters, token ids shifted by `index` (so repeats never share a prefix)."""
        if index == 0:
            return self
        span = vocab_size - MIN_TOKEN_ID
        prompts = [[(t - MIN_TOKEN_ID + index) % span + MIN_TOKEN_ID for t in p] for p in self.prompts]
        return replace(self, prompts=prompts)

    def head(self, num_requests: int, max_output: int | None = None) -> "Workload":
        outs = self.output_lens[:num_requests]
        if max_output is not None:
            outs = [min(o, max_output) for o in outs]
        return Workload(self.prompts[:num_requests], outs, self.adapters[:num_requests])

    def summary(self) -> dict:
        return {"num_requests": self.num_requests, "num_prompt_tokens": self.num_prompt_tokens,
                "num_output_tokens": self.num_output_tokens,
                "num_base_requests": sum(a is None for a in self.adapters),
                "num_adapters_used": len({a for a in self.adapters if a is not None})}


def make_workload(num_requests: int, prompt_range: tuple[int, int], output_range: tuple[int, int],
                  vocab_size: int, adapter_names: list[str], base_fraction: float = 0.2,
                  seed: int = 0) -> Workload:
    """Seeded requests: lengths uniform in the inclusive ranges, token ids uniform in [10, vocab).

    round(base_fraction * n) requests (chosen at random) use the base model; the
    rest cycle over `adapter_names` in a shuffled order, so every adapter gets
    an equal share (+-1).
    """
    rng = random.Random(seed)
    prompt_lens = [rng.randint(*prompt_range) for _ in range(num_requests)]
    output_lens = [rng.randint(*output_range) for _ in range(num_requests)]
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(MIN_TOKEN_ID, vocab_size, (n,), generator=gen).tolist() for n in prompt_lens]
    num_base = round(base_fraction * num_requests) if adapter_names else num_requests
    on_base = set(rng.sample(range(num_requests), num_base))
    cycle = [adapter_names[i % len(adapter_names)] for i in range(num_requests - num_base)] if adapter_names else []
    rng.shuffle(cycle)
    it = iter(cycle)
    adapters = [None if i in on_base else next(it) for i in range(num_requests)]
    return Workload(prompts, output_lens, adapters)


def adapter_specs(ranks: list[int], per_rank: int) -> dict[str, int]:
    """Adapter name -> rank, `per_rank` adapters of each rank: {"r8-0": 8, ...}."""
    return {f"r{r}-{i}": r for r in ranks for i in range(per_rank)}


def make_peft_adapters(model_dir: str | Path, specs: dict[str, int], cache_root: str | Path,
                       seed: int = 0) -> dict[str, str]:
    """Write (or reuse) one PEFT LoRA adapter per spec on all linear layers; returns name -> directory.

    A ~ N(0, 1/in) and B ~ N(0, (0.02)^2 / r) from a seeded generator (B is
    non-zero so the adapters change the outputs), alpha = 2r.
    """
    key = hashlib.sha1(json.dumps([sorted(specs.items()), seed, str(model_dir)]).encode()).hexdigest()[:10]
    root = Path(cache_root) / f"adapters-{key}"
    paths = {name: str(root / name) for name in specs}
    if all((Path(p) / "adapter_config.json").is_file() for p in paths.values()):
        return paths

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    names = list(specs)
    peft_model = None
    for name in names:
        rank = specs[name]
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0,
                            init_lora_weights=False, task_type="CAUSAL_LM")
        if peft_model is None:
            peft_model = get_peft_model(base, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module_name, module in sorted(peft_model.named_modules()):
            if not hasattr(module, "lora_A") or not isinstance(module.lora_A, torch.nn.ModuleDict):
                continue
            for name in names:
                lora_a, lora_b = module.lora_A[name].weight, module.lora_B[name].weight
                lora_a.copy_(torch.randn(lora_a.shape, generator=gen) / lora_a.shape[1] ** 0.5)
                lora_b.copy_(torch.randn(lora_b.shape, generator=gen) * 0.02 / lora_b.shape[1] ** 0.5)
    # NOTE: no adapter is called "default", so peft writes each one to root/<name>.
    peft_model.save_pretrained(str(root))
    return paths
