"""OpenAI objects made from a fine-tuning job record: `fine_tuning.job`, `.event`, `.checkpoint`.

Pure functions over the record dict kept by `FineTuningJobs` (call them under
its lock). Beyond OpenAI's fields, a job shows its resolved `lora` settings;
OpenAI's `trained_tokens` stays null until the job ends, as OpenAI documents.
"""
from __future__ import annotations

import time

ORGANIZATION_ID = "org-coserve"
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")


def job_object(record: dict) -> dict:
    hp = dict(record["hyperparameters"])
    return {
        "id": record["id"], "object": "fine_tuning.job", "created_at": record["created_at"],
        "finished_at": record["finished_at"], "model": record["model"],
        "fine_tuned_model": record["fine_tuned_model"], "organization_id": ORGANIZATION_ID,
        "status": record["status"], "error": record["error"],
        "trained_tokens": record["tokens_trained"] if record["status"] in TERMINAL_STATUSES else None,
        "hyperparameters": hp, "training_file": record["training_file"],
        "validation_file": record["validation_file"], "result_files": list(record["result_files"]),
        "seed": record["seed"], "estimated_finish": estimated_finish(record), "integrations": [],
        "metadata": record["metadata"], "user_provided_suffix": record["suffix"],
        "method": {"type": "supervised", "supervised": {"hyperparameters": dict(hp)}},
        "lora": record["lora"],
    }


def event_objects(record: dict) -> list[dict]:
    """Newest first, as OpenAI lists them."""
    return [{"object": "fine_tuning.job.event", **event} for event in reversed(record["events"])]


def checkpoint_objects(record: dict) -> list[dict]:
    """Newest first; metrics carry the loss of the checkpoint's step."""
    out = []
    for c in sorted(record["checkpoints"], key=lambda c: c["step"], reverse=True):
        loss = record["losses"][c["step"] - 1] if len(record["losses"]) >= c["step"] else None
        out.append({"id": f"ftckpt-{record['id'][6:]}-{c['step']}", "object": "fine_tuning.job.checkpoint",
                    "created_at": c["created_at"], "fine_tuning_job_id": record["id"],
                    "fine_tuned_model_checkpoint": f"{record['model_name']}:ckpt-step-{c['step']}",
                    "step_number": c["step"], "metrics": {"step": c["step"], "train_loss": loss}})
    return out


def estimated_finish(record: dict) -> int | None:
    """Start time + elapsed time scaled to max_steps, while running; None otherwise."""
    if record["status"] != "running" or not record["started_at"] or not record["losses"]:
        return None
    elapsed = time.time() - record["started_at"]
    return int(record["started_at"] + elapsed * record["max_steps"] / len(record["losses"]))
