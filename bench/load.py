#!/usr/bin/env python
"""Load benchmark of the coordinator: many clients on the control plane, concurrent model downloads.

    .venv/bin/python bench/load.py [--clients 200] [--downloads 16] [--out FILE.json]

A coordinator runs as a subprocess (`python -m fedcybgd.cli.main coordinator --insecure ...`) on
a random fp32 Llama built here: 15 decoder layers + embeddings/head = 16 blocks (about 47 MB), so
with --max-concurrent-visits 16 the scheduler can hand out 16 tasks at once and each download
stream belongs to its own task and client (more streams than tasks reuse tasks round robin: a
repeated download of the same task is legal).

Phase 1, control plane: N clients (grpc.aio, one connection each, all in flight at once) Register
together, then Heartbeat (a) paced, each client once per --heartbeat-interval, and (b) closed
loop, each client calling again as soon as its previous call returned (saturation).
Phase 2, data plane: 1, 4 and --downloads concurrent DownloadModel streams of the whole model
(empty `have`), each consumed at full speed and repeated on the same task for --download-seconds
(one 47 MB download takes ~0.1 s, too short for 50 ms memory sampling); then the largest run
again while the N clients heartbeat (paced), to see the control plane under download load.

The coordinator's memory (VmRSS, RssAnon, RssFile from /proc/<pid>/status) is sampled every
50 ms. Blobs are served memory-mapped, so file pages mapped by a stream count in VmRSS/RssFile
(once per mapping); RssAnon is the process's own heap, the figure that must not grow with the
number of streams beyond a small per-stream buffer.

The machine is often shared: the report gives the CPU-seconds used by everything other than the
coordinator and this process during the measured phases (from /proc/stat); figures taken while
that is more than a few CPU-seconds are disturbed and should be taken again.

Exits 1 if any call failed or a download came back short.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fedcybgd.common import procfs
from fedcybgd.common.codec import GRPC_CHANNEL_OPTIONS
from fedcybgd.v1 import coordinator_pb2 as pb
from fedcybgd.v1 import coordinator_pb2_grpc as pb_grpc

MB = 1e6
MiB = 1024 * 1024
#: One TCP connection per simulated client: channels with the same target would otherwise share one.
CHANNEL_OPTIONS = [*GRPC_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "Threads")


# -- helpers ---------------------------------------------------------------------------------------
def build_model(path: Path, hidden: int, intermediate: int, layers: int) -> int:
    """A random fp32 Llama with the byte tokenizer, as a Hugging Face directory; returns its bytes."""
    import torch
    from transformers import AutoModelForCausalLM

    from fedcybgd.common.tiny import make_byte_tokenizer, tiny_config

    config = tiny_config("llama", hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path)
    make_byte_tokenizer().save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_status(pid: int) -> dict[str, int]:
    """Memory figures of a process in bytes (VmRSS, RssAnon, RssFile, RssShmem, VmHWM) and Threads."""
    return {k: v for k, v in procfs.status(pid).items() if k in STATUS_FIELDS}


def percentiles(values: list[float]) -> dict[str, float]:
    """Nearest-rank percentiles, in milliseconds."""
    if not values:
        return {"n": 0}
    s = sorted(values)

    def rank(p: float) -> float:
        return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))] * 1000

    return {"n": len(s), "p50_ms": rank(50), "p95_ms": rank(95), "p99_ms": rank(99), "max_ms": s[-1] * 1000,
            "mean_ms": sum(s) / len(s) * 1000}


class MemSampler(threading.Thread):
    """Samples the coordinator's /proc/<pid>/status every `period` seconds."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        super().__init__(name="mem-sampler", daemon=True)
        self.pid, self.period = pid, period
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._halt = threading.Event()

    def sample_now(self) -> None:
        try:
            self.samples.append((time.monotonic(), read_status(self.pid)))
        except (FileNotFoundError, ProcessLookupError):
            self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample_now()
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)

    def window(self, t0: float, t1: float) -> dict:
        picked = [s for t, s in self.samples if t0 <= t <= t1]
        if not picked:
            return {"samples": 0}
        out: dict = {"samples": len(picked)}
        for key in ("VmRSS", "RssAnon", "RssFile"):
            values = [s[key] for s in picked]
            out[key] = {"first": values[0], "peak": max(values), "median": sorted(values)[len(values) // 2]}
        out["threads_peak"] = max(s["Threads"] for s in picked)
        return out


class Phase:
    """Wall time, coordinator CPU time, bench CPU time and a memory window of one phase."""

    def __init__(self, name: str, pid: int, sampler: MemSampler) -> None:
        self.name, self.pid, self.sampler = name, pid, sampler

    def __enter__(self) -> Phase:
        self.sampler.sample_now()
        self.t0, self.cpu0, self.own0 = time.monotonic(), procfs.cpu_seconds(self.pid), time.process_time()
        self.busy0 = procfs.machine_busy_seconds()
        self.load0 = os.getloadavg()[0]
        return self

    def __exit__(self, *exc) -> None:
        self.sampler.sample_now()
        self.t1 = time.monotonic()
        coordinator, bench = procfs.cpu_seconds(self.pid) - self.cpu0, time.process_time() - self.own0
        self.result: dict[str, Any] = {
            "t0": self.t0, "t1": self.t1, "seconds": self.t1 - self.t0,
            "coordinator_cpu_s": coordinator, "bench_cpu_s": bench,
            # busy CPU-seconds of everything else on the machine: other jobs disturbing the figures
            "other_cpu_s": max(0.0, procfs.machine_busy_seconds() - self.busy0 - coordinator - bench),
            "loadavg_1min_start": self.load0, "loadavg_1min_end": os.getloadavg()[0],
            "memory": self.sampler.window(self.t0, self.t1),
        }


class Errors:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, err: BaseException) -> None:
        detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.aio.AioRpcError) else repr(err)
        self.items.append(f"{where}: {detail}")


