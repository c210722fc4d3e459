"""`GET /v1/models` and `GET /v1/models/{id}`: the base model and every adapter the backend serves.

Adapters (loaded at start, over HTTP, or trained by a fine-tuning job) list with
`parent` = the base model's id and `root` = the directory they came from
(`state.adapter_paths`, filled by whoever loaded them; None when unknown).
"""
from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from coserve.api.auth import require_api_key
from coserve.api.errors import model_not_found
from coserve.api.inference import runner_of
from coserve.api.state import ServerState, get_state

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])

ADAPTER_CREATED = "adapter_created"   # extras key: adapter name -> unix time it was loaded by this server


def setup(state: ServerState) -> None:
    state.extras.setdefault(ADAPTER_CREATED, {})


async def list_model_cards(state: ServerState) -> list[dict]:
    adapters = await runner_of(state).control(state.backend.list_adapters)
    base = state.settings.model_id
    cards = [_card(base, state.started_at, root=str(state.backend.model_path), parent=None,
                   max_model_len=state.backend.max_model_len)]
    created = state.extras.get(ADAPTER_CREATED, {})
    for name in adapters:
        if name == base:
            continue
        cards.append(_card(name, created.get(name, state.started_at), root=state.adapter_paths.get(name),
                           parent=base, max_model_len=state.backend.max_model_len))
    return cards


def _card(model_id: str, created: int, *, root, parent, max_model_len: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "coserve", "root": root,
            "parent": parent, "max_model_len": max_model_len}


@router.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": await list_model_cards(get_state(request))}


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict:
    cards = await list_model_cards(get_state(request))
    for card in cards:
        if card["id"] == model_id:
            return card
    raise model_not_found(model_id, [c["id"] for c in cards])
