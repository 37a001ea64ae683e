"""Consumes a BPF ring buffer (BPF_MAP_TYPE_RINGBUF, Linux >= 5.8) by
mapping it into this process, as libbpf does, and takes every record ready
so far as one numpy array.

bcc's ring_buffer_consume() calls a Python function per record; at 200k
events/s that call alone costs a good part of a core. Here a batch of any
size costs a few numpy operations. The kernel's layout (kernel/bpf/ringbuf.c):
page 0 holds the consumer position (ours to write), page 1 the producer
position, then the data pages, mapped twice in a row so that a record that
wraps around the end is contiguous. Each record is an 8-byte header (length
with BUSY and DISCARD bits) and the data, padded to 8 bytes.

The BPF program reserves records of one size only (struct trace_event);
that is what lets a batch be read as one array.
"""

from __future__ import annotations

import ctypes as ct
import mmap

import numpy as np

from .errors import TcpstateError

HEADER_SIZE = 8
BUSY_BIT = 1 << 31      # reserved, not yet submitted
DISCARD_BIT = 1 << 30   # discarded by the program: skip


def record_dtype(event: np.dtype) -> np.dtype:
    size = -(-(HEADER_SIZE + event.itemsize) // 8) * 8
    return np.dtype({"names": ["header", "event"], "formats": ["<u4", event],
                     "offsets": [0, HEADER_SIZE], "itemsize": size})


class RingBufferReader:
    """The records of one BPF ring buffer, taken in batches."""

    def __init__(self, map_fd: int, data_size: int, event: np.dtype):
        if data_size <= 0 or data_size & (data_size - 1):
            raise ValueError(f"ring buffer size {data_size} is not a power of two")
        page = mmap.PAGESIZE
        self._record = record_dtype(event)
        self._event_size = event.itemsize
        self._mask = data_size - 1
        self._consumer_map = mmap.mmap(map_fd, page, mmap.MAP_SHARED,
                                       mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._data_map = mmap.mmap(map_fd, page + 2 * data_size, mmap.MAP_SHARED,
                                   mmap.PROT_READ, offset=page)
        # An aligned 8-byte store: the kernel never sees a torn position.
        self._consumer_pos = ct.c_uint64.from_buffer(self._consumer_map)
        self._producer_pos = np.frombuffer(self._data_map, np.uint64, count=1)
        self._data = np.frombuffer(self._data_map, np.uint8, offset=page)
        self.capacity = data_size // self._record.itemsize

    def take(self) -> np.ndarray:
        """Every record submitted so far, oldest first, as a copy; the
        space they held goes back to the kernel."""
        consumer = self._consumer_pos.value
        # x86 keeps loads in order: the producer position, then headers,
        # then data, as the kernel's release stores require.
        available = int(self._producer_pos[0]) - consumer
        size = self._record.itemsize
        if available <= 0:
            return np.empty(0, self._record["event"])
        if available % size:
            raise TcpstateError(f"ring buffer holds {available} bytes, not whole "
                                f"{size}-byte records: program and reader disagree")
        start = consumer & self._mask
        records = self._data[start:start + available].view(self._record)
        headers = records["header"].copy()
        busy = np.flatnonzero(headers & BUSY_BIT)
        ready = int(busy[0]) if len(busy) else len(records)
        headers = headers[:ready]
        lengths = headers & ~np.uint32(BUSY_BIT | DISCARD_BIT)
        if ready and (lengths != self._event_size).any():
            raise TcpstateError("ring buffer record of an unexpected size: "
                                "program and reader disagree")
        # Copied as plain bytes, a row per record: numpy copies structured
        # items field by field.
        rows = self._data[start:start + ready * size].reshape(ready, size)
        events = rows[:, HEADER_SIZE:HEADER_SIZE + self._event_size].copy()
        self._consumer_pos.value = consumer + ready * size
        events = events.view(self._record["event"]).reshape(ready)
        discarded = headers & DISCARD_BIT
        return events[discarded == 0] if discarded.any() else events

    def close(self) -> None:
        # numpy and ctypes views pin the maps: drop them first.
        self._consumer_pos = self._producer_pos = self._data = None
        self._consumer_map.close()
        self._data_map.close()