# -- phase 1: control plane ------------------------------------------------------------------------
class SimClient:
    def __init__(self, address: str, index: int) -> None:
        self.index = index
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.CoordinatorStub(self.channel)
        self.metadata: tuple = ()
        self.client_id = ""

    async def register(self, name: str, lat: list[float], errors: Errors) -> bool:
        t0 = time.perf_counter()
        try:
            resp = await self.stub.Register(pb.RegisterRequest(name=name, device_kind="cpu", memory_bytes=8 << 30,
                                                               software_version="bench-load"), timeout=60)
        except grpc.aio.AioRpcError as err:
            errors.add(f"Register {name}", err)
            return False
        lat.append(time.perf_counter() - t0)
        self.metadata = (("authorization", f"Bearer {resp.token}"),)
        self.client_id = resp.client_id
        return True

    async def heartbeats(self, until: float, interval: float, lat: list[float], errors: Errors,
                         rng: random.Random, stop: asyncio.Event) -> None:
        request = pb.HeartbeatRequest(phase="idle", host_rss_bytes=100 * MiB + self.index)
        next_at = time.monotonic() + (rng.uniform(0, interval) if interval > 0 else 0)
        while True:
            if interval > 0:
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            if time.monotonic() >= until or stop.is_set():
                return
            t0 = time.perf_counter()
            try:
                await self.stub.Heartbeat(request, metadata=self.metadata, timeout=30)
                lat.append(time.perf_counter() - t0)
            except grpc.aio.AioRpcError as err:
                errors.add(f"Heartbeat client {self.index}", err)
            next_at += interval


async def heartbeat_run(clients: list[SimClient], seconds: float, interval: float, errors: Errors,
                        seed: int, stop: asyncio.Event | None = None) -> dict:
    """Every client heartbeats until `seconds` have passed or `stop` is set."""
    stop = stop or asyncio.Event()
    lat: list[float] = []
    rng = random.Random(seed)
    t0 = time.monotonic()
    until = t0 + seconds
    await asyncio.gather(*(c.heartbeats(until, interval, lat, errors, rng, stop) for c in clients))
    elapsed = time.monotonic() - t0
    return {"latency": percentiles(lat), "calls": len(lat), "calls_per_s": len(lat) / elapsed,
            "interval_s": interval, "seconds": elapsed}


