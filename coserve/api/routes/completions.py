"""`POST /v1/completions` and `POST /v1/chat/completions`, whole or streamed (server-sent events).

`model` is the base model's id or an adapter's name. A request becomes one
engine sequence per (prompt, choice); a streamed one sends OpenAI chunk objects
as `data: {...}` events and ends with `data: [DONE]` (plus, with
`stream_options.include_usage`, a last chunk holding `usage` and no choices).
Streamed logprobs arrive with each choice's final chunk.
"""
from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Request
from sse_starlette import EventSourceResponse
from starlette.background import BackgroundTask

from coserve.api import openai_format as fmt
from coserve.api.auth import require_api_key
from coserve.api.chat import ChatTemplateError, render_chat
from coserve.api.errors import APIError, error_body
from coserve.api.inference import (DEFAULT_COMPLETION_MAX_TOKENS, Plan, adapter_for, backend_error, build_plan,
                                   check_outputs, check_unsupported, gate_of, metrics_of, runner_of,
                                   tokenize_prompts)
from coserve.api.protocol import ChatCompletionRequest, CompletionRequest
from coserve.api.state import ServerState, get_state
from coserve.api.streaming import MergedStreams

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    check_unsupported(body)
    adapter = adapter_for(body.model, state.settings)
    ticket = gate_of(state).admit(_num_prompts(body.prompt) * body.n)
    try:
        prompts = await runner_of(state).inference(tokenize_prompts, state.backend.tokenizer, body.prompt)
        plan = build_plan(body, prompts, adapter, max_model_len=state.backend.max_model_len,
                          max_tokens=body.max_tokens, default_max_tokens=DEFAULT_COMPLETION_MAX_TOKENS,
                          logprobs=body.logprobs, prompt_param="prompt")
    except BaseException:
        ticket.release()
        raise
    return await _respond(request, state, body, plan, ticket, "completion", body.logprobs is not None)


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    check_unsupported(body)
    if body.tools:
        raise APIError(400, "tools are not supported by this server", param="tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format {'type': 'text'} is supported", param="response_format")
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    adapter = adapter_for(body.model, state.settings)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"name": m.name} if m.name else {})} for m in body.messages]
    ticket = gate_of(state).admit(body.n)
    try:
        try:
            prompt, stop, stop_ids = await runner_of(state).inference(render_chat, state.backend.tokenizer, messages)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), param="messages") from None
        if not prompt:
            raise APIError(400, "the messages render to an empty prompt", param="messages")
        plan = build_plan(body, [prompt], adapter, max_model_len=state.backend.max_model_len,
                          max_tokens=body.max_completion_tokens or body.max_tokens, default_max_tokens=None,
                          logprobs=(body.top_logprobs or 0) if body.logprobs else None, prompt_param="messages",
                          extra_stop=stop, extra_stop_token_ids=stop_ids)
    except BaseException:
        ticket.release()
        raise
    return await _respond(request, state, body, plan, ticket, "chat", body.logprobs)


def _num_prompts(prompt) -> int:
    if isinstance(prompt, str) or (prompt and all(isinstance(p, int) for p in prompt)):
        return 1
    return max(1, len(prompt))


async def _respond(request: Request, state: ServerState, body, plan: Plan, ticket, kind: str, with_logprobs: bool):
    """Run the plan (ticket held until every sequence ends) and answer whole or as a stream."""
    if body.stream:
        return await _stream(request, state, body, plan, ticket, kind, with_logprobs)
    backend = state.backend
    sequences = plan.sequences
    try:
        outputs = await runner_of(state).inference(backend.generate, [ids for ids, _ in sequences],
                                                   [p for _, p in sequences], [plan.adapter] * len(sequences))
    except Exception as exc:
        raise backend_error(exc, plan.model) from None
    finally:
        ticket.release()
    check_outputs(outputs)
    metrics = metrics_of(state)
    for out in outputs:
        metrics.observe_output(plan.model, out)
    request.state.model = plan.model   # a known model from here on: safe as a metrics label
    build = fmt.completion_response if kind == "completion" else fmt.chat_response
    return build(plan.model, outputs, plan.num_prompt_tokens, backend.tokenizer, with_logprobs)


async def _stream(request: Request, state: ServerState, body, plan: Plan, ticket, kind: str, with_logprobs: bool):
    merged = None
    try:
        merged = MergedStreams(state.backend, plan.sequences, plan.adapter)
        try:
            await merged.prime()
        except Exception as exc:
            raise backend_error(exc, plan.model) from None
    except BaseException:
        if merged is not None:
            merged.close()
        ticket.release()
        raise
    request.state.model = plan.model
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    maker = fmt.ChunkMaker(kind, plan.model, include_usage)

    def finish() -> None:   # also runs when the generator never started (client gone at once)
        merged.close()
        ticket.release()

    events = _events(state, plan, merged, maker, with_logprobs, finish)
    return EventSourceResponse(events, sep="\n", background=BackgroundTask(finish))


async def _events(state: ServerState, plan: Plan, merged: MergedStreams, maker: fmt.ChunkMaker,
                  with_logprobs: bool, finish):
    tokenizer = state.backend.tokenizer
    metrics = metrics_of(state)
    num_completion_tokens = 0
    try:
        if maker.kind == "chat":
            for index in range(len(plan.params)):
                yield _data(maker.role(index))
        async for piece in merged.pieces():
            out = piece.output
            if piece.error is not None or (out is not None and out.finish_reason in ("error", "abort")):
                error = backend_error(piece.error, plan.model) if piece.error is not None else APIError(
                    500, f"generation failed: {out.error or out.finish_reason}")
                yield _data(error_body(error.status, error.message, error.param, error.code))
                break
            if out is None:
                if piece.text:
                    yield _data(maker.text(piece.index, piece.text))
                continue
            metrics.observe_output(plan.model, out)
            num_completion_tokens += len(out.token_ids)
            logprobs = None
            if with_logprobs:
                logprobs = (fmt.completion_logprobs(tokenizer, out.token_ids, out.logprobs) if maker.kind == "completion"
                            else fmt.chat_logprobs(tokenizer, out.token_ids, out.logprobs))
            yield _data(maker.text(piece.index, piece.text, fmt.finish_reason(out), logprobs))
        else:
            if maker.include_usage:
                yield _data(maker.usage(plan.num_prompt_tokens, num_completion_tokens))
        yield {"data": "[DONE]"}
    finally:
        finish()


def _data(obj: dict) -> dict:
    return {"data": json.dumps(obj, ensure_ascii=False, separators=(",", ":"))}
