"""tracer/maps.py on real memory mappings (a memfd stands in for a BPF
array's memory: the same mmap, no root needed)."""

from __future__ import annotations

import mmap
import os

import numpy as np
import pytest

from tracer.maps import MappedArray, WrappingSums


@pytest.fixture
def memory():
    fd = os.memfd_create("cells")
    os.ftruncate(fd, mmap.PAGESIZE)
    raw = mmap.mmap(fd, mmap.PAGESIZE)
    try:
        yield fd, np.frombuffer(raw, np.uint64)
    finally:
        os.close(fd)


def test_per_cpu_rows_are_summed(memory):
    fd, raw = memory
    raw[:6] = [1, 2, 3, 10, 20, 30]  # [cpu][cell], 2 CPUs x 3 cells
    array = MappedArray(fd, 6, np.uint64, cpus=2)
    assert list(array.read()) == [11, 22, 33]
    raw[0] = 5  # reads see the memory as it is now, no copy kept
    assert list(array.read()) == [15, 22, 33]
    array.close()


def test_a_shared_array_is_written_in_place(memory):
    fd, raw = memory
    array = MappedArray(fd, 3, np.int64, writable=True)
    array.write(np.array([7, -1, 0]))
    assert list(raw[:3].view(np.int64)) == [7, -1, 0]
    array.close()


def test_sums_of_a_long_histogram_do_not_wrap(memory):
    """u64 nanosecond sums per CPU wrap after ~51 h at 100,000 concurrent
    connections; the reader keeps counting past 2**64."""
    fd, raw = memory
    raw[:4] = [2**64 - 10, 5, 0, 0]  # 2 CPUs x 2 cells
    array = MappedArray(fd, 4, np.uint64, cpus=2)
    sums = WrappingSums(array)
    assert list(sums.read()) == [2.0**64 - 10, 5.0]
    raw[0] = 20  # CPU 0's first cell wrapped: 2**64 + 20 in all
    assert list(sums.read()) == [2.0**64 + 20, 5.0]
    raw[0] = 30
    assert list(sums.read()) == [2.0**64 + 30, 5.0]
    array.close()


