"""Shared fixtures: a tiny model on disk, per-client data, a real coordinator on loopback and
real client daemon processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fedcybgd.common.tiny import TINY_TEXT, write_tiny_model_dir

# Two cores: one torch thread per process keeps concurrent processes from thrashing and makes
# CPU results bit-reproducible.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny-llama", arch="llama", seed=0)


def sonnets() -> list[str]:
    return [t.strip() for t in TINY_TEXT.split("\n\n") if t.strip()]


def write_data(tmp_path: Path, clients: int) -> tuple[list[Path], Path]:
    """Disjoint whole documents per client, plus held-out documents for the coordinator."""
    docs = sonnets()
    eval_docs, rest = docs[:8], docs[8:]
    paths = []
    for c in range(clients):
        path = tmp_path / "data" / f"client-{c}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in rest[c::clients]))
        paths.append(path)
    eval_path = tmp_path / "data" / "eval.jsonl"
    eval_path.write_text("".join(json.dumps({"text": d}) + "\n" for d in eval_docs))
    return paths, eval_path


def start_client(address: str, data: Path, cache_dir: Path, name: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    log = open(cache_dir.parent / f"{name}.log", "a")
    return subprocess.Popen(
        [sys.executable, "-m", "fedcybgd.cli.main", "client", "--coordinator", address, "--data", str(data),
         "--cache-dir", str(cache_dir), "--name", name, "--threads", "1", "--device", "cpu", "--insecure", *extra],
        stdout=log, stderr=subprocess.STDOUT, env=env)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def wait_clients(procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    assert [p.returncode for p in procs] == [0] * len(procs), "a client daemon failed (see its log)"
