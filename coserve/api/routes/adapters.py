"""`POST /v1/load_lora_adapter` and `POST /v1/unload_lora_adapter`, with vLLM's bodies and answers.

A loaded adapter is served at once under its name (`model` = the name). Paths
must resolve inside `--adapter-root` directories (no `..` or symlink escape) and
hold safetensors weights; without any adapter root, loading over HTTP is off.
"""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse

from coserve.api.auth import require_api_key
from coserve.api.errors import APIError
from coserve.api.inference import runner_of
from coserve.api.paths import check_adapter_dir, resolve_in_roots
from coserve.api.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from coserve.api.routes.models import ADAPTER_CREATED
from coserve.api.state import get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

MAX_NAME_LENGTH = 256


@router.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request):
    state = get_state(request)
    name = _check_name(body.lora_name, state.settings.model_id)
    roots = state.settings.adapter_roots
    path = resolve_in_roots(body.lora_path, roots)
    check_adapter_dir(path, roots)
    runner = runner_of(state)
    if name in await runner.control(state.backend.list_adapters):
        raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name",
                       code="adapter_exists")
    try:
        # NOTE: the resolved path goes to the engine, not the client's string, so a symlink swapped in
        # after the check above is not followed again to a new place.
        await runner.control(state.backend.load_adapter, name, str(path))
    except (ValueError, KeyError, OSError) as exc:
        raise APIError(400, f"cannot load adapter '{name}' from {path}: {_message(exc)}", param="lora_path",
                       code="invalid_adapter") from None
    state.adapter_paths[name] = str(path)
    state.extras[ADAPTER_CREATED][name] = int(time.time())
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request):
    state = get_state(request)
    name = body.lora_name
    runner = runner_of(state)
    if name not in await runner.control(state.backend.list_adapters):
        raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                       code="adapter_not_found")
    try:
        await runner.control(state.backend.unload_adapter, name)
    except KeyError as exc:   # unloaded meanwhile by another request
        raise APIError(404, _message(exc), param="lora_name", code="adapter_not_found") from None
    except ValueError as exc:   # in use by running requests or a training job
        raise APIError(409, f"cannot unload adapter '{name}': {exc}", param="lora_name",
                       code="adapter_in_use") from None
    state.adapter_paths.pop(name, None)
    state.extras[ADAPTER_CREATED].pop(name, None)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")


def _check_name(name: str, base_id: str) -> str:
    if not name or len(name) > MAX_NAME_LENGTH or any(c.isspace() or not c.isprintable() for c in name):
        raise APIError(400, f"lora_name must be 1 to {MAX_NAME_LENGTH} printable characters without spaces",
                       param="lora_name")
    if name == base_id:
        raise APIError(400, f"lora_name '{name}' is the base model's id; pick another name", param="lora_name")
    return name


def _message(exc: Exception) -> str:
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
