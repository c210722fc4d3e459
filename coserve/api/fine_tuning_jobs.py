"""The OpenAI fine-tuning job table: records on disk, engine jobs behind them, events and checkpoints.

Each job lives in `data_dir/fine_tuning/<job id>/`: `job.json` (the record,
rewritten atomically on every status change, at most every SAVE_INTERVAL_S for new steps) and `adapter/` (the engine job's
output_dir: final adapter and `checkpoint-<step>/` at every epoch's end). A
job is created in "validating_files" and handed to `backend.finetune` on a
thread (it blocks while it tokenizes); after that a poller thread reads
`backend.job()` every POLL_INTERVAL_S while any job is unfinished, and every
request refreshes the jobs it returns, so status, losses (one event per
optimizer step) and checkpoints follow the engine. After a restart, finished
jobs' adapters are loaded again and unfinished ones resume from their latest
checkpoint (or start over) if their training file is still there.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from pathlib import Path

from coserve.api.errors import APIError
from coserve.api.file_store import FileStore, write_json_atomic
from coserve.api.fine_tuning_objects import TERMINAL_STATUSES, checkpoint_objects, event_objects, job_object
from coserve.api.fine_tuning_request import (DEFAULT_LORA, DEFAULT_MAX_SEQ_LEN, JobRequest, finetune_config,
                                             plan_steps, resolve_hyperparameters)
from coserve.finetune.checkpoint import latest_checkpoint
from coserve.finetune.dataset import DatasetError

logger = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
SAVE_INTERVAL_S = 2.0
"""A running job's new steps reach job.json at most this often; status changes are written at once."""
JOB_ID_RE = re.compile(r"^ftjob-[0-9a-f]{24}$")
_CHECKPOINT_RE = re.compile(r"checkpoint-(\d+)$")