# -- phase 2: data plane ---------------------------------------------------------------------------
async def download_stream(address: str, metadata: tuple, task_id: str, codec: int, errors: Errors,
                          where: str, min_seconds: float) -> dict | None:
    """Full-model downloads, one after another on one connection, until `min_seconds` have passed."""
    channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        stub = pb_grpc.CoordinatorStub(channel)
        t0 = time.perf_counter()
        runs: list[dict] = []
        while not runs or time.perf_counter() - t0 < min_seconds:
            one = await download_once(stub, metadata, task_id, codec, errors, f"{where} download {len(runs)}")
            if one is None:
                return None
            runs.append(one)
        seconds = time.perf_counter() - t0
        raw = sum(r["raw_bytes"] for r in runs)
        return {"seconds": seconds, "downloads": len(runs), "raw_bytes": raw,
                "wire_bytes": sum(r["wire_bytes"] for r in runs), "raw_MB_per_s": raw / MB / seconds,
                "one_download_s": {"min": min(r["seconds"] for r in runs), "max": max(r["seconds"] for r in runs)},
                "first_message_ms_max": max(r["first_message_ms"] for r in runs)}
    finally:
        await channel.close()


async def download_once(stub, metadata: tuple, task_id: str, codec: int, errors: Errors, where: str) -> dict | None:
    """One DownloadModel call with an empty `have`: the manifest, then every blob of the model."""
    accept = [pb.CODEC_ZSTD, pb.CODEC_NONE] if codec == pb.CODEC_ZSTD else [pb.CODEC_NONE]
    t0 = time.perf_counter()
    first_at = None
    raw = wire = messages = 0
    expected = -1
    blobs = 0
    try:
        call = stub.DownloadModel(pb.DownloadRequest(task_id=task_id, accept_codecs=accept), metadata=metadata,
                                  timeout=300)
        async for message in call:
            wire += message.ByteSize()
            messages += 1
            if message.HasField("manifest"):
                first_at = time.perf_counter()
                sending = set(message.manifest.sending)
                blobs = len(message.manifest.sending)
                expected = sum(b.size for b in message.manifest.blocks if b.sha256 in sending)
            else:
                raw += message.chunk.raw_size
    except grpc.aio.AioRpcError as err:
        errors.add(where, err)
        return None
    seconds = time.perf_counter() - t0
    if raw != expected:
        errors.items.append(f"{where}: received {raw} raw bytes, manifest promised {expected}")
    return {"seconds": seconds, "first_message_ms": ((first_at or t0) - t0) * 1000, "raw_bytes": raw,
            "wire_bytes": wire, "messages": messages, "blobs": blobs}


