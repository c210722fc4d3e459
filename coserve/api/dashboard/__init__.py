"""The web dashboard's server side and its bundled page.

`history.py` turns the backend's cumulative stats into a ring buffer of
per-second samples (rates, latency percentiles, queues, KV use) and shapes the
JSON snapshot the page renders; `static/` holds the page itself (HTML, CSS and
vanilla JS with hand-written SVG charts, no external assets). The routes live
in `coserve/api/routes/dashboard.py`.
"""
