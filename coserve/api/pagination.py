"""OpenAI cursor pages: `{"object": "list", "data", "has_more", "first_id", "last_id"}` with `after` / `limit`.

The `openai` client pages by sending the last id it saw as `after`; items are
given here already in listing order (e.g. newest first), and a page is the
`limit` items that follow `after` in that order.
"""
from __future__ import annotations

from coserve.api.errors import APIError


def cursor_page(items: list[dict], after: str | None, limit: int, *, max_limit: int) -> dict:
    """One page of `items` (each with an "id"). Raises APIError 400 for a bad `limit` or unknown `after`."""
    if not 1 <= limit <= max_limit:
        raise APIError(400, f"limit must be between 1 and {max_limit}, got {limit}", param="limit")
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise APIError(400, f"after={after!r} is not an id in this list", param="after")
        start = ids.index(after) + 1
    data = items[start:start + limit]
    return {"object": "list", "data": data, "has_more": start + limit < len(items),
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
