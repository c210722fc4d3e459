"""Benchmarks: each prints one JSON object of figures measured against baselines run in the same process.

`inference.py` is the multi-LoRA serving benchmark (`coserve bench inference`);
`workload.py` builds its requests and PEFT adapters, `hf_baseline.py` runs the
Hugging Face baselines, `machine.py` measures the machine (GEMM peak) and
counts model FLOPs. See DESIGN section 6: numbers are ratios, never asserted.
"""
