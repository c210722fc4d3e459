"""A generation request as the scheduler sees it: token ids and progress.

Pure Python (no torch): the scheduler and its tests use it without a model.
`num_computed_tokens` counts tokens whose K/V are in the cache; the tokens still
to run are `all_token_ids[num_computed_tokens:]`.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from coserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"        # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"       # max_tokens or the model's max length
    FINISHED_ABORTED = "abort"       # cancelled by the caller
    FINISHED_ERROR = "error"         # failed alone; see Request.error

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort", "error")


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    adapter: str | None = None
    """Adapter name, None for the base model."""
    eos_token_id: int | None = None
    max_model_len: int | None = None
    """Generation stops (reason "length") when the sequence reaches this length."""
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    output_text: str = ""
    """Detokenized output, filled when the request finishes."""
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_to_compute(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.is_finished else None