async def download_run(address: str, owners: list[tuple[tuple, str]], streams: int, codec: int,
                       errors: Errors, min_seconds: float) -> dict:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(
        download_stream(address, owners[i % len(owners)][0], owners[i % len(owners)][1], codec, errors,
                        f"DownloadModel stream {i}/{streams}", min_seconds)
        for i in range(streams)))
    wall = time.perf_counter() - t0
    ok = [r for r in results if r is not None]
    raw = sum(r["raw_bytes"] for r in ok)
    rates = sorted(r["raw_MB_per_s"] for r in ok)
    return {
        "streams": streams, "ok": len(ok), "wall_s": wall, "raw_bytes": raw,
        "wire_bytes": sum(r["wire_bytes"] for r in ok),
        "aggregate_raw_MB_per_s": raw / MB / wall,
        "per_stream_raw_MB_per_s": ({"min": rates[0], "median": rates[len(rates) // 2], "max": rates[-1]}
                                    if rates else {}),
        "full_downloads": sum(r["downloads"] for r in ok),
        "one_download_s": {"min": min(r["one_download_s"]["min"] for r in ok),
                           "max": max(r["one_download_s"]["max"] for r in ok)} if ok else {},
        "first_message_ms_max": max((r["first_message_ms_max"] for r in ok), default=0.0),
    }


# -- the benchmark ---------------------------------------------------------------------------------
async def run_load(args: argparse.Namespace, address: str, pid: int, sampler: MemSampler, report: dict,
                   errors: Errors) -> None:
    phases = report["phases"]
    # Phase 1: N connections, Register all at once, then heartbeats.
    clients = [SimClient(address, i) for i in range(args.clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(asyncio.wait_for(c.channel.channel_ready(), 60) for c in clients))
    report["connect_all_s"] = time.perf_counter() - t0
    reg_lat: list[float] = []
    with Phase("register", pid, sampler) as ph:
        oks = await asyncio.gather(*(c.register(f"load-{c.index:04d}", reg_lat, errors) for c in clients))
    phases["register"] = {**ph.result, "latency": percentiles(reg_lat), "calls": len(reg_lat),
                          "calls_per_s": len(reg_lat) / ph.result["seconds"]}
    live = [c for c, ok in zip(clients, oks, strict=True) if ok]
    with Phase("heartbeat_paced", pid, sampler) as ph:
        hb = await heartbeat_run(live, args.seconds, args.heartbeat_interval, errors, seed=1)
    phases["heartbeat_paced"] = {**ph.result, **hb}
    with Phase("heartbeat_saturated", pid, sampler) as ph:
        hb = await heartbeat_run(live, args.saturate_seconds, 0.0, errors, seed=2)
    phases["heartbeat_saturated"] = {**ph.result, **hb}

    # Phase 2: downloaders register and take one task each.
    await asyncio.sleep(1.0)
    downloaders = [SimClient(address, 10_000 + i) for i in range(args.downloads)]
    for d in downloaders:
        await d.register(f"download-{d.index - 10_000:02d}", [], errors)
    owners: list[tuple[tuple, str]] = []
    for d in downloaders:
        if not d.metadata:
            continue
        try:
            resp = await d.stub.GetTask(pb.GetTaskRequest(wait_seconds=0), metadata=d.metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            errors.add("GetTask", err)
            continue
        if resp.HasField("task"):
            owners.append((d.metadata, resp.task.task_id))
    report["tasks_in_flight"] = len(owners)
    if not owners:
        errors.items.append("no task could be taken: nothing to download")
        return
    if len(owners) < args.downloads:
        report["note"] = (f"the scheduler handed out {len(owners)} tasks at once; "
                          f"{args.downloads} streams share them round robin")
    codec = pb.CODEC_ZSTD if args.codec == "zstd" else pb.CODEC_NONE
    levels = sorted({1, min(4, args.downloads), args.downloads})
    for k in levels:
        await asyncio.sleep(1.5)  # let the previous run's buffers go; the window's first sample is the level before
        pre = read_status(pid)
        with Phase(f"download_{k}", pid, sampler) as ph:
            dl = await download_run(address, owners, k, codec, errors, args.download_seconds)
        phases[f"download_{k}"] = {**ph.result, **dl, "before": pre}
    # The largest run again with the control plane busy: heartbeat latency under download load.
    await asyncio.sleep(1.5)
    with Phase("download_with_heartbeats", pid, sampler) as ph:
        stop = asyncio.Event()
        hb_future = asyncio.ensure_future(heartbeat_run(live, 1e9, args.heartbeat_interval, errors, seed=3, stop=stop))
        dl = await download_run(address, owners, args.downloads, codec, errors, args.download_seconds)
        stop.set()
        hb = await hb_future
    phases["download_with_heartbeats"] = {**ph.result, **dl, "heartbeats": hb}
    await asyncio.gather(*(c.channel.close() for c in clients + downloaders))


def summarise(report: dict) -> None:
    ph = report["phases"]
    base = report["baseline"]
    model = report["model_bytes"]

    def mem(p: str, key: str) -> int:
        return ph[p]["memory"][key]["peak"] if p in ph and ph[p]["memory"].get("samples") else 0

    downloads = [p for p in ph if p.startswith("download_") and p[9:].isdigit()]
    levels = sorted(int(p[9:]) for p in downloads)
    summary: dict = {}
    if len(levels) >= 2:
        lo, hi = levels[0], levels[-1]
        for key in ("VmRSS", "RssAnon"):
            per = (mem(f"download_{hi}", key) - mem(f"download_{lo}", key)) / (hi - lo)
            summary[f"extra_{key}_per_stream_bytes"] = per
            summary[f"extra_{key}_per_stream_vs_model"] = per / model
    report["summary"] = summary

    print()
    print(f"model: {report['num_blocks']} blocks, {model / MB:.1f} MB fp32; "
          f"coordinator pid {report['coordinator_pid']}; "
          f"load avg before/after: {report['loadavg_before']} / {report['loadavg_after']}")
    print(f"{args_line(report)}")
    if report.get("note"):
        print(f"note: {report['note']}")
    print()
    print(f"{'control plane':<28}{'calls':>8}{'calls/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'max ms':>9}"
          f"{'coord CPU s':>12}")
    rows = [("Register (all at once)", ph["register"]),
            (f"Heartbeat paced ({ph['heartbeat_paced']['interval_s']:g} s)", ph["heartbeat_paced"]),
            ("Heartbeat closed loop", ph["heartbeat_saturated"])]
    if "download_with_heartbeats" in ph:
        rows.append((f"Heartbeat + {ph['download_with_heartbeats']['streams']} downloads",
                     {**ph["download_with_heartbeats"]["heartbeats"],
                      "coordinator_cpu_s": ph["download_with_heartbeats"]["coordinator_cpu_s"]}))
    for name, r in rows:
        lat = r["latency"]
        print(f"{name:<28}{r['calls']:>8}{r['calls_per_s']:>9.0f}"
              f"{lat.get('p50_ms', 0):>9.1f}{lat.get('p95_ms', 0):>9.1f}"
              f"{lat.get('p99_ms', 0):>9.1f}{lat.get('max_ms', 0):>9.1f}{r['coordinator_cpu_s']:>12.1f}")
    print()
    print(f"{'downloads (full model, repeated)':<34}{'models':>7}{'wall s':>8}{'agg MB/s':>9}"
          f"{'per-stream MB/s min/med/max':>29}{'one model s':>12}")
    for k in levels:
        r = ph[f"download_{k}"]
        s, one = r["per_stream_raw_MB_per_s"], r["one_download_s"]
        print(f"{f'{k} concurrent stream(s)':<34}{r['full_downloads']:>7}{r['wall_s']:>8.2f}"
              f"{r['aggregate_raw_MB_per_s']:>9.1f}{s['min']:>15.1f} /{s['median']:>5.1f} /{s['max']:>5.1f}"
              f"{one['min']:>6.2f}-{one['max']:.2f}")
    print()
    print(f"coordinator memory (MB)     {'VmRSS':>10}{'RssAnon':>10}{'RssFile':>10}")
    print(f"{'baseline (idle)':<28}{base['VmRSS'] / MB:>10.1f}{base['RssAnon'] / MB:>10.1f}"
          f"{base['RssFile'] / MB:>10.1f}")
    for name in ("register", "heartbeat_paced", "heartbeat_saturated", *[f"download_{k}" for k in levels],
                 "download_with_heartbeats"):
        if name in ph and ph[name]["memory"].get("samples"):
            print(f"{'peak ' + name:<28}{mem(name, 'VmRSS') / MB:>10.1f}{mem(name, 'RssAnon') / MB:>10.1f}"
                  f"{mem(name, 'RssFile') / MB:>10.1f}")
    print(f"{'VmHWM at the end':<28}{report['final_status']['VmHWM'] / MB:>10.1f}")
    if summary:
        lo, hi = levels[0], levels[-1]
        print()
        print(f"extra memory per concurrent stream, (peak{hi} - peak{lo}) / {hi - lo}: "
              f"VmRSS {summary['extra_VmRSS_per_stream_bytes'] / MB:.2f} MB "
              f"({summary['extra_VmRSS_per_stream_vs_model'] * 100:.1f} % of the model), "
              f"RssAnon {summary['extra_RssAnon_per_stream_bytes'] / MB:.2f} MB "
              f"({summary['extra_RssAnon_per_stream_vs_model'] * 100:.1f} % of the model)")
    other = sum(p.get("other_cpu_s", 0) for p in ph.values())
    measured = sum(p.get("seconds", 0) for p in ph.values())
    report["other_cpu_s"] = other
    print(f"CPU used by other processes during the measured phases: {other:.1f} CPU-s over {measured:.0f} s "
          f"({other / max(measured, 1e-9) / (report['cpus'] or 1) * 100:.0f} % of the machine)")
    print(f"errors: {len(report['errors'])}")
    for e in report["errors"][:20]:
        print(f"  {e}")


def args_line(report: dict) -> str:
    a = report["args"]
    return (f"{a['clients']} clients, heartbeat paced {a['heartbeat_interval']} s for {a['seconds']} s "
            f"then closed loop for {a['saturate_seconds']} s; downloads with codec {a['codec']}; tasks in flight: "
            f"{report.get('tasks_in_flight')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--downloads", type=int, default=16, help="concurrent download streams of the largest run")
    parser.add_argument("--seconds", type=float, default=15.0, help="paced heartbeat phase length")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0,
                        help="seconds between a client's heartbeats in the paced phase (the daemon's default is 5)")
    parser.add_argument("--saturate-seconds", type=float, default=8.0, help="closed-loop heartbeat phase length")
    parser.add_argument("--codec", choices=["zstd", "none"], default="zstd",
                        help="what the downloaders accept (real clients accept zstd)")
    parser.add_argument("--download-seconds", type=float, default=5.0,
                        help="each stream repeats full-model downloads (same task) at least this long")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=15, help="decoder layers (blocks = layers + 1)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (model, state, log)")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="fedcybgd-load-"))
    report: dict = {"args": vars(args), "phases": {}, "cpus": os.cpu_count(),
                    "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    errors = Errors()
    proc = None
    sampler = None
    try:
        t0 = time.monotonic()
        model_dir = tmp / "model"
        report["model_bytes"] = build_model(model_dir, args.hidden, args.intermediate, args.layers)
        report["build_model_s"] = time.monotonic() - t0
        port = free_port()
        address = f"127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "fedcybgd.cli.main", "coordinator", "--insecure", "--model", str(model_dir),
               "--state-dir", str(tmp / "state"), "--address", address,
               "--max-concurrent-visits", str(max(1, args.downloads)), "--task-timeout", "600"]
        report["coordinator_cmd"] = " ".join(cmd)
        # The coordinator writes to it for as long as it runs: not closed before the process ends.
        log_file = open(tmp / "coordinator.log", "wb")  # noqa: SIM115
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
        report["coordinator_pid"] = proc.pid
        sampler = MemSampler(proc.pid)
        sampler.start()
        wait_serving(address, proc, tmp)
        report["coordinator_start_s"] = time.monotonic() - t0
        with grpc.insecure_channel(address, options=GRPC_CHANNEL_OPTIONS) as channel:
            status = pb_grpc.CoordinatorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
        report["num_blocks"] = status.num_blocks
        report["model_bytes"] = status.model_bytes or report["model_bytes"]
        time.sleep(2.0)
        idle_from = time.monotonic()
        time.sleep(2.0)
        idle = sampler.window(idle_from, time.monotonic())
        report["baseline"] = {k: idle[k]["median"] for k in ("VmRSS", "RssAnon", "RssFile")}
        asyncio.run(run_load(args, address, proc.pid, sampler, report, errors))
        if proc.poll() is not None:
            errors.items.append(f"coordinator exited with {proc.returncode} during the run")
        else:
            report["final_status"] = read_status(proc.pid)
    finally:
        if sampler is not None:
            sampler.stop()
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        report["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
        report["errors"] = errors.items
        if errors.items and (tmp / "coordinator.log").exists():
            tail = (tmp / "coordinator.log").read_text(errors="replace").splitlines()[-15:]
            print("coordinator log (tail):\n  " + "\n  ".join(tail), file=sys.stderr)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    report.setdefault("final_status", {"VmHWM": 0})
    if sampler is not None and sampler.samples:
        origin = sampler.samples[0][0]
        report["memory_trace_columns"] = ["t_s", "VmRSS", "RssAnon", "RssFile"]
        report["memory_trace"] = [[round(t - origin, 3), m["VmRSS"], m["RssAnon"], m["RssFile"]]
                                  for t, m in sampler.samples]
        report["phase_times"] = {name: [round(p["t0"] - origin, 3), round(p["t1"] - origin, 3)]
                                 for name, p in report["phases"].items() if "t0" in p}
    summarise(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"figures written to {args.out}")
    return 1 if errors.items else 0


def wait_serving(address: str, proc: subprocess.Popen, tmp: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        # Any: types-grpcio-health-checking, where installed, declares no methods on HealthStub.
        stub: Any = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"coordinator exited with {proc.returncode}:\n"
                                   + (tmp / "coordinator.log").read_text(errors="replace")[-3000:])
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError(f"coordinator not serving on {address} after {timeout:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
