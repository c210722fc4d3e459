"""Request bodies of the OpenAI-compatible routes (pydantic), with OpenAI's names and defaults.

Validation here gives the 400s that name a field (wrong type, out of range);
checks that need the model (prompt length, max_tokens room, known model) live
in `coserve.api.inference`. Types are strict (no "5" for 5, no true for 1) so a
client bug is reported, not guessed around. Unknown fields are ignored, as
OpenAI clients send fields this server has no use for (`user`, ...).
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

MAX_N = 16
"""Most choices (`n`) per prompt."""
MAX_STOP = 16
MAX_LOGPROBS = 20
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1   # what torch.Generator.manual_seed accepts

Float = Annotated[float, Field(strict=True)]   # ints pass (JSON 1 is a valid float), strings do not
Stop = Union[StrictStr, Annotated[list[StrictStr], Field(max_length=MAX_STOP)], None]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: StrictBool = False
    """Send a last chunk with `usage` and no choices before `[DONE]`."""


class _SamplingFields(_Body):
    """Fields completions and chat share."""

    model: StrictStr
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[Float, Field(ge=0.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: Annotated[StrictInt, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: Float | None = None
    frequency_penalty: Float | None = None
    # vLLM-style extensions (not in OpenAI's API).
    top_k: Annotated[StrictInt, Field(ge=-1)] | None = None
    ignore_eos: StrictBool = False
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0)]] | None = None


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """Return the sampled token's logprob and this many most likely alternatives per position."""
    echo: StrictBool = False
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, list[TextPart], None] = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[dict] | None = None
    response_format: dict | None = None


class LoadLoRAAdapterRequest(_Body):
    """POST /v1/load_lora_adapter (vLLM's body)."""

    lora_name: StrictStr
    lora_path: StrictStr


class UnloadLoRAAdapterRequest(_Body):
    """POST /v1/unload_lora_adapter (vLLM's body; lora_int_id is accepted and ignored)."""

    lora_name: StrictStr
    lora_int_id: StrictInt | None = None
