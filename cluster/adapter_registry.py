"""Adapters known to a whole deployment: name -> directory, kept in a JSON file.

Workers load an adapter lazily, when a request for it is routed to them; the
registry is where they find it. It lives beside the job table in the
deployment's directory, rewritten atomically, so a restarted controller still
knows every adapter (finetuned ones included).
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path


class AdapterRegistry:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._adapters: dict[str, str] = {}
        if self.path.exists():
            with open(self.path, encoding="utf-8") as f:
                self._adapters = dict(json.load(f))

    def add(self, name: str, path: str) -> None:
        with self._lock:
            self._adapters[name] = str(path)
            self._write()

    def remove(self, name: str) -> bool:
        with self._lock:
            found = self._adapters.pop(name, None) is not None
            if found:
                self._write()
            return found

    def get(self, name: str) -> str | None:
        return self._adapters.get(name)

    def names(self) -> list[str]:
        return sorted(self._adapters)

    def as_dict(self) -> dict[str, str]:
        return dict(self._adapters)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".adapters-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._adapters, f, indent=2, sort_keys=True)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
