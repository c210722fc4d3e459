"""Uploaded files on disk: `data_dir/files/<id>` plus an `index.json` of OpenAI file objects.

Each file's bytes and the index are written to a temporary file and renamed
into place (`os.replace`), so a crash leaves the old index or the new one,
never half of either, and a restarted server lists the same files. Ids are
generated here and checked against `FILE_ID_RE` before any path is built, so a
path parameter can never name anything outside the store.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import tempfile
import threading
import time
from pathlib import Path

FILE_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
INDEX_NAME = "index.json"
# Fields kept in the index for the server only; stripped from the OpenAI file object.
_PRIVATE_FIELDS = ("num_rows",)


def write_json_atomic(path: Path, data) -> None:
    """Write `data` as JSON to `path` via a temporary file in the same directory and `os.replace`."""
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class FileStore:
    """OpenAI file objects and their contents under `root`; safe to use from many threads."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._files: dict[str, dict] = {}   # id -> file record (OpenAI object + private fields)
        index = self.root / INDEX_NAME
        if index.exists():
            for record in json.loads(index.read_text()).get("files", []):
                # NOTE: an entry whose content vanished (deleted by hand) is dropped, not served as 500s.
                if FILE_ID_RE.match(record.get("id", "")) and (self.root / record["id"]).is_file():
                    self._files[record["id"]] = record

    def add(self, data: bytes, filename: str, purpose: str, **private) -> dict:
        """Store `data`; returns the OpenAI file object. `private`: server-only fields (e.g. num_rows)."""
        file_id = "file-" + secrets.token_hex(12)
        write_bytes_atomic(self.root / file_id, data)
        record = {"id": file_id, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                  "expires_at": None, **private}
        with self._lock:
            self._files[file_id] = record
            self._save()
        return public_file(record)

    def get(self, file_id: str) -> dict | None:
        """The file's record (with private fields), or None for an unknown or malformed id."""
        with self._lock:
            return dict(self._files[file_id]) if file_id in self._files else None

    def list(self) -> list[dict]:
        """Every record, oldest first (upload order: the index keeps it; created_at has only seconds)."""
        with self._lock:
            return [dict(r) for r in self._files.values()]

    def path(self, file_id: str) -> Path:
        if not FILE_ID_RE.match(file_id):
            raise KeyError(file_id)
        return self.root / file_id

    def read(self, file_id: str) -> bytes:
        return self.path(file_id).read_bytes()

    def delete(self, file_id: str) -> bool:
        with self._lock:
            if self._files.pop(file_id, None) is None:
                return False
            self._save()
        # NOTE: index first, content second: a crash in between leaves an orphan file, not a dangling entry.
        self.path(file_id).unlink(missing_ok=True)
        return True

    def _save(self) -> None:
        write_json_atomic(self.root / INDEX_NAME, {"files": list(self._files.values())})


def public_file(record: dict) -> dict:
    """The OpenAI file object of a record (server-only fields removed)."""
    return {k: v for k, v in record.items() if k not in _PRIVATE_FIELDS}
