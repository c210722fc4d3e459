"""The plain Hugging Face + peft LoRA training loop that coserve's finetuning is checked against.

- `reference_train`: loads a base model and a saved peft adapter, runs the given
  optimizer steps with gradient accumulation, and returns the per-step losses and
  the final LoRA A/B weights (the engine's exactness test compares against these).
- `measure_peft_saved_bytes`: activation bytes autograd keeps for backward in a
  plain peft training forward (the memory baseline).
- `peft_train_throughput`: training tokens per second of the plain loop (the speed baseline).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.machine import synchronize

IGNORE_INDEX = -100
PAD_ID = 0
_PEFT_PREFIX = "base_model.model."
_LORA_A_SUFFIX = ".lora_A.default.weight"
_LORA_B_SUFFIX = ".lora_B.default.weight"
_SCHEDULERS = ("constant", "linear", "cosine")

Example = tuple[list[int], list[int]]
"""(input_ids, labels) in HF convention: labels[i] belongs to token i, the loss shifts; -100 = ignored."""


@dataclass
class ReferenceResult:
    """What `reference_train` returns: the numbers coserve's finetuning must reproduce."""

    losses: list[float]
    """One loss per optimizer step: summed token cross-entropy / number of target tokens of the step."""
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Base-model module name (e.g. "model.layers.0.self_attn.q_proj") -> (A [r, in], B [out, r]),
    fp32 CPU clones taken after the last step."""


def load_peft_for_training(model_dir, adapter_dir, dtype: torch.dtype = torch.float32):
    """Base model (default attention implementation) plus a trainable saved adapter, dropout forced to 0."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    config = LoraConfig.from_pretrained(str(adapter_dir))
    # NOTE: coserve trains without dropout; any dropout would make the reference non-deterministic.
    config.lora_dropout = 0.0
    model = PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=True)
    # NOTE: train() as a real loop would; with no dropout anywhere it computes the same as eval().
    model.train()
    return model


def lora_weights(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base-model module name -> (A, B) fp32 CPU clones of a peft model's default adapter."""
    params = dict(model.named_parameters())
    weights = {}
    for name, a in params.items():
        if name.endswith(_LORA_A_SUFFIX):
            module = name[: -len(_LORA_A_SUFFIX)].removeprefix(_PEFT_PREFIX)
            b = params[name[: -len(_LORA_A_SUFFIX)] + _LORA_B_SUFFIX]
            weights[module] = (a.detach().float().cpu().clone(), b.detach().float().cpu().clone())
    return weights


def count_targets(examples: list[Example]) -> int:
    """Target tokens of a group of examples: labels after the shift that are not ignored."""
    return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for _, labels in examples)


def pad_micro_batch(examples: list[Example], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, labels) tensors, each [batch, longest]."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        if len(ids) != len(lab):
            raise ValueError(f"example {row}: {len(ids)} input ids but {len(lab)} labels")
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def summed_token_loss(model, examples: list[Example]) -> torch.Tensor:
    """Sum over the micro-batch of shifted token cross-entropies, computed in fp32."""
    device = next(model.parameters()).device
    input_ids, attention_mask, labels = pad_micro_batch(examples, device)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # [batch, seq, vocab]
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def make_optimizer(params, optimizer: str, learning_rate: float, weight_decay: float, momentum: float,
                   adam_betas: tuple[float, float], adam_eps: float) -> torch.optim.Optimizer:
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=learning_rate, betas=adam_betas, eps=adam_eps,
                                 weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {optimizer!r}; expected 'adamw' or 'sgd'")


def make_scheduler(opt: torch.optim.Optimizer, lr_scheduler: str, warmup_steps: int, num_steps: int):
    from transformers import get_scheduler

    if lr_scheduler not in _SCHEDULERS:
        raise ValueError(f"unknown lr_scheduler {lr_scheduler!r}; expected one of {', '.join(_SCHEDULERS)}")
    # NOTE: HF's plain "constant" ignores warmup; "constant_with_warmup" is what a warmup asks for.
    name = "constant_with_warmup" if lr_scheduler == "constant" and warmup_steps > 0 else lr_scheduler
    return get_scheduler(name, opt, num_warmup_steps=warmup_steps, num_training_steps=num_steps)


