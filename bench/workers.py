"""Running a benchmark's measurement in a process of its own (peak RSS is per process) and reading its result."""
from __future__ import annotations

import json
import os
import subprocess
from typing import Any

__all__ = ["run_json_worker"]


def run_json_worker(cmd: list[str], threads: int, what: str) -> Any:
    """Run ``cmd`` (a worker that prints its result as JSON on its last line of output) and return that result;
    SystemExit with the end of its stderr when it fails.

    Its OpenMP pool has ``threads`` threads and is passive: idle threads sleep at once instead of spinning, which on
    a machine other processes share keeps a step from waiting on a descheduled sibling (measured: 50x slower steps
    on the tiny model at load average 6 without it)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
