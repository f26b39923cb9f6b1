"""The peak memory a visit reports (``VisitResult.peak_memory_bytes``): what a participant must have free to train,
measured the same way by the client, the single-process references and the benchmarks so that their figures
compare. On a GPU it is the CUDA allocator's peak; on CPU the process's peak resident set size, reset at the start
of the visit where Linux allows it."""

from __future__ import annotations

import sys

import torch

from fedcybgd.common import procfs

__all__ = ["peak_memory", "reset_peak_memory"]


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak on ``device``: the next ``peak_memory`` covers only what happens from here on (on CPU
    outside Linux, the process's lifetime peak is all there is)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        procfs.reset_peak_rss()


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak since ``reset_peak_memory``: CUDA memory allocated on a GPU, else the peak RSS."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    peak = procfs.peak_rss_bytes()
    if peak is not None:
        return peak
    try:  # not Linux: lifetime peak (bytes on macOS, kB elsewhere)
        import resource  # Unix only

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return 0
    return int(maxrss if sys.platform == "darwin" else maxrss * 1024)
