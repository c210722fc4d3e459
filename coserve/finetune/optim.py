"""Optimizer and learning-rate schedule of a finetuning job, from its FinetuneConfig.

Plain torch optimizers (AdamW, SGD with momentum) and transformers' schedules
(constant, linear, cosine, each with linear warmup), so a job steps exactly as
a Hugging Face training loop with the same settings would.
"""
from __future__ import annotations

import torch
from transformers import get_scheduler

from coserve.config import FinetuneConfig


def build_optimizer(config: FinetuneConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas, eps=config.adam_eps,
                                 weight_decay=config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                               weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")


def build_lr_scheduler(config: FinetuneConfig, optimizer: torch.optim.Optimizer):
    name = config.lr_scheduler
    if name == "constant" and config.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps,
                         num_training_steps=config.max_steps)
