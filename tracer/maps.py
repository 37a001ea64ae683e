"""Reading the program's memory-mapped arrays (BPF_F_MMAPABLE): no system
call per read, so a scrape never raises the CPU's bpf_prog_active, the
window in which the kernel skips classic-tracepoint programs; and nothing
here needs bcc.

A per-CPU array is laid out [cpu][cell]: each CPU's program writes its own
row, user space sums the rows.
"""

from __future__ import annotations

import mmap
import os

import numpy as np


class MappedArray:
    """An array map's values, mapped read-write into this process."""

    def __init__(self, fd: int, entries: int, dtype=np.uint64, cpus: int = 1,
                 writable: bool = False):
        self.dtype = np.dtype(dtype)
        self.cpus = cpus
        self.cells = entries // cpus
        length = entries * self.dtype.itemsize
        page = os.sysconf("SC_PAGE_SIZE")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        self._mapping = mmap.mmap(fd, -(-length // page) * page, mmap.MAP_SHARED, prot)
        self._values = np.frombuffer(self._mapping, self.dtype, count=entries).reshape(
            cpus, self.cells)

    def per_cpu(self) -> np.ndarray:
        """A copy of every CPU's row: [cpu, cell]."""
        return self._values.copy()

    def read(self) -> np.ndarray:
        """The cells summed over CPUs (a copy)."""
        if self.cpus == 1:
            return self._values[0].copy()
        return self._values.sum(axis=0, dtype=self.dtype)

    def write(self, values: np.ndarray) -> None:
        """Overwrite the cells of a shared (single-row) array."""
        self._values[0, :] = values

    def close(self) -> None:
        self._values = None
        self._mapping.close()


class WrappingSums:
    """Sums of nanoseconds kept as u64 per CPU in the kernel wrap after 2**64
    ns (~51 h at 100,000 concurrent connections on one CPU). Each read adds
    the wraps it sees since the last one, so the totals are exact as long as
    a cell is read at least once per wrap: serve reads every minute."""

    def __init__(self, array: MappedArray):
        self._array = array
        self._last = array.per_cpu()
        self._wraps = np.zeros(self._last.shape, np.float64)

    def read(self) -> np.ndarray:
        """Totals over CPUs, as float64 nanoseconds."""
        now = self._array.per_cpu()
        self._wraps += now < self._last
        self._last = now
        return (self._wraps * 2.0**64 + now.astype(np.float64)).sum(axis=0)
