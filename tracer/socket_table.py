"""The socket table of bpf/serve.bpf.c as user space reads it: memory-mapped
(BPF_F_MMAPABLE), so reading it is a copy of memory, never a system call
that would open the kernel's window in which it skips tracing programs.

Two readers: the collector's ages in state (a gauge histogram computed with
numpy over the whole table) and `tcpstate sockets` (tracer/sockets.py),
which matches entries to /proc/net/tcp{,6} by the 4-tuple's hash the
program keeps in each entry (tuple_hash_of in bpf/tcpstate.h, mirrored here).

Nothing here needs bcc.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from .metrics import NBUCKETS, slots_of_ns
from .states import NSTATES

NFAMILIES = 2

# bpf/tcpstate.h, struct sock_entry as serve compiles it (24 bytes)
ENTRY_DTYPE = np.dtype({
    "names": ["born_ns", "entered_ns", "state", "side", "family", "port_slot", "tuple_hash"],
    "formats": ["<u8", "<u8", "u1", "u1", "u1", "u1", "<u4"],
    "offsets": [0, 8, 16, 17, 18, 19, 20],
    "itemsize": 24,
})


def row_dtype(ways: int) -> np.dtype:
    """struct table_row: the keys (kernel socket addresses), then the entries."""
    return np.dtype([("sk", "<u8", (ways,)), ("entry", ENTRY_DTYPE, (ways,))])


ENTRY_WORDS = ENTRY_DTYPE.itemsize // 8


class MappedTable:
    """The socket table, mapped read-only into this process."""

    def __init__(self, fd: int, rows: int, ways: int):
        self.rows, self.ways = rows, ways
        length = rows * row_dtype(ways).itemsize
        page = os.sysconf("SC_PAGE_SIZE")
        self._mapping = mmap.mmap(fd, -(-length // page) * page, mmap.MAP_SHARED,
                                  mmap.PROT_READ)
        self._words = np.frombuffer(self._mapping, np.uint64, count=length // 8).reshape(
            rows, -1)

    def live_entries(self) -> np.ndarray:
        return live_entries(self._words, self.ways)

    def close(self) -> None:
        self._words = None
        self._mapping.close()


def live_entries(words: np.ndarray, ways: int) -> np.ndarray:
    """A copy of the live entries (ENTRY_DTYPE) of a table given as its
    64-bit words, [row, word] (`ways` keys, then `ways` entries of 3 words).
    A way is live when its key and its state are both non-zero (state 0:
    being claimed). The program changes the table meanwhile: the keys are
    read first, then only the live ways' entries (one gather: a scan of
    every entry's state costs several times more), then their states are
    tested on the copy."""
    live = np.flatnonzero(words[:, :ways] != 0)
    row, way = np.divmod(live, ways)
    first = row * words.shape[1] + ways + way * ENTRY_WORDS
    gathered = words.reshape(-1).take(first[:, None] + np.arange(ENTRY_WORDS))
    entries = np.ascontiguousarray(gathered).view(ENTRY_DTYPE).reshape(-1)
    return entries[(entries["state"] != 0) & (entries["state"] < NSTATES)]


def age_histogram(entries: np.ndarray, now_ns: int,
                  port_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """How long the live sockets `entries` have been in their state, filed
    in the kernel's duration slots per (port slot, family, state): the slot
    counts [p, f, s, slot] (not cumulative) and the sums in ns [p, f, s].
    An age is `now_ns - entered_ns` on CLOCK_MONOTONIC (bpf_ktime_get_ns);
    one entered after `now_ns` was read counts as 0."""
    ages = np.maximum(now_ns - entries["entered_ns"].astype(np.int64), 0)
    cell = ((entries["port_slot"].astype(np.int64) % port_slots) * NFAMILIES
            + (entries["family"] & 1)) * NSTATES + entries["state"]
    cells = port_slots * NFAMILIES * NSTATES
    buckets = np.bincount(cell * NBUCKETS + slots_of_ns(ages), minlength=cells * NBUCKETS)
    sums = np.bincount(cell, weights=ages.astype(np.float64), minlength=cells)
    return (buckets.astype(np.uint64).reshape(port_slots, NFAMILIES, NSTATES, NBUCKETS),
            sums.reshape(port_slots, NFAMILIES, NSTATES))


# ---- the 4-tuple's hash: a mirror of tuple_hash_of in bpf/tcpstate.h ------

_MULTIPLIER = np.uint32(0x9E3779B1)


def _mix(hashes: np.ndarray, words: np.ndarray) -> np.ndarray:
    hashes = (hashes ^ words) * _MULTIPLIER
    return hashes ^ (hashes >> np.uint32(16))


def tuple_hashes(local_ports: np.ndarray, remote_ports: np.ndarray,
                 local_words: np.ndarray, remote_words: np.ndarray) -> np.ndarray:
    """The hash of each socket: ports in host order; words [n, 1] (IPv4) or
    [n, 4] (IPv6) as /proc/net/tcp{,6} prints them (each word the native
    read of 4 bytes in network order)."""
    with np.errstate(over="ignore"):
        hashes = (local_ports.astype(np.uint32) << np.uint32(16)) | remote_ports.astype(np.uint32)
        for column in range(local_words.shape[1]):
            hashes = _mix(hashes, local_words[:, column].astype(np.uint32))
        for column in range(remote_words.shape[1]):
            hashes = _mix(hashes, remote_words[:, column].astype(np.uint32))
    return hashes
