"""The body of `POST /v1/fine_tuning/jobs`, checked field by field, and its mapping to a `FinetuneConfig`.

OpenAI's fields: model, training_file, validation_file, hyperparameters
(or method.supervised.hyperparameters), suffix, seed, metadata, integrations.
LoRA settings arrive in the extra field `lora` (peft.LoraConfig's arguments;
the `openai` client sends it via `extra_body`). Every problem is an APIError
400 whose `param` names the field. "auto" hyperparameters resolve to the
documented defaults below once the training file's row count is known.
"""
from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

from coserve.api.errors import APIError
from coserve.config import FinetuneConfig

BASE_LEARNING_RATE = 2e-4
"""AdamW learning rate for learning_rate_multiplier=1 (a common LoRA rate); the job uses base x multiplier."""
AUTO_N_EPOCHS = 3
AUTO_MAX_BATCH_SIZE = 8
"""batch_size="auto" = rows // 16 clamped to [1, 8]: at least ~16 optimizer steps per epoch on small files."""
MAX_N_EPOCHS = 50
MAX_BATCH_SIZE = 256
DEFAULT_MAX_SEQ_LEN = 1024
"""Training sequences are truncated to min(this, the model's maximum length)."""
DEFAULT_LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0}
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
_FIELDS = {"model", "training_file", "validation_file", "hyperparameters", "method", "suffix", "seed",
           "metadata", "integrations", "lora"}
_SUFFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@dataclass
class JobRequest:
    model: str
    training_file: str
    validation_file: str | None
    hyperparameters: dict
    """n_epochs, batch_size, learning_rate_multiplier: each a number or "auto"."""
    suffix: str | None
    seed: int
    lora: dict | None
    """The `lora` extra field as given (None = DEFAULT_LORA)."""
    metadata: dict | None