class FineTuningJobs:
    """Create, track, cancel and describe fine-tuning jobs; safe to use from many threads."""

    def __init__(self, backend, settings, files: FileStore, adapter_paths: dict) -> None:
        self.backend = backend
        self.settings = settings
        self.files = files
        self.adapter_paths = adapter_paths   # fine-tuned model name -> adapter dir, read by /v1/models
        self.root = Path(settings.data_dir) / "fine_tuning"
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._records: dict[str, dict] = {}
        for path in sorted(self.root.glob("ftjob-*/job.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as err:   # e.g. edited by hand: skip it, keep the server up
                logger.error("skipping unreadable fine-tuning job record %s: %s", path, err)
                continue
            self._records[record["id"]] = record
        self._poller: threading.Thread | None = None
        self._closed = False
        self._saved_at: dict[str, float] = {}   # job id -> monotonic time of its last write

    # ---- creating -----------------------------------------------------------------------------

    def create(self, request: JobRequest) -> dict:
        """Check the request against the files and models, record the job, start it on a thread."""
        init_adapter = self._base_adapter(request)
        self._fine_tune_file(request.training_file, "training_file")
        if request.validation_file is not None:
            self._fine_tune_file(request.validation_file, "validation_file")
        rows = self._read_rows(request.training_file)
        hyperparameters = resolve_hyperparameters(request.hyperparameters, len(rows))
        max_steps, steps_per_epoch = plan_steps(hyperparameters, len(rows))
        job_hex = secrets.token_hex(12)
        job_id = f"ftjob-{job_hex}"
        record = {
            "id": job_id, "created_at": int(time.time()), "created_ts": time.time(),   # ts: order within a second
            "started_at": None, "finished_at": None,
            "model": request.model, "model_name": f"ft:{self.settings.model_id}:{request.suffix or ''}:{job_hex[:8]}",
            "fine_tuned_model": None, "status": "validating_files", "error": None,
            "training_file": request.training_file, "validation_file": request.validation_file,
            "hyperparameters": hyperparameters, "lora": None if init_adapter else {**DEFAULT_LORA, **(request.lora or {})},
            "init_adapter": init_adapter, "suffix": request.suffix, "seed": request.seed, "metadata": request.metadata,
            "num_rows": len(rows), "max_steps": max_steps, "save_steps": steps_per_epoch,
            "max_seq_len": min(DEFAULT_MAX_SEQ_LEN, self.backend.max_model_len),
            "output_dir": str(self.root / job_id / "adapter"), "backend_job_id": None, "step": 0, "losses": [],
            "tokens_trained": None, "checkpoints": [], "result_files": [], "events": [], "next_event": 1,
        }
        try:
            config = finetune_config(record, rows)
        except ValueError as err:
            raise APIError(400, f"cannot build the training job: {err}", code="invalid_job") from err
        with self._lock:
            self._records[job_id] = record
            self._event(record, f"Created fine-tuning job: {job_id}")
            self._event(record, f"Validating training file: {request.training_file}")
            self._save(record)
        self.adapter_paths[record["model_name"]] = record["output_dir"]
        threading.Thread(target=self._submit, args=(job_id, config), name=f"submit-{job_id}", daemon=True).start()
        return self.view(record)

    def _base_adapter(self, request: JobRequest) -> str | None:
        """None for the base model; the adapter dir of a succeeded job to continue from its fine_tuned_model."""
        if request.model == self.settings.model_id:
            return None
        with self._lock:
            parent = next((r for r in self._records.values() if r["fine_tuned_model"] == request.model), None)
        if parent is None:
            raise APIError(400, f"model {request.model!r} is not available for fine-tuning; use the base model "
                           f"{self.settings.model_id!r} or the fine_tuned_model of a succeeded job",
                           param="model", code="model_not_available")
        if request.lora is not None:
            raise APIError(400, "lora cannot be set when continuing a fine-tuned model (its own LoRA shape is "
                           "kept)", param="lora")
        return parent["output_dir"]

    def _fine_tune_file(self, file_id: str, param: str) -> dict:
        record = self.files.get(file_id)
        if record is None:
            raise APIError(400, f"{param} {file_id!r} is not an uploaded file", param=param, code="file_not_found")
        if record["purpose"] != "fine-tune":
            raise APIError(400, f"{param} {file_id!r} has purpose {record['purpose']!r}; upload it with purpose "
                           "'fine-tune'", param=param, code="invalid_file_purpose")
        return record

    def _read_rows(self, file_id: str) -> list[dict]:
        # The file was checked line by line at upload; here it is only parsed again.
        data = self.files.read(file_id).removeprefix(b"\xef\xbb\xbf")
        rows = [json.loads(line) for line in data.split(b"\n") if line.strip()]
        for row in rows:
            # NOTE: /v1/chat/completions serves "developer" as "system"; train on what will be served.
            for message in row.get("messages") or []:
                if message.get("role") == "developer":
                    message["role"] = "system"
        return rows

    def _submit(self, job_id: str, config) -> None:
        """Thread: `backend.finetune` reads and tokenizes the rows, then starts the engine job."""
        try:
            backend_job_id = self.backend.finetune(config)
        except DatasetError as err:
            self._fail(job_id, "invalid_training_file", str(err), "training_file")
            return
        except ValueError as err:   # e.g. LoRA target modules the model lacks, a bad checkpoint
            self._fail(job_id, "invalid_job", str(err), None)
            return
        except Exception as err:
            logger.exception("fine-tuning job %s could not start", job_id)
            self._fail(job_id, "internal_error", f"{type(err).__name__}: {err}", None)
            return
        with self._lock:
            record = self._records[job_id]
            record["backend_job_id"] = backend_job_id
            cancelled = record["status"] == "cancelled"
            if not cancelled:
                record["status"] = "queued"
                self._event(record, "Files validated, fine-tuning job queued")
            self._save(record)
        if cancelled:   # cancelled while validating: stop what just started
            try:
                self.backend.cancel_job(backend_job_id)
            except Exception:
                logger.exception("cancelling engine job %s of %s failed", backend_job_id, job_id)
        else:
            self._ensure_poller()

    # ---- tracking -----------------------------------------------------------------------------

    def refresh(self, job_id: str) -> None:
        """Bring one record up to date with its engine job."""
        with self._lock:
            record = self._records.get(job_id)
            if record is None or record["status"] in TERMINAL_STATUSES or record["backend_job_id"] is None:
                return
            backend_job_id = record["backend_job_id"]
        try:
            progress = self.backend.job(backend_job_id)
        except KeyError:
            progress = None
        except Exception:
            logger.exception("reading engine job %s failed; will retry", backend_job_id)
            return
        with self._lock:
            if record["status"] in TERMINAL_STATUSES or record["backend_job_id"] != backend_job_id:
                return
            if progress is None:
                self._fail(job_id, "job_lost", "the engine no longer knows this job", None)
                return
            status = record["status"]
            changed = self._apply(record, progress)
            # NOTE: job.json holds every event; rewriting it on every poll of a long job would be wasteful,
            # and steps lost to a crash are retrained from the last checkpoint anyway.
            if record["status"] != status or (changed and time.monotonic() - self._saved_at.get(job_id, 0)
                                              >= SAVE_INTERVAL_S):
                self._save(record)

    def _apply(self, record: dict, progress: dict) -> bool:
        """Copy the engine's progress into the record and log events; True if anything changed."""
        before = _progress_key(record)
        status = progress.get("status")
        if record["status"] == "queued" and status in ("running", *TERMINAL_STATUSES) and status != "cancelled":
            self._transition(record, "running", progress)   # first, so step events follow "started"
        losses = progress.get("losses") or []
        for loss in losses[len(record["losses"]):]:
            record["losses"].append(loss)
            step = len(record["losses"])
            self._event(record, f"Step {step}/{record['max_steps']}: training loss={loss:.4f}", kind="metrics",
                        data={"step": step, "train_loss": loss, "total_steps": record["max_steps"]})
        record["step"] = progress.get("step", len(record["losses"]))
        record["tokens_trained"] = progress.get("tokens_trained", record["tokens_trained"])
        if progress.get("started_at") and not record["started_at"]:
            record["started_at"] = int(progress["started_at"])
        known = {c["step"] for c in record["checkpoints"]}
        for path in progress.get("checkpoints") or []:
            match = _CHECKPOINT_RE.search(str(path))
            if match and int(match.group(1)) not in known:
                step = int(match.group(1))
                created = int(os.path.getmtime(path)) if os.path.exists(path) else int(time.time())
                record["checkpoints"].append({"step": step, "path": str(path), "created_at": created})
                self._event(record, f"Checkpoint created at step {step}")
        if status != record["status"] and status in TERMINAL_STATUSES:
            self._transition(record, status, progress)
        return _progress_key(record) != before

    def _transition(self, record: dict, status: str, progress: dict) -> None:
        record["status"] = status
        if status == "running":
            self._event(record, "Fine-tuning job started")
            return
        record["finished_at"] = int(progress.get("finished_at") or time.time())
        if status == "succeeded":
            record["fine_tuned_model"] = record["model_name"]
            record["result_files"] = [self._write_results(record)]
            self._event(record, f"New fine-tuned model created: {record['model_name']}")
            self._event(record, "The job has successfully completed")
        elif status == "failed":
            record["error"] = {"code": "training_failed", "param": None,
                               "message": progress.get("error") or "the engine reported a failure"}
            self._event(record, f"The job failed: {record['error']['message']}", level="error")
            self.adapter_paths.pop(record["model_name"], None)
        else:
            self._event(record, "The job was cancelled")
            self.adapter_paths.pop(record["model_name"], None)

    def _write_results(self, record: dict) -> str:
        """A results file as OpenAI's: per-step metrics CSV, purpose "fine-tune-results"."""
        lines = ["step,train_loss"] + [f"{i},{loss}" for i, loss in enumerate(record["losses"], start=1)]
        return self.files.add(("\n".join(lines) + "\n").encode(), "step_metrics.csv", "fine-tune-results")["id"]

    def _fail(self, job_id: str, code: str, message: str, param: str | None) -> None:
        with self._lock:
            record = self._records[job_id]
            if record["status"] in TERMINAL_STATUSES:
                return
            record.update(status="failed", finished_at=int(time.time()),
                          error={"code": code, "message": message, "param": param})
            self._event(record, f"The job failed: {message}", level="error")
            self.adapter_paths.pop(record["model_name"], None)
            self._save(record)

    def _ensure_poller(self) -> None:
        with self._lock:
            if self._closed or (self._poller is not None and self._poller.is_alive()):
                return
            self._poller = threading.Thread(target=self._poll, name="coserve-ft-poller", daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while True:
            with self._lock:
                active = [i for i, r in self._records.items() if r["status"] not in TERMINAL_STATUSES]
                # NOTE: decided under the lock, so a job added meanwhile sees no poller and starts one.
                if self._closed or not active:
                    self._poller = None
                    return
            for job_id in active:
                self.refresh(job_id)
            time.sleep(POLL_INTERVAL_S)

    def close(self) -> None:
        """Stop polling and writing (the table on disk stays as it is)."""
        with self._lock:
            self._closed = True

    # ---- cancelling ---------------------------------------------------------------------------

    def cancel(self, job_id: str) -> dict:
        record = self.get_record(job_id)
        with self._lock:
            if record["status"] in TERMINAL_STATUSES:
                raise APIError(409, f"job {job_id} has already {record['status']}; only a job that has not "
                               "finished can be cancelled", param="fine_tuning_job_id", code="job_not_cancellable")
            backend_job_id = record["backend_job_id"]
            if backend_job_id is None:   # still validating: _submit cancels the engine job it starts
                self._transition(record, "cancelled", {})
                self._save(record)
                return self.view(record)
        try:
            self.backend.cancel_job(backend_job_id)
        except KeyError:   # the engine lost it (refresh marks it failed)
            pass
        self.refresh(job_id)
        with self._lock:
            if record["status"] in ("succeeded", "failed"):   # finished before the cancel arrived
                raise APIError(409, f"job {job_id} has already {record['status']}", param="fine_tuning_job_id",
                               code="job_not_cancellable")
            if record["status"] not in TERMINAL_STATUSES:
                self._transition(record, "cancelled", {})
                self._save(record)
            return self.view(record)

    # ---- after a restart ----------------------------------------------------------------------

    def recover(self) -> None:
        """Serve finished jobs' adapters again; resume unfinished jobs the engine does not know."""
        try:
            loaded = set(self.backend.list_adapters())
        except Exception:
            logger.exception("cannot list adapters; fine-tuned models are not reloaded")
            loaded = None
        for record in list(self._records.values()):
            if record["status"] == "succeeded":
                self.adapter_paths[record["model_name"]] = record["output_dir"]
                if loaded is not None and record["model_name"] not in loaded:
                    try:
                        self.backend.load_adapter(record["model_name"], record["output_dir"])
                    except Exception as err:
                        logger.warning("cannot load fine-tuned model %s from %s: %s", record["model_name"],
                                       record["output_dir"], err)
            elif record["status"] not in TERMINAL_STATUSES:
                self.adapter_paths[record["model_name"]] = record["output_dir"]
                if not self._engine_knows(record):
                    self._resume(record)
        self._ensure_poller()

    def _engine_knows(self, record: dict) -> bool:
        if record["backend_job_id"] is None:
            return False
        try:
            return self.backend.job(record["backend_job_id"]).get("adapter") == record["model_name"]
        except KeyError:
            return False
        except Exception:   # e.g. a cluster not reachable yet: keep the record; polling retries it
            logger.exception("cannot ask the engine about job %s", record["id"])
            return True

    def _resume(self, record: dict) -> None:
        if self.files.get(record["training_file"]) is None:
            self._fail(record["id"], "job_lost", "the server restarted while the job ran, and its training file "
                       "has been deleted, so it cannot resume", "training_file")
            return
        checkpoint = latest_checkpoint(record["output_dir"])
        step = int(_CHECKPOINT_RE.search(checkpoint).group(1)) if checkpoint else 0
        with self._lock:
            # Steps after the checkpoint will be trained again: forget what was logged for them.
            del record["losses"][step:]
            record["events"] = [e for e in record["events"] if (e["data"] or {}).get("step", 0) <= step]
            record["checkpoints"] = [c for c in record["checkpoints"] if c["step"] <= step]
            record.update(status="validating_files", backend_job_id=None, step=step)
            self._event(record, f"The server restarted; resuming from the checkpoint at step {step}" if checkpoint
                        else "The server restarted; starting the job again")
            self._save(record)
        try:
            config = finetune_config(record, self._read_rows(record["training_file"]), resume=checkpoint is not None)
        except ValueError as err:
            self._fail(record["id"], "invalid_job", str(err), None)
            return
        threading.Thread(target=self._submit, args=(record["id"], config), daemon=True).start()

    # ---- reading ------------------------------------------------------------------------------

    def get_record(self, job_id: str) -> dict:
        """The record after a refresh; APIError 404 for an unknown id."""
        self.refresh(job_id)
        with self._lock:
            record = self._records.get(job_id) if JOB_ID_RE.match(job_id) else None
        if record is None:
            raise APIError(404, f"no such fine-tuning job: {job_id!r}", param="fine_tuning_job_id",
                           code="job_not_found")
        return record

    def list_records(self) -> list[dict]:
        """Every record, newest first, unfinished ones refreshed."""
        with self._lock:
            active = [i for i, r in self._records.items() if r["status"] not in TERMINAL_STATUSES]
        for job_id in active:
            self.refresh(job_id)
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r["created_ts"], reverse=True)

    def view(self, record: dict) -> dict:
        """The OpenAI `fine_tuning.job` object of a record."""
        with self._lock:
            return job_object(record)

    def events(self, record: dict) -> list[dict]:
        with self._lock:
            return event_objects(record)

    def checkpoints(self, record: dict) -> list[dict]:
        with self._lock:
            return checkpoint_objects(record)

    # ---- storage ------------------------------------------------------------------------------

    def _event(self, record: dict, message: str, *, level: str = "info", kind: str = "message",
               data: dict | None = None) -> None:
        number = record["next_event"]
        record["next_event"] += 1
        record["events"].append({"id": f"ftevent-{record['id'][6:]}-{number}", "created_at": int(time.time()),
                                 "level": level, "message": message, "type": kind, "data": data})

    def _save(self, record: dict) -> None:
        if not self._closed:
            write_json_atomic(self.root / record["id"] / "job.json", record)
            self._saved_at[record["id"]] = time.monotonic()


def _progress_key(record: dict) -> tuple:
    return (record["status"], record["step"], len(record["losses"]), record["tokens_trained"],
            record["started_at"], len(record["checkpoints"]))


def _progress_key(record: dict) -> tuple:
    return (record["status"], record["step"], len(record["losses"]), record["tokens_trained"],
            record["started_at"], len(record["checkpoints"]))


def _estimated_finish(record: dict) -> int | None:
    if record["status"] != "running" or not record["started_at"] or not record["losses"]:
        return None
    elapsed = time.time() - record["started_at"]
    return int(record["started_at"] + elapsed * record["max_steps"] / len(record["losses"]))

