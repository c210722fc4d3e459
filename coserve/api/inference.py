"""From a completions/chat body to backend calls: admission, checks, sampling params, threads.

Everything that blocks (tokenizing, the backend's calls) runs in worker threads
so the event loop keeps answering: inference calls under one limiter sized to
the admission limit, short control calls (stats, adapters) under another, so
long generations can never starve /health or /metrics of threads.

Admission counts sequences (prompts x n) in flight; a request that would pass
`max_pending_requests` gets 429 with Retry-After at once instead of queueing
without bound.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import anyio

from coserve.api.errors import APIError, model_not_found
from coserve.api.protocol import CompletionRequest, _SamplingFields
from coserve.sampling_params import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16   # OpenAI's default for /v1/completions
_CONTROL_THREADS = 8
_SEED_MODULUS = 2 ** 64


# ---- threads and admission -----------------------------------------------------------------------


class Runner:
    """Runs blocking calls in threads; one per app (limiters are made on first use, inside the loop)."""

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = max_in_flight
        self._inference: anyio.CapacityLimiter | None = None
        self._control: anyio.CapacityLimiter | None = None

    async def inference(self, fn: Callable, *args, **kwargs):
        if self._inference is None:
            self._inference = anyio.CapacityLimiter(self.max_in_flight)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._inference)

    async def control(self, fn: Callable, *args, abandon_on_cancel: bool = False, **kwargs):
        if self._control is None:
            self._control = anyio.CapacityLimiter(_CONTROL_THREADS)
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self._control,
                                              abandon_on_cancel=abandon_on_cancel)


@dataclass
class Gate:
    """Admission: sequences in flight, touched only on the event loop (no lock needed)."""

    limit: int
    retry_after_s: int = 1
    num_in_flight: int = 0

    def admit(self, weight: int) -> "Ticket":
        if weight > self.limit:
            raise APIError(400, f"this request asks for {weight} sequences (prompts x n); the server admits at "
                                f"most {self.limit} at a time", param="n")
        if self.num_in_flight + weight > self.limit:
            raise APIError(429, f"the server is at capacity ({self.num_in_flight} of {self.limit} sequences in "
                                f"flight); retry after {self.retry_after_s} s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(self.retry_after_s)})
        self.num_in_flight += weight
        return Ticket(self, weight)


@dataclass
class Ticket:
    gate: Gate
    weight: int
    released: bool = False

    def release(self) -> None:
        if not self.released:   # idempotent: streams release from the generator and the response's end
            self.released = True
            self.gate.num_in_flight -= self.weight


# ---- a request, checked and turned into sequences ------------------------------------------------


@dataclass
class Plan:
    """What to run: one engine sequence per (prompt, choice), prompt-major (index = prompt * n + choice)."""

    model: str
    adapter: str | None
    prompts: list[list[int]]
    n: int
    params: list[SamplingParams] = field(default_factory=list)

    @property
    def sequences(self) -> list[tuple[list[int], SamplingParams]]:
        return [(self.prompts[i // self.n], p) for i, p in enumerate(self.params)]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def adapter_for(model: str, settings) -> str | None:
    """None for the base model; any other name is an adapter (the engine answers unknown ones with KeyError)."""
    if not model:
        raise model_not_found(model)
    return None if model == settings.model_id else model


def tokenize_prompts(tokenizer, prompt) -> list[list[int]]:
    """A completions `prompt` (text, texts, ids, or lists of ids) as token id lists."""
    if isinstance(prompt, str):
        items = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise APIError(400, "prompt must not be empty", param="prompt")
    prompts = []
    for item in items:
        # Same tokenization as LLM.generate(prompts=...): special tokens added.
        ids = list(tokenizer(item)["input_ids"]) if isinstance(item, str) else list(item)
        if not ids:
            raise APIError(400, "prompt must not be empty (it has no tokens)", param="prompt")
        prompts.append(ids)
    return prompts


def check_unsupported(body: _SamplingFields) -> None:
    """Refuse options that would change the answer and that this server does not implement."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported by this server (leave it 0)", param=name)
    if isinstance(body, CompletionRequest):
        if body.echo:
            raise APIError(400, "echo is not supported by this server", param="echo")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported by this server (leave it unset or equal to n)",
                           param="best_of")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")


