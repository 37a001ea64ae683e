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


class MappedTable:
    """The socket table, mapped read-only into this process."""

    def __init__(self, fd: int, rows: int, ways: int):
        self.rows, self.ways = rows, ways
        dtype = row_dtype(ways)
        length = rows * dtype.itemsize
        page = os.sysconf("SC_PAGE_SIZE")
        self._mapping = mmap.mmap(fd, -(-length // page) * page, mmap.MAP_SHARED,
                                  mmap.PROT_READ)
        self._rows = np.frombuffer(self._mapping, dtype, count=rows)

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        """Every way, (keys, entries), flat: views of the live table, which
        the program changes meanwhile (select, then copy: live_entries). A
        way is live when its key and its state are both non-zero (state 0:
        being claimed)."""
        return self._rows["sk"].reshape(-1), self._rows["entry"].reshape(-1)

    def close(self) -> None:
        self._rows = None
        self._mapping.close()


def live_mask(keys: np.ndarray, entries: np.ndarray) -> np.ndarray:
    return (keys != 0) & (entries["state"] != 0) & (entries["state"] < NSTATES)


def live_entries(keys: np.ndarray, entries: np.ndarray) -> np.ndarray:
    """A copy of the live entries. An entry released between the test and
    the copy is dropped by testing its copy's state again."""
    live = entries[live_mask(keys, entries)]
    return live[(live["state"] != 0) & (live["state"] < NSTATES)]


def age_histogram(keys: np.ndarray, entries: np.ndarray, now_ns: int,
                  port_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """How long the table's live sockets have been in their state, filed in
    the kernel's duration slots per (port slot, family, state): the slot
    counts [p, f, s, slot] (not cumulative) and the sums in ns [p, f, s].
    An age is `now_ns - entered_ns` on CLOCK_MONOTONIC (bpf_ktime_get_ns);
    one entered after `now_ns` was read counts as 0."""
    live = live_entries(keys, entries)
    ages = np.maximum(now_ns - live["entered_ns"].astype(np.int64), 0)
    cell = ((live["port_slot"].astype(np.int64) % port_slots) * NFAMILIES
            + (live["family"] & 1)) * NSTATES + live["state"]
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
