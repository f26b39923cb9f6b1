"""Reading Linux's /proc, in one place: the client's memory gauges, the visit's peak memory, the benchmarks' samplers
and the tests' memory checks all need the same few figures, and /proc's formats (sizes in kB, fields of
``/proc/<pid>/stat`` after the command name) are easy to get subtly wrong once per copy.

Where there is no /proc (not Linux), ``status`` raises ``OSError`` and the single-figure helpers return None, so
callers choose their own fallback.
"""

from __future__ import annotations

import os

__all__ = ["status", "status_field", "rss_bytes", "peak_rss_bytes", "reset_peak_rss", "cpu_seconds",
           "machine_busy_seconds", "mem_available_bytes"]

#: Clock ticks per second, the unit of /proc/<pid>/stat's and /proc/stat's CPU times.
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def status(pid: int | str = "self") -> dict[str, int]:
    """The numeric fields of ``/proc/<pid>/status``: sizes (``VmRSS``, ``RssAnon``, ``VmHWM``, ...) in bytes, counts
    (``Threads``, ...) as they are; fields that are not one number are left out. Raises ``OSError`` when the file
    cannot be read (no /proc, or no such process)."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            fields = value.split()
            if len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
                out[key] = int(fields[0]) * 1024
            elif len(fields) == 1 and fields[0].isdigit():
                out[key] = int(fields[0])
    return out


def status_field(name: str, pid: int | str = "self") -> int | None:
    """One figure of ``/proc/<pid>/status`` (bytes for sizes), or None where /proc or the field is missing."""
    try:
        return status(pid).get(name)
    except OSError:
        return None


def rss_bytes() -> int:
    """This process's resident set size now, 0 where it cannot be read (a gauge needs a number)."""
    return status_field("VmRSS") or 0


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size since it started or since ``reset_peak_rss`` (VmHWM), or None."""
    return status_field("VmHWM")


def reset_peak_rss() -> None:
    """Reset this process's peak resident set size (VmHWM) to its current RSS, so that a peak measured afterwards
    is the peak of what follows. Where the kernel does not allow it, VmHWM stays the lifetime peak."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # "5": reset the peak RSS
    except OSError:
        pass


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU seconds (user + system) process ``pid`` has used."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and ')'
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def mem_available_bytes() -> int | None:
    """The memory the kernel estimates new work can use without swapping (``MemAvailable`` of ``/proc/meminfo``,
    in bytes), or None where it cannot be read. A CPU client's default for the memory it trains in."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                fields = value.split()
                if key == "MemAvailable" and len(fields) == 2 and fields[1] == "kB" and fields[0].isdigit():
                    return int(fields[0]) * 1024
    except OSError:
        return None
    return None
