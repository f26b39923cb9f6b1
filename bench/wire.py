#!/usr/bin/env python
"""System-neutral measuring tools for side-by-side benchmarks: bytes on the wire and per-process memory and CPU.

Both systems of a comparison are measured with the same instruments, outside either system's code:

* ``ByteCountingProxy``: a TCP proxy on loopback between clients and a server. It counts bytes at the socket level,
  so it sees whatever the system really sends (gRPC/HTTP2 framing, TLS, compression and all) and needs no knowledge
  of the protocol. It runs in a process of its own, so its CPU is charged to neither system.
* ``ProcessSampler``: samples the process trees of each system's roles (server, clients) from ``/proc``: the peak
  of the summed anonymous RSS of a role's live processes (what the role needs at once), each process's VmHWM, its
  CPU time, and the machine-wide CPU time, so that CPU used by unrelated processes during a measurement (a
  disturbed measurement) can be reported.

The proxy as a command (what ``ByteCountingProxy`` starts)::

    python bench/wire.py proxy --listen 127.0.0.1:0 --target 127.0.0.1:9092 --stats /tmp/proxy.json

It writes its totals to the stats file (JSON, replaced atomically) every ``--interval`` seconds and on SIGTERM or
SIGINT, then exits.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedcybgd.common import procfs

__all__ = ["WireBytes", "ByteCountingProxy", "ProcessRecord", "RoleUsage", "SamplerReport", "ProcessSampler",
           "children", "cmdline", "free_port", "process_start_time"]

#: Bytes asked of the socket per read: large reads keep the proxy's per-byte overhead (and CPU) low.
READ_SIZE = 1 << 20


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (for services that must be told their port up front)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


# -- the proxy ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WireBytes:
    """Bytes that crossed the proxy: ``up`` client -> server, ``down`` server -> client, over all connections."""

    up: int
    down: int
    connections: int = 0


@dataclass
class _Counts:
    """The proxy's running totals (one event loop thread updates them, so no lock)."""

    up: int = 0
    down: int = 0
    connections: int = 0
    active: int = 0
    errors: int = 0