def reference_train(model_dir, adapter_dir, steps: list[list[Example]], *, optimizer: str = "adamw",
                    learning_rate: float = 1e-4, weight_decay: float = 0.0, momentum: float = 0.0,
                    adam_betas: tuple[float, float] = (0.9, 0.999), adam_eps: float = 1e-8,
                    lr_scheduler: str = "constant", warmup_steps: int = 0, max_grad_norm: float | None = None,
                    micro_batch_size: int = 4, dtype: torch.dtype = torch.float32) -> ReferenceResult:
    """Train the adapter in `adapter_dir` on `steps` with plain transformers + peft.

    Args:
        steps: one list of examples per optimizer step; an example is (input_ids, labels)
            with labels in HF convention (same length, the model shifts, -100 ignored).
        micro_batch_size: examples per forward/backward; gradients accumulate over a step.
    Returns:
        the per-step losses (sum of token CEs over the whole step / the step's target
        count, not a mean of micro-batch means) and the LoRA weights after the last step.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    model = load_peft_for_training(model_dir, adapter_dir, dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, optimizer, learning_rate, weight_decay, momentum, adam_betas, adam_eps)
    scheduler = make_scheduler(opt, lr_scheduler, warmup_steps, len(steps))
    losses = []
    for index, examples in enumerate(steps):
        num_targets = count_targets(examples)
        if num_targets == 0:
            raise ValueError(f"step {index} has no target tokens")
        step_loss = 0.0
        for start in range(0, len(examples), micro_batch_size):
            loss = summed_token_loss(model, examples[start:start + micro_batch_size]) / num_targets
            loss.backward()
            step_loss += loss.item()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        scheduler.step()
        opt.zero_grad()
        losses.append(step_loss)
    return ReferenceResult(losses=losses, weights=lora_weights(model))


def fresh_peft_model(model_dir, lora_r: int, lora_alpha: int, dtype: torch.dtype):
    """Base from `model_dir` with a new all-linear LoRA (peft's init: B = 0), in training mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    config = LoraConfig(task_type="CAUSAL_LM", r=lora_r, lora_alpha=lora_alpha, target_modules="all-linear",
                        lora_dropout=0.0)
    model = get_peft_model(base, config)
    model.train()
    return model


def random_tokens(vocab_size: int, batch_size: int, seq_len: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch_size, seq_len), generator=gen)  # [batch, seq]


def measure_peft_saved_bytes(model_dir, seq_len: int = 512, batch_size: int = 1, lora_r: int = 16,
                             lora_alpha: int = 32, dtype: torch.dtype = torch.float32, seed: int = 0) -> dict:
    """Bytes autograd saves for backward in one plain peft training forward + loss.

    Every saved tensor's storage is counted once (views share it), and storages
    of the model's own parameters and buffers are left out: frozen weights are
    not activations. `num_saved_tensors` counts the saved tensors that were not
    parameters or buffers, views of one storage included.
    """
    model = fresh_peft_model(model_dir, lora_r, lora_alpha, dtype)
    weight_ptrs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}
    held: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weight_ptrs:
            # NOTE: holding the tensor keeps its address from being reused by a later
            # storage, which would then go uncounted under the same key.
            held.append(t)
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    input_ids = random_tokens(model.config.vocab_size, batch_size, seq_len, seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=input_ids, labels=input_ids).loss
    num_saved = len(held)
    held.clear()
    loss.backward()  # the graph must still be usable: nothing above may have broken it
    saved_bytes = sum(storages.values())
    tokens = batch_size * seq_len
    return {"saved_bytes": saved_bytes, "tokens": tokens, "saved_bytes_per_token": saved_bytes / tokens,
            "num_saved_tensors": num_saved}


def peft_train_throughput(model_dir, batch_size: int, seq_len: int, num_steps: int, *, lora_r: int = 16,
                          lora_alpha: int = 32, warmup_steps: int = 1, dtype: torch.dtype = torch.float32,
                          seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """Training tokens per second of the plain peft loop: forward with loss, backward, AdamW step.

    Sequences are random and unpadded, so every one of the batch_size * seq_len
    tokens of a step gets a forward and a backward. `warmup_steps` run untimed first.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    device = torch.device(device)
    model = fresh_peft_model(model_dir, lora_r, lora_alpha, dtype).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    input_ids = random_tokens(model.config.vocab_size, batch_size, seq_len, seed).to(device)

    def train_step() -> None:
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(warmup_steps):
        train_step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(num_steps):
        train_step()
    synchronize(device)
    seconds_per_step = (time.perf_counter() - start) / num_steps
    return {"tokens_per_s": batch_size * seq_len / seconds_per_step, "seconds_per_step": seconds_per_step,
            "batch_size": batch_size, "seq_len": seq_len}

