"""Facts about the host a client daemon runs on, and where it keeps its secrets: the device kind and memory it
announces, its GPU peaks, its software version, the run's prompt format, private files."""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

import torch

from fedcybgd.common.procfs import mem_available_bytes
from fedcybgd.common.prompts import PromptFormat
from fedcybgd.v1 import coordinator_pb2 as pb

__all__ = ["prompt_format_of", "software_version", "device_kind", "memory_bytes", "gpu_peaks", "write_private"]


def prompt_format_of(info: pb.ModelInfo) -> PromptFormat:
    """The run's prompt format, as the coordinator fixed it."""
    if not info.prompt_template:
        raise ValueError("the coordinator sent no prompt format: it is older than this client; update it")
    return PromptFormat(info.prompt_template, info.prompt_name or "coordinator's", info.train_on or "responses")


def software_version() -> str:
    try:
        return importlib.metadata.version("fedcybgd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def device_kind(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def memory_bytes(device: torch.device) -> int:
    """The memory a visit may use when none is configured: the GPU's on CUDA; on CPU what the host has
    available now (MemAvailable: not what is installed, since other processes hold part of it)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    available = mem_available_bytes()
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gpu_peaks(device: torch.device) -> dict[str, int]:
    if device.type != "cuda":
        return {}
    return {"gpu_peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "gpu_peak_reserved_bytes": torch.cuda.max_memory_reserved(device)}


def write_private(path: Path, text: str) -> None:
    """Credentials: readable by this user only, replaced atomically."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
