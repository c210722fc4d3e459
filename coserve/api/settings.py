"""Server settings: what the operator chose on the command line (or in Python)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

API_KEY_ENV = "COSERVE_API_KEY"


@dataclass
class ServerSettings:
    model_id: str
    """The base model's id in the API (`model` field, `/v1/models`)."""
    api_key: str | None = None
    """Bearer key for every /v1 route and the dashboard's data; None = $COSERVE_API_KEY, else no auth."""
    adapter_roots: list[Path] = field(default_factory=list)
    """Directories adapter paths that arrive over HTTP must stay inside; empty = loading over HTTP is refused."""
    data_dir: Path = Path(".")
    """Where uploaded files and fine-tuning outputs are kept."""
    max_upload_bytes: int = 64 * 1024 * 1024
    max_request_bytes: int = 16 * 1024 * 1024
    """Request bodies other than multipart uploads larger than this get 413 (read no further)."""
    max_pending_requests: int = 256
    """Inference sequences (prompts x n) in flight before new requests get 429 with Retry-After."""
    retry_after_s: int = 1
    """The Retry-After (seconds) sent with a 429."""

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id.strip():
            raise ValueError(f"model_id must be a non-empty string, got {self.model_id!r}")
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        self.adapter_roots = [Path(p).expanduser().resolve() for p in self.adapter_roots]
        self.data_dir = Path(self.data_dir).resolve()
        for name in ("max_pending_requests", "max_upload_bytes", "max_request_bytes", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
