"""The CPU fast path for LoRA segments of a few rows (decode batches).

`csrc/lora_cpu.cpp` streams each adapter weight row once and keeps a
segment's partial results in AVX-512 registers; a GEMM library, given 1 to 8
rows, packs its operands and reaches a fraction of the memory bandwidth.
It is compiled on first use with torch's extension builder (g++, ninja) into
torch's extension cache, so later processes load it in well under a second.
`load_cpu_kernel()` returns None, with the reason, where it cannot run: no
AVX-512, no compiler, a failed build, or COSERVE_LORA_CPU_KERNEL=0.

The kernel's `LoRAGroup` (used by `group.LoRAGroup`) has the semantics of
`ops.lora_apply_grouped` for the segments of a `KernelPlan`; segments of more
than `KERNEL_MAX_ROWS` rows (prefill chunks) still go to the GEMM library,
which is faster there. `few_rows_linear` is the kernel's shrink as a plain
x @ W^T: the model uses it for the vocabulary projection of a few rows and for
that projection's input gradient in finetuning.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from peft_methods.lora.ops import Segment


KERNEL_MAX_ROWS = 128
"""Measured on 2 AVX-512 cores: the kernel wins up to 128 rows per segment, the GEMM from 256."""
_SOURCE = Path(__file__).with_name("csrc") / "lora_cpu.cpp"
_DISABLE_ENV = "COSERVE_LORA_CPU_KERNEL"


@functools.cache
def load_cpu_kernel() -> tuple[ModuleType | None, str]:
    """Build (once per machine) and load the extension; (module, "") or (None, why not)."""
    return build_cpu_extension("coserve_lora_cpu", _SOURCE, _DISABLE_ENV)


def build_cpu_extension(name: str, source: Path, disable_env: str) -> tuple[ModuleType | None, str]:
    """Build an AVX-512 C++ source into torch's extension cache and load it: (module, "") or
    (None, why not): `disable_env` set to 0, no AVX-512, no compiler or a failed build."""
    if os.environ.get(disable_env, "1") == "0":
        return None, f"{disable_env}=0"
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX512":
        return None, f"the CPU kernel needs AVX-512, this CPU offers {capability}"
    try:
        from torch.utils import cpp_extension

        module = cpp_extension.load(
            name=name,
            sources=[str(source)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as error:  # noqa: BLE001 - any build failure means: use the torch path
        return None, f"building {source.name} failed ({type(error).__name__}: {str(error).strip()[:300]})"
    return module, ""


def kernel_applies(y: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether this call can take the kernel: fp32 CPU rows, contiguous, no autograd."""
    return (
        y.dtype == torch.float32
        and x.dtype == torch.float32
        and y.device.type == "cpu"
        and x.device.type == "cpu"
        and y.stride(1) == 1
        and x.stride(1) == 1
        and not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad))
    )


def few_rows_linear(kernel: ModuleType, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [n, in] @ weight[out, in]^T through the kernel's shrink: each weight row is read once.

    Faster than the GEMM library for up to about 64 rows on any weight; callers check
    `kernel_applies` (fp32, contiguous rows, no autograd) and pass a contiguous weight.
    """
    return kernel.lora_shrink(x, [0], [x.shape[0]], [weight])[0]


@dataclass(frozen=True, eq=False)
class KernelPlan:
    """A batch's segments split between the kernel and the GEMM, made once per batch (every layer reads it)."""

    table: torch.Tensor
    """Segments of up to KERNEL_MAX_ROWS rows, as the int64 [S, 3] (slot, start, end) table the kernel reads."""
    large: list[Segment]
    """Segments of more than KERNEL_MAX_ROWS rows: left to the GEMM library."""

    @classmethod
    def of(cls, segments: Sequence[Segment]) -> "KernelPlan":
        small = [seg for seg in segments if seg[2] - seg[1] <= KERNEL_MAX_ROWS]
        return cls(torch.tensor(small, dtype=torch.long).reshape(len(small), 3),
                   [seg for seg in segments if seg[2] - seg[1] > KERNEL_MAX_ROWS])

    @property
    def num_kernel_segments(self) -> int:
        return self.table.shape[0]
