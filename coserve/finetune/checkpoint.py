"""Finetuning checkpoints on disk: write one atomically, find the latest, read one back to resume.

A checkpoint is `output_dir/checkpoint-<step>/`: the adapter in PEFT format and
`training_state.pt` (step, losses, tokens trained, optimizer and lr-schedule
state, the adapted modules in optimizer parameter order, and the job's
identity: the data fingerprint and settings a resumed job must share). It is
written under a `.checkpoint-<step>-*` temporary name and renamed into place,
so a `checkpoint-<n>` directory is complete or absent. Reading checks
everything a resume relies on; a bad checkpoint raises ValueError naming it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from array import array
from dataclasses import dataclass
from pathlib import Path

import torch

from coserve.config import FinetuneConfig
from coserve.finetune.dataset import TrainingExample
from peft_methods.lora.weights import CONFIG_NAME, LoRAAdapter, load_adapter, save_adapter

TRAINING_STATE_NAME = "training_state.pt"
FORMAT_VERSION = 1
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")

# Settings that change what optimizer step k computes: a resumed job must share them
# (the optimizer's state dict would otherwise silently bring back the old lr, betas, ...).
IDENTITY_FIELDS = ("sequences_per_step", "seed", "shuffle", "max_steps", "optimizer", "learning_rate",
                   "weight_decay", "momentum", "adam_betas", "adam_eps", "lr_scheduler", "warmup_steps",
                   "max_grad_norm")
_REQUIRED_STATE = {"format_version": int, "step": int, "losses": list, "tokens_trained": int,
                   "checkpoints": list, "optimizer": dict, "lr_scheduler": dict, "param_modules": list,
                   "identity": dict}


@dataclass
class Checkpoint:
    """A checkpoint read back and checked, ready to resume from."""

    path: str
    adapter: LoRAAdapter
    """The saved weights and LoRA config; modules in the job's optimizer parameter order."""
    state: dict
    """The contents of training_state.pt."""

    @property
    def step(self) -> int:
        return self.state["step"]


def job_identity(config: FinetuneConfig, examples: list[TrainingExample]) -> dict:
    """What makes two runs the same job: the tokenized data and the settings in IDENTITY_FIELDS."""
    identity = {"num_examples": len(examples), "dataset_fingerprint": data_fingerprint(examples)}
    identity.update({name: getattr(config, name) for name in IDENTITY_FIELDS})
    identity["adam_betas"] = tuple(identity["adam_betas"])
    return identity