def parse_job_request(body: dict) -> JobRequest:
    """Check types and ranges of every field (store lookups, e.g. of file ids, come later)."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}; accepted: {', '.join(sorted(_FIELDS))}", param=unknown[0])
    model = _required_string(body, "model")
    training_file = _required_string(body, "training_file")
    validation_file = body.get("validation_file")
    if validation_file is not None and not isinstance(validation_file, str):
        raise APIError(400, "validation_file must be a file id string", param="validation_file")
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not _SUFFIX_RE.match(suffix)):
        raise APIError(400, f"suffix must be 1 to 64 characters of letters, digits, '.', '_' or '-', got {suffix!r}",
                       param="suffix")
    seed = body.get("seed")
    if seed is None:
        seed = random.randrange(2**31)   # OpenAI picks one when none is given; it is reported on the job
    elif isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise APIError(400, f"seed must be an integer in [0, 2**31), got {seed!r}", param="seed")
    if body.get("integrations"):
        raise APIError(400, "integrations are not supported by this server", param="integrations")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or not all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512 for k, v in metadata.items())):
        raise APIError(400, "metadata must be at most 16 string keys (<= 64 chars) with string values (<= 512 chars)",
                       param="metadata")
    lora = body.get("lora")
    if lora is not None:
        build_lora_config(lora)   # 400 now rather than a failed job later
    return JobRequest(model=model, training_file=training_file, validation_file=validation_file,
                      hyperparameters=_hyperparameters(body), suffix=suffix, seed=seed, lora=lora, metadata=metadata)


def _required_string(body: dict, field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise APIError(400, f"{field} is required (a string)", param=field)
    return value


def _hyperparameters(body: dict) -> dict:
    given, prefix = body.get("hyperparameters"), "hyperparameters"
    method = body.get("method")
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            kind = method.get("type") if isinstance(method, dict) else method
            raise APIError(400, f"method type {kind!r} is not supported; only 'supervised'", param="method.type")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict):
            raise APIError(400, "method.supervised must be an object", param="method.supervised")
        if supervised.get("hyperparameters") is not None:
            if given is not None:
                raise APIError(400, "give hyperparameters either at the top level or in "
                               "method.supervised.hyperparameters, not both", param="hyperparameters")
            given, prefix = supervised["hyperparameters"], "method.supervised.hyperparameters"
    given = {} if given is None else given
    if not isinstance(given, dict):
        raise APIError(400, f"{prefix} must be an object", param=prefix)
    for name in given:
        if name not in HYPERPARAMETERS:
            raise APIError(400, f"unknown hyperparameter {name!r}; supported: {', '.join(HYPERPARAMETERS)}",
                           param=f"{prefix}.{name}")
    out = {name: given.get(name, "auto") for name in HYPERPARAMETERS}
    for name, maximum in (("n_epochs", MAX_N_EPOCHS), ("batch_size", MAX_BATCH_SIZE)):
        value = out[name]
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum):
            raise APIError(400, f"{name} must be 'auto' or an integer from 1 to {maximum}, got {value!r}",
                           param=f"{prefix}.{name}")
    value = out["learning_rate_multiplier"]
    if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))
                            or not math.isfinite(value) or value <= 0):
        raise APIError(400, f"learning_rate_multiplier must be 'auto' or a positive number, got {value!r}",
                       param=f"{prefix}.learning_rate_multiplier")
    return out


def build_lora_config(lora: dict | None):
    """peft.LoraConfig from DEFAULT_LORA updated with `lora`; APIError 400 (param "lora") if peft or the
    engine would refuse it."""
    from peft import LoraConfig

    from coserve.finetune.peft_config import lora_config_from_peft

    if lora is not None and not isinstance(lora, dict):
        raise APIError(400, "lora must be an object of peft.LoraConfig arguments, e.g. "
                       '{"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}', param="lora")
    try:
        config = LoraConfig(**{**DEFAULT_LORA, **(lora or {})})
        lora_config_from_peft(config)
    except (TypeError, ValueError) as err:
        raise APIError(400, f"bad LoRA settings: {err}", param="lora") from err
    return config


def resolve_hyperparameters(hyperparameters: dict, num_rows: int) -> dict:
    """Replace "auto" by the defaults documented at the top of this module."""
    auto = {"n_epochs": AUTO_N_EPOCHS, "batch_size": max(1, min(AUTO_MAX_BATCH_SIZE, num_rows // 16)),
            "learning_rate_multiplier": 1.0}
    return {name: auto[name] if value == "auto" else value for name, value in hyperparameters.items()}


def plan_steps(hyperparameters: dict, num_rows: int) -> tuple[int, int]:
    """(max_steps, steps_per_epoch) for resolved hyperparameters: ceil(n_epochs * rows / batch_size)."""
    batch_size = hyperparameters["batch_size"]
    return (math.ceil(hyperparameters["n_epochs"] * num_rows / batch_size), math.ceil(num_rows / batch_size))


def finetune_config(record: dict, rows: list[dict], *, resume: bool = False) -> FinetuneConfig:
    """The engine's job for a job record (see FineTuningJobs); checkpoints at every epoch's end.

    Args:
        resume: continue from the latest checkpoint in the record's output_dir (after a restart).
    """
    hp = record["hyperparameters"]
    return FinetuneConfig(
        adapter=record["model_name"], dataset=rows,
        # NOTE: continuing a fine-tuned model keeps its own LoRA shape (init_adapter's config).
        peft=None if record.get("init_adapter") else build_lora_config(record["lora"]),
        init_adapter=record.get("init_adapter"), max_steps=record["max_steps"], batch_size=hp["batch_size"],
        learning_rate=BASE_LEARNING_RATE * hp["learning_rate_multiplier"], optimizer="adamw",
        lr_scheduler="linear", max_grad_norm=1.0, max_seq_len=record["max_seq_len"], seed=record["seed"],
        output_dir=record["output_dir"], save_steps=record["save_steps"],
        resume_from_checkpoint=True if resume else None)