async def _pump(src: socket.socket, dst: socket.socket, counts: _Counts, up: bool) -> None:
    """Forward ``src`` -> ``dst`` until ``src`` reaches end of stream, then half-close ``dst`` for writing (so a
    client's half-close reaches the server as one, and the other direction keeps flowing)."""
    loop = asyncio.get_running_loop()
    while True:
        data = await loop.sock_recv(src, READ_SIZE)
        if not data:
            break
        if up:
            counts.up += len(data)
        else:
            counts.down += len(data)
        await loop.sock_sendall(dst, data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def _serve_connection(client: socket.socket, target: tuple[str, int], counts: _Counts) -> None:
    """One client connection: connect to the target and pump both directions until both have ended or one fails."""
    loop = asyncio.get_running_loop()
    counts.connections += 1
    counts.active += 1
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for s in (client, server):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(server, target)
        pumps = [asyncio.ensure_future(_pump(client, server, counts, True)),
                 asyncio.ensure_future(_pump(server, client, counts, False))]
        try:
            await asyncio.gather(*pumps)
        except OSError:  # a reset on either side ends the connection on both
            counts.errors += 1
            for p in pumps:
                p.cancel()
    except OSError:
        counts.errors += 1
    finally:
        counts.active -= 1
        client.close()
        server.close()


def _write_stats(path: Path, counts: _Counts, listen: str, target: str, final: bool) -> None:
    """The totals as JSON, replaced atomically so a reader never sees a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"listen": listen, "target": target, **asdict(counts), "final": final,
                               "time": time.time()}))
    os.replace(tmp, path)


async def _accept_loop(listener: socket.socket, target: tuple[str, int], counts: _Counts) -> None:
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Future[None]] = set()
    while True:
        client, _ = await loop.sock_accept(listener)
        task = asyncio.ensure_future(_serve_connection(client, target, counts))
        tasks.add(task)  # a reference until it ends: the loop holds tasks only weakly
        task.add_done_callback(tasks.discard)


async def _run_proxy(listen: str, target: str, stats: Path, interval: float) -> None:
    host, port = _split_address(listen)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    listener.setblocking(False)
    bound = f"{host}:{listener.getsockname()[1]}"
    counts = _Counts()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    accept = asyncio.ensure_future(_accept_loop(listener, _split_address(target), counts))
    _write_stats(stats, counts, bound, target, final=False)  # tells the starter the bound address
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
        _write_stats(stats, counts, bound, target, final=False)
    accept.cancel()
    listener.close()
    _write_stats(stats, counts, bound, target, final=True)


class ByteCountingProxy:
    """A byte-counting TCP proxy in its own process (``python bench/wire.py proxy``), driven from Python.

    ``start()`` returns the address clients should dial instead of ``target``; ``read()`` gives the totals so far
    (as of the proxy's last stats write, at most ``interval`` seconds old); ``stop()`` ends the proxy and returns
    its final totals."""

    def __init__(self, target: str, stats_path: Path, *, listen: str = "127.0.0.1:0", interval: float = 0.5,
                 python: str = sys.executable) -> None:
        self.target = target
        self.stats_path = stats_path
        self.listen = listen
        self.interval = interval
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the proxy is not started")
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> str:
        """Start the proxy process and wait until it listens; its listening address (``host:port``)."""
        self.stats_path.unlink(missing_ok=True)
        cmd = [self.python, str(Path(__file__).resolve()), "proxy", "--listen", self.listen, "--target", self.target,
               "--stats", str(self.stats_path), "--interval", str(self.interval)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self._stats()
            if stats is not None:
                self.address = str(stats["listen"])
                return self.address
            if self.proc.poll() is not None:
                raise RuntimeError(f"the proxy exited with code {self.proc.returncode} before listening")
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the proxy did not start listening within {timeout} s")

    def _stats(self) -> dict[str, Any] | None:
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return None
        return stats if isinstance(stats, dict) else None

    def read(self) -> WireBytes:
        """The totals as of the proxy's last stats write (zeros before the first)."""
        stats = self._stats() or {}
        return WireBytes(up=int(stats.get("up", 0)), down=int(stats.get("down", 0)),
                         connections=int(stats.get("connections", 0)))

    def stop(self, timeout: float = 10.0) -> WireBytes:
        """End the proxy (SIGTERM, then SIGKILL after ``timeout``) and return its final totals."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.read()

    def __enter__(self) -> ByteCountingProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the process sampler --------------------------------------------------------------------------------------------

@dataclass
class ProcessRecord:
    """One process seen by a ``ProcessSampler``: its peaks over the samples, and its CPU time at last sight."""

    pid: int
    role: str
    name: str  # the command name at last sight (/proc/<pid>/comm, at most 15 characters)
    cmdline: str  # the start of its command line, to tell python processes apart
    start_time: str  # in clock ticks since boot: with the pid, the process's identity
    hwm_bytes: int = 0  # VmHWM at last sight: the process's own peak resident set since it started
    max_rss_anon_bytes: int = 0  # the largest RssAnon sampled
    cpu_seconds: float = 0.0  # user + system CPU at last sight
    cpu_seconds_at_start: float = 0.0  # at first sight when it started before sampling did, else 0
    first_seen: float = 0.0  # seconds since the sampler started
    last_seen: float = 0.0

    @property
    def cpu_in_window(self) -> float:
        """CPU seconds this process used while sampled (from the start of sampling or of the process)."""
        return self.cpu_seconds - self.cpu_seconds_at_start


@dataclass
class RoleUsage:
    """What one role (e.g. the server or the clients) used: the peak of the summed RssAnon of its live processes
    (sampled), the largest VmHWM of any of its processes, their CPU seconds within the window, every process."""

    role: str
    peak_rss_anon_sum_bytes: int
    max_hwm_bytes: int
    cpu_seconds: float
    processes: list[ProcessRecord]


@dataclass
class SamplerReport:
    """A sampling window's result: per role usage, and machine-wide CPU so that disturbance can be judged.

    ``other_cpu_seconds`` is the machine's busy CPU time over the window minus the sampled processes' and this
    (sampling) process's; large values mean other work competed for the CPUs while measuring."""

    seconds: float
    samples: int
    roles: list[RoleUsage]
    machine_busy_cpu_seconds: float
    sampled_cpu_seconds: float
    sampler_process_cpu_seconds: float
    other_cpu_seconds: float

    def role(self, name: str) -> RoleUsage:
        for usage in self.roles:
            if usage.role == name:
                return usage
        raise KeyError(name)


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (every thread's children: a child belongs to the thread that forked it)."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    return [int(c) for tid in tasks for c in _read_text(f"/proc/{pid}/task/{tid}/children").split()]


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def cmdline(pid: int) -> str:
    return _read_text(f"/proc/{pid}/cmdline").replace("\0", " ").strip()[:300]


def process_start_time(pid: int) -> str:
    """The process's start time in clock ticks (field 22 of /proc/<pid>/stat): with the pid, its identity."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else ""


class ProcessSampler:
    """Samples the process trees rooted at given pids every ``interval`` seconds in a background thread, grouped by
    role. Roots may be added while sampling (a system's processes are started one after another). A process keeps
    its role for life, also after its parent exits; processes that start and end between two samples are missed,
    so the interval should be short next to the lifetime of what is measured."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._roots: list[tuple[str, int]] = []
        self._records: dict[tuple[int, str], ProcessRecord] = {}
        self._peak_sum: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0
        self._t0_ticks = 0.0  # the start of sampling in clock ticks since boot, the unit of process start times
        self._samples = 0
        self._busy0 = 0.0
        self._self_cpu0 = 0.0

    def add_root(self, role: str, pid: int) -> None:
        """Sample ``pid`` and every process below it as ``role``; sampled at once, so a short-lived root is seen."""
        with self._lock:
            self._roots.append((role, pid))
            self._peak_sum.setdefault(role, 0)
        if self._thread is not None:
            self._sample()

    def start(self) -> ProcessSampler:
        self._t0 = time.monotonic()
        self._t0_ticks = float(_read_text("/proc/uptime").split()[0]) * procfs.CLK_TCK
        self._busy0 = procfs.machine_busy_seconds()
        self._self_cpu0 = procfs.cpu_seconds()
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="process-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _tree(self) -> list[tuple[str, int]]:
        """(role, pid) of every live process under the roots, roots first."""
        out: list[tuple[str, int]] = []
        seen: set[int] = set()
        for role, root in self._roots:
            stack = [root]
            while stack:
                pid = stack.pop()
                if pid in seen or not os.path.exists(f"/proc/{pid}"):
                    continue
                seen.add(pid)
                out.append((role, pid))
                stack.extend(children(pid))
        # Processes seen before whose parent has gone (re-parented) are still followed, unless the pid was reused.
        for (pid, started), rec in self._records.items():
            if pid not in seen and process_start_time(pid) == started:
                seen.add(pid)
                out.append((rec.role, pid))
        return out

    def _sample(self) -> None:
        with self._lock:
            now = time.monotonic() - self._t0
            sums: dict[str, int] = dict.fromkeys(self._peak_sum, 0)
            for role, pid in self._tree():
                rec = self._observe(role, pid, now)
                if rec is not None:
                    sums[role] = sums.get(role, 0) + rec[1]
            for role, total in sums.items():
                self._peak_sum[role] = max(self._peak_sum.get(role, 0), total)
            self._samples += 1

    def _observe(self, role: str, pid: int, now: float) -> tuple[ProcessRecord, int] | None:
        """Read one process; its record and current RssAnon, or None when it has just gone."""
        started = process_start_time(pid)
        key = (pid, started)
        try:
            status = procfs.status(pid)
            cpu = procfs.cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            return None
        name = _read_text(f"/proc/{pid}/comm").strip()
        rec = self._records.get(key)
        if rec is not None and rec.name != name:  # first seen between fork and exec: the exec'd program counts
            rec.name, rec.cmdline, rec.hwm_bytes, rec.max_rss_anon_bytes = name, cmdline(pid), 0, 0
        if rec is None:
            rec = ProcessRecord(pid=pid, role=role, name=name, cmdline=cmdline(pid), start_time=started,
                                first_seen=now,
                                # CPU used before sampling started is not the window's (an approximation: the
                                # CPU until first sight counts as before).
                                cpu_seconds_at_start=cpu if started.isdigit() and int(started) < self._t0_ticks
                                else 0.0)
            self._records[key] = rec
        anon = status.get("RssAnon", 0)
        rec.hwm_bytes = max(rec.hwm_bytes, status.get("VmHWM", 0))
        rec.max_rss_anon_bytes = max(rec.max_rss_anon_bytes, anon)
        rec.cpu_seconds = cpu
        rec.last_seen = now
        return rec, anon

    def report(self) -> SamplerReport:
        """The figures so far (the sampler keeps running)."""
        with self._lock:
            roles = [self._role_usage(role) for role in self._peak_sum]
            samples = self._samples
        busy = procfs.machine_busy_seconds() - self._busy0
        own = procfs.cpu_seconds() - self._self_cpu0
        sampled = sum(r.cpu_seconds for r in roles)
        return SamplerReport(seconds=time.monotonic() - self._t0, samples=samples, roles=roles,
                             machine_busy_cpu_seconds=busy, sampled_cpu_seconds=sampled,
                             sampler_process_cpu_seconds=own, other_cpu_seconds=max(0.0, busy - sampled - own))

    def _role_usage(self, role: str) -> RoleUsage:
        procs = sorted((r for r in self._records.values() if r.role == role), key=lambda r: r.first_seen)
        return RoleUsage(role=role, peak_rss_anon_sum_bytes=self._peak_sum.get(role, 0),
                         max_hwm_bytes=max((r.hwm_bytes for r in procs), default=0),
                         cpu_seconds=sum(r.cpu_in_window for r in procs), processes=procs)

    def stop(self) -> SamplerReport:
        """Take a last sample, stop the thread and return the report."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        return self.report()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("proxy", help="run a byte-counting TCP proxy until SIGTERM")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--stats", required=True, type=Path, help="JSON file the totals are written to")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between stats writes")
    args = parser.parse_args(argv)
    asyncio.run(_run_proxy(args.listen, args.target, args.stats, args.interval))
    return 0


if __name__ == "__main__":
    sys.exit(main())
