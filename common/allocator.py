"""Host memory handed back when a tensor is freed, not kept by the C allocator.

PyTorch's CPU tensors come from glibc's ``malloc``. glibc serves a request above its mmap threshold with a mapping of
its own, returned to the kernel on ``free``; anything below comes from the heap, whose free holes stay resident. The
threshold starts at 128 KiB but glibc *raises* it, up to 32 MiB, each time a mapped block is freed: after the first
steps of a visit, activations, gradients and logits chunks of up to 32 MiB come from the heap, and its holes (a
later tensor rarely fits one exactly) keep hundreds of MiB resident that no tensor uses. Measured on SmolLM2-135M
(docs/benchmarks.md, issue 12): a visit's peak RSS drops by ~200 MiB with a fixed threshold, at no measurable cost in
step time. Setting the threshold explicitly (``mallopt(M_MMAP_THRESHOLD)``) also turns off the raising.

CUDA memory is not concerned (torch's caching allocator); neither are other C libraries' allocators (musl, macOS),
where this does nothing.
"""
from __future__ import annotations

import ctypes
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "return_freed_memory"]

#: Allocations from this size up get a mapping of their own (glibc's M_MMAP_THRESHOLD).
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's <malloc.h>


def return_freed_memory(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Have glibc map every allocation of ``threshold`` bytes or more on its own, so that freeing it returns it to the
    kernel; call it at the start of a process that trains on CPU. Returns whether the setting took (False off
    glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold))
