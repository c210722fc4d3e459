"""`coserve demo`: the platform end to end on SmolLM2-135M-Instruct.

The default (`served.py`) starts the HTTP server over a local Ray deployment,
sends chat traffic through the OpenAI API, fine-tunes an adapter on facts
about a made-up product while the traffic goes on, and shows what it learned.
`--offline` (`offline.py`) shows the Python API alone.
"""
from __future__ import annotations


def run_demo(offline: bool = False, **options) -> None:
    if offline:
        from coserve.demo.offline import run_demo as run_offline

        run_offline(max_tokens=options.get("max_tokens", 48), device=options.get("device", "auto"))
        return
    from coserve.demo.served import run_served_demo

    run_served_demo(**options)
