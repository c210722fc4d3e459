"""Adapter methods with batched multi-adapter ops, one package per method.

Each method package has `config.py` (the adapter's settings, parsed from the
Hugging Face PEFT format), `weights.py` (load / save), `ops.py` (the batched op
and its `*_ref` reference) and `layer.py` (the module that wraps a base layer).
Only torch, safetensors and peft's file formats are imported here; coserve
builds on these packages, never the other way round.
"""