def data_fingerprint(examples: list[TrainingExample]) -> str:
    """sha256 of every example's token ids and labels, in order (so packing and max_seq_len count too)."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(array("q", [len(example.input_ids)]).tobytes())
        digest.update(array("q", example.input_ids).tobytes())
        digest.update(array("q", example.labels).tobytes())
    return digest.hexdigest()


# ---- writing ----------------------------------------------------------------------------------


def write_checkpoint(output_dir: str | os.PathLike, step: int, adapter: LoRAAdapter, state: dict) -> str:
    """Write output_dir/checkpoint-<step>/ atomically (an older one of that step is replaced); returns its path."""
    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=root))
    try:
        save_adapter(adapter, tmp)
        torch.save(state, tmp / TRAINING_STATE_NAME)
        # NOTE: os.replace cannot rename onto a non-empty directory, so a stale one goes first.
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(final)


# ---- finding and reading ----------------------------------------------------------------------


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete `checkpoint-<n>` directory with the highest n in output_dir, or None.

    Complete = holds training_state.pt and the adapter config; the `.checkpoint-*`
    temporary directories of an interrupted write never match the name.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for entry in root.iterdir():
        match = _CHECKPOINT_RE.match(entry.name)
        if match is None or not (entry / TRAINING_STATE_NAME).is_file() or not (entry / CONFIG_NAME).is_file():
            continue
        step = int(match.group(1))
        if best is None or step > best[0]:
            best = (step, entry)
    return str(best[1]) if best is not None else None


def resume_path(config: FinetuneConfig) -> str | None:
    """The checkpoint directory `config.resume_from_checkpoint` names, or None for a fresh job."""
    value = config.resume_from_checkpoint
    if value is None:
        return None
    if value is True:
        path = latest_checkpoint(config.output_dir)
        if path is None:
            raise ValueError(f"resume_from_checkpoint=True, but output_dir {config.output_dir!r} holds no "
                             "checkpoint-<step> directory; pass a checkpoint's path or start without resuming")
        return path
    return str(value)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and check a checkpoint directory; ValueError naming the path if anything is wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"resume_from_checkpoint: {root} is not a directory; expected "
                         "output_dir/checkpoint-<step>/ written by a job with save_steps")
    state_path = root / TRAINING_STATE_NAME
    if not state_path.is_file():
        raise ValueError(f"resume_from_checkpoint: {state_path} is missing; {root} is not a finetuning "
                         "checkpoint (a plain adapter directory can be continued with init_adapter)")
    try:
        # NOTE: weights_only: the file holds tensors and plain containers only, never code to run.
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first_line = (str(exc).splitlines() or [""])[0][:200]
        raise ValueError(f"resume_from_checkpoint: cannot read {state_path}, the file is corrupt "
                         f"({type(exc).__name__}: {first_line})") from exc
    _check_state(state, state_path)
    adapter = load_adapter(root)   # AdapterLoadError (a ValueError) names the bad file
    modules = state["param_modules"]
    if sorted(modules) != sorted(adapter.weights):
        raise ValueError(f"resume_from_checkpoint: {root}: the adapter's modules do not match the "
                         f"optimizer's parameters in {TRAINING_STATE_NAME}; the checkpoint is corrupt")
    # NOTE: optimizer state is keyed by parameter position, so the weights must come back in the
    # order the job built its parameters, whatever order the safetensors file keeps.
    ordered = LoRAAdapter(config=adapter.config, weights={m: adapter.weights[m] for m in modules})
    return Checkpoint(str(root), ordered, state)


def _check_state(state: object, state_path: Path) -> None:
    def bad(why: str) -> ValueError:
        return ValueError(f"resume_from_checkpoint: {state_path}: {why}; the checkpoint is corrupt or "
                          "was written by another version")

    if not isinstance(state, dict):
        raise bad(f"expected a dict, found {type(state).__name__}")
    for key, kind in _REQUIRED_STATE.items():
        if not isinstance(state.get(key), kind):
            raise bad(f"field {key!r} is missing or not a {kind.__name__}")
    if state["format_version"] != FORMAT_VERSION:
        raise bad(f"format_version {state['format_version']} (this version reads {FORMAT_VERSION})")
    max_steps = state["identity"].get("max_steps")
    if not isinstance(max_steps, int) or not 0 <= state["step"] <= max_steps:
        raise bad(f"step {state['step']} is outside 0..max_steps ({max_steps!r})")
    if len(state["losses"]) != state["step"]:
        raise bad(f"{len(state['losses'])} losses for {state['step']} steps")


def check_same_job(checkpoint: Checkpoint, identity: dict) -> None:
    """Raise ValueError naming the first field in which this job differs from the checkpoint's."""
    saved = checkpoint.state["identity"]
    for name, value in identity.items():
        if name not in saved:
            raise ValueError(f"resume_from_checkpoint: {checkpoint.path} does not record {name!r}; "
                             "it cannot be checked to belong to this job")
        if saved[name] == value:
            continue
        if name == "dataset_fingerprint":
            raise ValueError(f"resume_from_checkpoint: {checkpoint.path} was trained on other data (same "
                             "number of examples, different tokens); resume needs the same dataset, "
                             "max_seq_len and packing")
        raise ValueError(f"resume_from_checkpoint: {checkpoint.path} was written with {name}={saved[name]!r}, "
                         f"this job has {name}={value!r}; a resumed job must keep the same {name}")
