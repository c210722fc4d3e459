"""The controller's durable table of finetuning jobs, in one SQLite file.

The controller actor may restart (Ray `max_restarts`); on start it reopens the
file in the deployment's directory and finds every job where it left it, then
re-submits the unfinished ones. Each write is one committed transaction, so a
crash leaves either the old or the new record, never half of one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
UNFINISHED_STATUSES = ("queued", "running")
_SCHEMA_VERSION = 1


@dataclass
class JobRecord:
    """One finetuning job as the controller tracks it."""

    job_id: str
    adapter: str
    config: bytes
    """The pickled FinetuneConfig (opaque to the store)."""
    status: str
    """"queued", "running", "succeeded", "failed" or "cancelled"."""
    worker: str | None = None
    """Name of the worker running (or that last ran) the job."""
    engine_job_id: str | None = None
    """The job's id inside that worker's engine."""
    output_dir: str | None = None
    step: int = 0
    """Optimizer steps completed."""
    losses: list[float] = field(default_factory=list)
    """Loss of each completed optimizer step."""
    error: str | None = None
    attempts: int = 0
    """How many times the job was (re)started on a worker."""
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    @property
    def is_finished(self) -> bool:
        return self.status not in UNFINISHED_STATUSES


_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))
# NOTE: job_id is the key and the timestamps are the store's to keep.
_UPDATABLE = frozenset(_FIELDS) - {"job_id", "created_at", "updated_at"}

_CREATE = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY NOT NULL,
    adapter TEXT NOT NULL,
    config BLOB NOT NULL,
    status TEXT NOT NULL,
    worker TEXT,
    engine_job_id TEXT,
    output_dir TEXT,
    step INTEGER NOT NULL,
    losses TEXT NOT NULL,
    error TEXT,
    attempts INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
)"""


class JobStore:
    """A JobRecord table in a SQLite file; safe to call from several threads.

    Opening creates the file and table if missing and is safe on an existing
    file (that is how a restarted controller recovers).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        # NOTE: autocommit mode (isolation_level=None) so that each write below
        # is exactly the BEGIN IMMEDIATE ... COMMIT we spell out, nothing implicit.
        self._conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise ValueError(f"{self.path}: job store schema version {version}, this code reads "
                                 f"version {_SCHEMA_VERSION}")
            # WAL: readers never block the writer, and a crash mid-write rolls back cleanly.
            self._conn.execute("PRAGMA journal_mode=WAL")
            with self._transaction():
                self._conn.execute(_CREATE)
                self._conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            self._conn.close()
            raise

    def add(self, record: JobRecord) -> None:
        """Inserts a new job; ValueError if its job_id is already stored."""
        _validate(record)
        with self._lock, self._transaction():
            try:
                self._conn.execute(f"INSERT INTO jobs ({', '.join(_FIELDS)}) VALUES ({', '.join('?' * len(_FIELDS))})",
                                   _to_row(record))
            except sqlite3.IntegrityError:
                raise ValueError(f"job {record.job_id!r} already exists") from None

    def update(self, job_id: str, /, **fields) -> JobRecord:
        """Sets the given fields of a job, bumps updated_at, and returns the new record.

        Raises:
            KeyError: no job with this id.
            ValueError: a field that does not exist or cannot change, or a bad status.
        """
        unknown = sorted(set(fields) - _UPDATABLE)
        if unknown:
            raise ValueError(f"cannot update field(s) {', '.join(map(repr, unknown))} of job {job_id!r}; "
                             f"updatable fields: {', '.join(sorted(_UPDATABLE))}")
        with self._lock, self._transaction():
            current = self._get(job_id)
            if current is None:
                raise KeyError(f"no job {job_id!r} in {self.path}")
            record = dataclasses.replace(current, **fields, updated_at=time.time())
            _validate(record)
            self._conn.execute(f"UPDATE jobs SET {', '.join(f'{name} = ?' for name in _FIELDS[1:])} WHERE job_id = ?",
                               (*_to_row(record)[1:], job_id))
        return record

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._get(job_id)

    def all(self) -> list[JobRecord]:
        """Every job, in creation (insertion) order."""
        return self._select("")

    def unfinished(self) -> list[JobRecord]:
        """Jobs still queued or running, in creation order: what a restarted controller resumes."""
        return self._select(f"WHERE status IN ({', '.join('?' * len(UNFINISHED_STATUSES))})", UNFINISHED_STATUSES)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _get(self, job_id: str) -> JobRecord | None:
        row = self._conn.execute(f"SELECT {', '.join(_FIELDS)} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return None if row is None else _from_row(row)

    def _select(self, where: str, params: tuple = ()) -> list[JobRecord]:
        # NOTE: rowid grows with each insert and rows are never deleted, so it is creation order.
        with self._lock:
            rows = self._conn.execute(f"SELECT {', '.join(_FIELDS)} FROM jobs {where} ORDER BY rowid", params)
            return [_from_row(row) for row in rows.fetchall()]

    def _transaction(self):
        return _Transaction(self._conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK if the body raised."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def __enter__(self) -> None:
        # IMMEDIATE takes the write lock up front, so a read-modify-write
        # (update) cannot interleave with another connection's write.
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def _validate(record: JobRecord) -> None:
    if record.status not in STATUSES:
        raise ValueError(f"job {record.job_id!r}: status must be one of {STATUSES}, got {record.status!r}")
    if not isinstance(record.config, (bytes, bytearray, memoryview)):
        raise ValueError(f"job {record.job_id!r}: config must be bytes (a pickled FinetuneConfig), "
                         f"got {type(record.config).__name__}")


def _to_row(record: JobRecord) -> tuple:
    values = {name: getattr(record, name) for name in _FIELDS}
    values["config"] = bytes(record.config)
    values["losses"] = json.dumps([float(loss) for loss in record.losses])
    return tuple(values[name] for name in _FIELDS)


def _from_row(row: tuple) -> JobRecord:
    values = dict(zip(_FIELDS, row))
    values["losses"] = json.loads(values["losses"])
    return JobRecord(**values)
