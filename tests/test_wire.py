"""The benchmarks' wire tools (bench/wire.py) on a real run: the demo's clients reach the coordinator through the
byte-counting proxy (``--port`` / ``--clients-dial``), whose counts must cover what the coordinator itself accounts
for, and the process sampler finds both sides' processes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PROCESS_ENV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from wire import ByteCountingProxy, ProcessSampler, free_port  # noqa: E402

pytestmark = pytest.mark.multiprocess


def test_demo_through_the_counting_proxy(tmp_path):
    port = free_port()
    sampler = ProcessSampler().start()
    with ByteCountingProxy(f"127.0.0.1:{port}", tmp_path / "stats.json") as proxy:
        demo = subprocess.Popen(
            [sys.executable, "-m", "fedcybgd.cli.main", "--log-level", "warning", "demo", "--model", "tiny",
             "--clients", "2", "--cycles", "1", "--local-steps", "2", "--seq-len", "64", "--lr-schedule", "constant",
             "--port", str(port), "--clients-dial", proxy.address, "--out", str(tmp_path / "demo")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=PROCESS_ENV)
        sampler.add_root("demo", demo.pid)
        output, _ = demo.communicate(timeout=300)
        wire = proxy.stop()
    report = sampler.stop()
    assert demo.returncode == 0, output
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    # Everything the clients exchanged passed through the proxy: the blobs the coordinator counts, plus gRPC
    # framing, TLS records, enrolment and polling (small next to the blobs, but not nothing).
    assert summary["total_bytes_down"] <= wire.down <= 1.5 * summary["total_bytes_down"] + 2_000_000
    assert summary["total_bytes_up"] <= wire.up <= 1.5 * summary["total_bytes_up"] + 2_000_000
    assert wire.connections >= 2  # one channel per client at least
    assert len({v["lr"] for v in summary["visits"]}) == 1  # --lr-schedule constant reached the coordinator
    usage = report.role("demo")
    commands = " ".join(p.cmdline for p in usage.processes)
    assert "coordinator" in commands and commands.count(" client ") >= 2
    assert usage.max_hwm_bytes > 0 and usage.peak_rss_anon_sum_bytes > 0
