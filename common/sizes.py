"""Memory sizes as people write them ("24GiB", "16G", "8000MB") and as the tools print them ("19.02 GiB"): one
reading for the client's ``--memory`` and ``fedcybgd plan --memory``."""
from __future__ import annotations

import re

__all__ = ["parse_size", "format_size"]

#: Size suffixes: IEC (KiB, ...) and the bare letters (K, ...) are powers of 1024; SI (kB, MB, ...) of 1000.
_UNITS = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20, "mb": 10**6,
          "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*")


def parse_size(size: str | int, *, positive: bool = False) -> int:
    """Bytes of a size: a number of bytes (int or digits) or a number with a unit (``24GiB``, ``24G`` (= GiB),
    ``500MiB``, ``16GB`` (decimal)). ValueError for anything else, for a negative size, and for 0 when
    ``positive``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = _SIZE.fullmatch(str(size))
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(f"{size!r} is not a size (examples: 24GiB, 24G, 500MiB, 16GB, 1073741824)")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 0 or (positive and value == 0):
        raise ValueError(f"a memory size must be {'positive' if positive else 'at least 0'}, got {size!r}")
    return value


def format_size(size: int) -> str:
    """A size in binary units, two decimals ("19.02 GiB")."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024:
            return f"{value:.0f} B" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"
