"""Freed host memory goes back to the system in a client process (common/allocator.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

#: In a fresh process: tensors of 3 MiB with small ones between them (so that their holes cannot merge), after one
#: freed 4 MiB block (which makes glibc raise its mmap threshold past 3 MiB); then every 3 MiB tensor is freed.
#: Prints how much the resident set shrank, in MiB.
SCRIPT = """
import sys, torch
from fedcybgd.common.allocator import return_freed_memory
from fedcybgd.common.procfs import rss_bytes
torch.set_num_threads(1)
if sys.argv[1] == "on":
    assert return_freed_memory()
warm = torch.empty(4 << 20, dtype=torch.uint8); warm.fill_(1); del warm
keep = []
for i in range(100):
    big = torch.empty(3 << 20, dtype=torch.uint8); big.fill_(1); keep.append(big)
    small = torch.empty(1 << 16, dtype=torch.uint8); small.fill_(1); keep.append(small)
full = rss_bytes()
for i in range(0, len(keep), 2):
    keep[i] = None
print((full - rss_bytes()) / 2**20)
"""


def _released_mib(setting: str) -> float:
    out = subprocess.run([sys.executable, "-c", SCRIPT, setting], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_tensors_leave_the_resident_set_with_the_setting_and_stay_without():
    assert _released_mib("on") > 250  # of the 300 MiB freed
    assert _released_mib("off") < 50  # glibc's default: the heap keeps them
