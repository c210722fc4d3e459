"""What `LLM.generate` returns for each prompt."""
from __future__ import annotations

from dataclasses import dataclass, field

from coserve.engine.request import Request


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    """Generated text only (not the prompt), stop string excluded."""
    token_ids: list[int]
    """Generated token ids only."""
    finish_reason: str
    """"stop" (EOS, stop token or string), "length", "abort" or "error"."""
    adapter: str | None = None
    logprobs: list[dict] | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)

    @classmethod
    def from_request(cls, request: Request, prompt: str | None) -> "RequestOutput":
        metrics = {"arrival_time": request.arrival_time, "first_token_time": request.first_token_time,
                   "finish_time": request.finish_time, "num_preemptions": request.num_preemptions}
        return cls(request_id=request.request_id, prompt=prompt, prompt_token_ids=request.prompt_token_ids,
                   text=request.output_text, token_ids=list(request.output_token_ids),
                   finish_reason=request.finish_reason or "abort", adapter=request.adapter,
                   logprobs=list(request.output_logprobs) if request.sampling_params.logprobs is not None else None,
                   error=request.error, metrics=metrics)


@dataclass
class StreamChunk:
    """One piece of a streamed generation: the tokens new since the previous chunk.

    The last chunk of a stream has `output` set: the whole RequestOutput (text, finish reason, metrics).
    """

    token_ids: list[int]
    output: RequestOutput | None = None

    @property
    def finished(self) -> bool:
        return self.output is not None
