"""Keeps Python's full garbage collections short while the engine serves.

A full collection scans every tracked object. After torch and transformers
are imported that is hundreds of thousands of objects, and one pass took up
to 190 ms on a 2-core CPU: longer than a whole iteration, so every request
running at that moment missed its TPOT. Before the engine builds its own
objects, the heap that already exists (imported modules and their state,
which live until exit) is collected once and moved to the permanent
generation with `gc.freeze()`, as vLLM's engine does, so later full
collections scan only what was created since. The engine's own objects are
created after the freeze and stay collectable: its reference cycles are
freed when it is dropped. The cost: a reference cycle among objects alive
at the freeze that is dropped later is never freed (reference counting
still frees everything else), which is why only what exists before the
engine is frozen.
"""
from __future__ import annotations

import gc


def freeze_existing_heap() -> None:
    """Collect garbage now, then exempt every object alive from later collections."""
    gc.collect()
    gc.freeze()
