"""The HTTP front end: an OpenAI-compatible API (completions, chat, models, files,
fine-tuning jobs), Prometheus `/metrics`, `/health` and the web dashboard, in
front of a local engine or a cluster Deployment (`backend.py`).

`create_app(backend, settings)` in `app.py` builds the FastAPI application.
"""