def build_plan(body: _SamplingFields, prompts: list[list[int]], adapter: str | None, *, max_model_len: int,
               max_tokens: int | None, default_max_tokens: int | None, logprobs: int | None,
               prompt_param: str, extra_stop: list[str] = (), extra_stop_token_ids: list[int] = ()) -> Plan:
    """Check lengths against the model and make one SamplingParams per sequence.

    Args:
        max_tokens: what the client asked for (None: default_max_tokens, or all the room left when None).
        logprobs: top-k logprobs per position for the engine (None: no logprobs).
        prompt_param: "prompt" or "messages", the field errors about the prompt name.
    """
    longest = max(len(p) for p in prompts)
    if longest >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens, but the prompt has "
                            f"{longest} tokens, leaving no room to generate. Shorten the {prompt_param}.",
                       param=prompt_param, code="context_length_exceeded")
    room = max_model_len - longest
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens is too large: {max_tokens}. This model's maximum context length is "
                            f"{max_model_len} tokens and the prompt has {longest}, so at most {room} tokens can be "
                            f"generated.", param="max_tokens", code="invalid_value")
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    stop += [s for s in extra_stop if s not in stop]
    stop_token_ids = list(body.stop_token_ids or []) + [t for t in extra_stop_token_ids
                                                       if t not in (body.stop_token_ids or [])]
    plan = Plan(model=body.model, adapter=adapter, prompts=prompts, n=body.n)
    for _ in prompts:
        for choice in range(body.n):
            # NOTE: each choice needs its own stream of randomness, else n seeded choices are identical;
            # choice 0 keeps the seed as given so n=1 matches a plain seeded call.
            seed = body.seed
            if seed is not None and choice > 0:
                seed = (seed + choice) % _SEED_MODULUS
            try:
                plan.params.append(SamplingParams(
                    max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=seed, stop=stop,
                    stop_token_ids=stop_token_ids, ignore_eos=body.ignore_eos, logprobs=logprobs))
            except ValueError as exc:
                raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
    return plan


def backend_error(exc: Exception, model: str | None = None) -> APIError:
    """An exception from a backend call (for a request naming `model`) as the error the client gets."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, KeyError):   # the engine (UnknownAdapterError) and the controller: unknown adapter
        message = exc.args[0] if exc.args else str(exc)
        return APIError(404, f"The model {model!r} does not exist ({message}); GET /v1/models lists the models",
                        param="model", code="model_not_found")
    if isinstance(exc, (ValueError, TypeError)):
        return APIError(400, str(exc), param="prompt" if "prompt" in str(exc) else None)
    if isinstance(exc, RuntimeError) and "shut down" in str(exc):
        return APIError(503, f"the engine is not serving: {exc}")
    return APIError(500, f"generation failed: {type(exc).__name__}: {exc}")


def check_outputs(outputs) -> None:
    """A request the engine failed (finish_reason "error"/"abort") becomes a 500 for the client."""
    for out in outputs:
        if out.finish_reason == "error":
            raise APIError(500, f"generation failed: {out.error or 'unknown engine error'}")
        if out.finish_reason == "abort":
            raise APIError(503, "the request was aborted (the server is shutting down)")


# ---- per-app objects (made by create_app, reached from any route) --------------------------------

RUNNER, GATE, METRICS = "runner", "gate", "metrics"


def runner_of(state) -> Runner:
    return state.extras[RUNNER]


def gate_of(state) -> Gate:
    return state.extras[GATE]


def metrics_of(state):
    """The app's `ServerMetrics`."""
    return state.extras[METRICS]
