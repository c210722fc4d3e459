"""OpenAI response objects (completions, chat, stream chunks, logprobs, usage) from `RequestOutput`s.

Plain dicts in the shapes the official `openai` client parses. The engine's
logprob entries are `{"token_logprob": float, "top": {token_id: logprob}}`
per generated token; token strings are each id decoded alone.
"""
from __future__ import annotations

import time
import uuid

_FINISH_REASONS = {"stop": "stop", "length": "length"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def finish_reason(output) -> str:
    return _FINISH_REASONS.get(output.finish_reason, "stop")


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def completion_logprobs(tokenizer, token_ids: list[int], entries: list[dict] | None, text_offset: int = 0) -> dict:
    """The legacy completions `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = text_offset
    for token_id, entry in zip(token_ids, entries or []):
        text = _token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        token_logprobs.append(entry["token_logprob"])
        top: dict[str, float] = {}
        for alt_id, logprob in entry["top"].items():
            top.setdefault(_token_text(tokenizer, alt_id), logprob)   # most likely first; keep it on a clash
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}


def chat_logprobs(tokenizer, token_ids: list[int], entries: list[dict] | None) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}], "refusal": None}."""
    content = []
    for token_id, entry in zip(token_ids, entries or []):
        text = _token_text(tokenizer, token_id)
        top = [{"token": (t := _token_text(tokenizer, alt_id)), "logprob": logprob, "bytes": list(t.encode())}
               for alt_id, logprob in entry["top"].items()]
        content.append({"token": text, "logprob": entry["token_logprob"], "bytes": list(text.encode()),
                        "top_logprobs": top})
    return {"content": content, "refusal": None}


# ---- whole responses -----------------------------------------------------------------------------


def completion_response(model: str, outputs, num_prompt_tokens: int, tokenizer, with_logprobs: bool) -> dict:
    choices = [{"index": i, "text": out.text, "finish_reason": finish_reason(out),
                "logprobs": completion_logprobs(tokenizer, out.token_ids, out.logprobs) if with_logprobs else None}
               for i, out in enumerate(outputs)]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": now(), "model": model,
            "system_fingerprint": None, "choices": choices,
            "usage": usage(num_prompt_tokens, sum(len(o.token_ids) for o in outputs))}


def chat_response(model: str, outputs, num_prompt_tokens: int, tokenizer, with_logprobs: bool) -> dict:
    choices = [{"index": i, "message": {"role": "assistant", "content": out.text, "refusal": None},
                "finish_reason": finish_reason(out),
                "logprobs": chat_logprobs(tokenizer, out.token_ids, out.logprobs) if with_logprobs else None}
               for i, out in enumerate(outputs)]
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
            "system_fingerprint": None, "choices": choices,
            "usage": usage(num_prompt_tokens, sum(len(o.token_ids) for o in outputs))}


# ---- stream chunks -------------------------------------------------------------------------------


class ChunkMaker:
    """Chunks of one streamed response: same id, created and model on every chunk."""

    def __init__(self, kind: str, model: str, include_usage: bool) -> None:
        self.kind = kind   # "completion" or "chat"
        self.id = new_id("cmpl" if kind == "completion" else "chatcmpl")
        self.created = now()
        self.model = model
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "text_completion" if self.kind == "completion" else "chat.completion.chunk",
                 "created": self.created, "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            chunk["usage"] = None   # as OpenAI: null on every chunk but the last
        return chunk

    def role(self, index: int) -> dict:
        """Chat only: the first chunk of a choice names the role."""
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def text(self, index: int, text: str, finish: str | None = None, logprobs: dict | None = None) -> dict:
        if self.kind == "completion":
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                      "finish_reason": finish}
        return self._chunk([choice])

    def usage(self, num_prompt_tokens: int, num_completion_tokens: int) -> dict:
        chunk = self._chunk([])
        chunk["usage"] = usage(num_prompt_tokens, num_completion_tokens)
        return chunk
