"""Prometheus metrics of a client daemon, on its own endpoint (`--metrics-port`).

GPU memory comes from torch's CUDA allocator statistics, and from NVML (the driver's view,
which includes other processes) when the `pynvml` module is present.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fedcybgd.common.procfs import rss_bytes


class ClientMetrics:
    def __init__(self, device: torch.device, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.transfer_bytes = Counter("fedcybgd_client_transfer_bytes_total", "Bytes on the wire", ["direction"],
                                      registry=r)
        self.visits = Counter("fedcybgd_client_visits_total", "Visits by outcome", ["outcome"], registry=r)
        self.step_seconds = Histogram("fedcybgd_client_step_seconds", "Duration of one local training step",
                                      buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30), registry=r)
        self.tokens_per_second = Gauge("fedcybgd_client_tokens_per_second", "Training throughput of the last visit",
                                       registry=r)
        self.train_loss = Gauge("fedcybgd_client_train_loss", "Loss of the last local step", registry=r)
        self.visit_peak = Gauge("fedcybgd_client_visit_peak_memory_bytes",
                                "Peak memory of the last visit (CUDA allocated, or RSS on CPU)", registry=r)
        self.dp_epsilon = Gauge("fedcybgd_client_dp_epsilon", "Differential privacy this site has spent in the run "
                                "(epsilon at the run's delta), by level: records (DP-SGD) or updates", ["level"],
                                registry=r)
        self.cache_bytes = Gauge("fedcybgd_client_cache_bytes",
                                 "Bytes of the block cache on disk (blobs and partial downloads)", registry=r)
        self.cache_limit = Gauge("fedcybgd_client_cache_limit_bytes", "Budget of the block cache (--cache-max-bytes)",
                                 registry=r)
        self.cache_evicted = Counter("fedcybgd_client_cache_evicted_blobs_total",
                                     "Blobs the cache's retention rule removed", registry=r)
        rss = Gauge("fedcybgd_client_host_memory_bytes", "Resident memory of the daemon", registry=r)
        rss.set_function(rss_bytes)
        gpu = Gauge("fedcybgd_client_gpu_memory_bytes", "CUDA allocator memory (0 on CPU-only clients)", ["kind"],
                    registry=r)
        cuda = device.type == "cuda"
        stats = {
            "allocated": lambda: torch.cuda.memory_allocated(device),
            "reserved": lambda: torch.cuda.memory_reserved(device),
            "peak_allocated": lambda: torch.cuda.max_memory_allocated(device),
            "peak_reserved": lambda: torch.cuda.max_memory_reserved(device),
        }
        for kind, read in stats.items():
            gpu.labels(kind=kind).set_function(read if cuda else (lambda: 0))
        if cuda:
            self._add_nvml(device)
        for outcome in ("completed", "withdrawn"):
            self.visits.labels(outcome=outcome)
        for direction in ("down", "up"):
            self.transfer_bytes.labels(direction=direction)

    def watch_cache(self, disk_bytes: Callable[[], int], limit: Callable[[], int]) -> None:
        """Read the cache's size and budget at each scrape (both change between visits)."""
        self.cache_bytes.set_function(disk_bytes)
        self.cache_limit.set_function(limit)

    def _add_nvml(self, device: torch.device) -> None:
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        except pynvml.NVMLError:
            return
        used = Gauge("fedcybgd_client_gpu_used_bytes", "GPU memory in use on the device (NVML, all processes)",
                     registry=self.registry)
        used.set_function(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used)

    def serve(self, port: int, address: str = "127.0.0.1"):
        return start_http_server(port, addr=address, registry=self.registry)
