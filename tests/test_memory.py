"""runtime/memory.py: after retain_freed_memory, memory a process frees is reused without page faults."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ddpm_cifar.runtime import memory

# 40 arrays of 1 MiB, written (np.ones), freed, five times over; the faults of the last five rounds.
PROGRAM = """
import resource, sys
import numpy as np
if sys.argv[1] == "retain":
    from ddpm_cifar.runtime.memory import retain_freed_memory
    assert retain_freed_memory()
def one_round():
    arrays = [np.ones(1 << 17) for _ in range(40)]
    del arrays
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    one_round()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults() -> None:
    default, retained = _faults("default"), _faults("retain")
    # glibc's default trims the freed 40 MiB every round: about 10,000 faults a round (4 KiB pages).
    assert default > 5 * 5_000, default
    assert retained < default / 20, (retained, default)


def test_is_harmless_to_call_again() -> None:
    assert memory.retain_freed_memory() is memory.retain_freed_memory()
