"""Serve's maps as the collector reads them: memory-mapped arrays summed
over CPUs into a Snapshot. Used in the process that loaded the program
(tracer/probe.py) and in the serving process that was only handed its
descriptors (tracer/held.py); neither path imports bcc here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .maps import MappedArray, WrappingSums
from .socket_table import MappedTable, age_histogram
from .metrics import NBUCKETS, OTHER_PORT
from .program import COUNTERS
from .reasons import TABLE_CELLS as CLOSE_EVIDENCE_CELLS, NREASONS
from .states import FAMILIES, NSTATES, SIDES, code_of

NFAMILIES = len(FAMILIES)
NSIDES = len(SIDES)
SUMS = ("state_duration_sum_ns", "connection_duration_sum_ns")
CLOSE = code_of("close")
# bpf/tcpstate.h: a table row holds a key (8 bytes) and an entry (24) per socket
SOCKET_ENTRY_BYTES = 32


@dataclass(frozen=True)
class MapLayout:
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name
    per_cpu: bool
    writable: bool = False  # user space writes it (the seed)

    @property
    def cells(self) -> int:
        return int(np.prod(self.shape))


def serve_layout(port_slots: int, close_reasons: bool = False) -> dict[str, MapLayout]:
    """Every map of bpf/serve.bpf.c that user space reads, and its shape:
    the one home of these facts on the Python side. `closes` exists only
    where the program classifies closes (CLOSE_REASONS)."""
    p, f, s, b = port_slots, NFAMILIES, NSTATES, NBUCKETS
    reasons = {"closes": MapLayout((p, f, s, NREASONS), "uint64", True)} if close_reasons else {}
    return {
        "transitions": MapLayout((p, f, s, s), "uint64", True),
        "state_duration_buckets": MapLayout((p, f, s, s, b), "uint64", True),
        "state_duration_sum_ns": MapLayout((p, f, s, s), "uint64", True),
        "connection_duration_buckets": MapLayout((p, f, NSIDES, b), "uint64", True),
        "connection_duration_sum_ns": MapLayout((p, f, NSIDES), "uint64", True),
        "live_tracked": MapLayout((p, f, s), "int64", True),
        "live_untracked": MapLayout((p, f, s), "int64", False, writable=True),
        "counters": MapLayout((len(COUNTERS),), "uint64", True),
        **reasons,
    }


def map_bytes(cpus: int, port_slots: int, table_capacity: int, page: int = 4096,
              close_reasons: bool = True) -> int:
    """Kernel memory of serve's maps, each rounded up to pages as the kernel
    charges it (bpftool's bytes_memlock): the per-CPU cells grow with CPUs x
    port slots, the socket table with its size (32 bytes a socket). What a
    pod's memory limit must hold beside the processes (README, DaemonSet)."""
    pages = lambda size: -(-size // page) * page  # noqa: E731
    # a memory-mapped array takes a page for its header beside its values
    total = sum(pages(8 * spec.cells * (cpus if spec.per_cpu else 1)) + page
                for spec in serve_layout(port_slots, close_reasons).values())
    total += pages(SOCKET_ENTRY_BYTES * table_capacity) + page  # memory-mapped too
    if close_reasons:
        total += pages(8 * CLOSE_EVIDENCE_CELLS)  # close_reason: 8 bytes a value
    if port_slots > 1:
        # service_port_slot and listeners: an array's values take 8 bytes each
        total += 2 * pages(8 * 65536)
    return total


def port_labels_of(service_ports) -> tuple[str, ...]:
    """Label values by port slot; () when ports are not labelled."""
    return (OTHER_PORT, *map(str, service_ports)) if service_ports else ()


@dataclass
class Snapshot:
    """Totals over all CPUs, shaped by (port slot, family, ...)."""

    transitions: np.ndarray  # [port, family, old, new]
    duration_buckets: np.ndarray  # [port, family, old, new, slot]
    duration_sum_ns: np.ndarray  # [port, family, old, new], float64
    connection_buckets: np.ndarray  # [port, family, side, slot]
    connection_sum_ns: np.ndarray  # [port, family, side], float64
    live: np.ndarray  # [port, family, state], never negative
    counters: dict[str, int] = field(default_factory=dict)
    closes: np.ndarray | None = None  # [port, family, old, reason]; None: reasons off
    table_entries: int = 0  # sockets in the table: the sum of live_tracked
    # ages in state of the table's sockets: slot counts [port, family, state,
    # slot], sums in ns [port, family, state]; live sockets whose entry time
    # is not known (live_untracked) [port, family, state]. None: not read.
    age_buckets: np.ndarray | None = None
    age_sum_ns: np.ndarray | None = None
    age_unknown: np.ndarray | None = None
    table_capacity: int = 0
    missed_events: int = 0


def prog_stats_of_fd(fd: int) -> dict[str, int]:
    """run_time_ns, run_cnt, recursion_misses and prog_id of a program
    this process holds, from /proc/self/fdinfo."""
    stats = {}
    with open(f"/proc/self/fdinfo/{fd}") as info:
        for line in info:
            key, _, value = line.partition(":")
            if key in ("run_time_ns", "run_cnt", "recursion_misses", "prog_id"):
                stats[key] = int(value)
    return stats


class ServeMaps:
    """Readers of serve's maps, given each map's descriptor."""

    def __init__(self, map_fds: dict[str, int], layout: dict[str, MapLayout], cpus: int,
                 table_fd: int | None = None, table_rows: int = 0, table_ways: int = 0):
        """table_fd: the socket table's descriptor (its ages in state are
        read when given), of `table_rows` rows of `table_ways` sockets."""
        self.layout = layout
        self._arrays: dict[str, MappedArray] = {}
        self.table: MappedTable | None = None
        try:
            for name, spec in layout.items():
                rows = cpus if spec.per_cpu else 1
                self._arrays[name] = MappedArray(map_fds[name], spec.cells * rows,
                                                 np.dtype(spec.dtype), rows, spec.writable)
            if table_fd is not None:
                self.table = MappedTable(table_fd, table_rows, table_ways)
        except BaseException:
            self.close()
            raise
        self._sums = {name: WrappingSums(self._arrays[name]) for name in SUMS}

    def read_map(self, name: str) -> np.ndarray:
        reader = self._sums.get(name) or self._arrays[name]
        return reader.read().reshape(self.layout[name].shape)

    def read_counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, (int(v) for v in self._arrays["counters"].read())))

    def write_untracked(self, seeded: np.ndarray) -> None:
        self._arrays["live_untracked"].write(seeded.reshape(-1))

    def refresh_sums(self) -> None:
        """Read the duration sums so that none wraps unseen (WrappingSums)."""
        for sums in self._sums.values():
            sums.read()

    def snapshot(self, table_capacity: int, missed_events: int) -> Snapshot:
        tracked = self.read_map("live_tracked")
        untracked = self.read_map("live_untracked")
        live = tracked + untracked
        ages = {}
        if self.table is not None:
            buckets, sums = age_histogram(self.table.live_entries(), time.monotonic_ns(),
                                          self.layout["live_tracked"].shape[0])
            ages = dict(age_buckets=buckets, age_sum_ns=sums,
                        age_unknown=np.maximum(untracked, 0))
        transitions = self.read_map("transitions")
        closes = self.read_map("closes") if "closes" in self.layout else None
        if closes is not None:
            # the program counts a close once, by reason (bpf/serve.bpf.c)
            transitions[..., CLOSE] += closes.sum(axis=-1, dtype=transitions.dtype)
        return Snapshot(
            transitions=transitions,
            duration_buckets=self.read_map("state_duration_buckets"),
            duration_sum_ns=self.read_map("state_duration_sum_ns"),
            connection_buckets=self.read_map("connection_duration_buckets"),
            connection_sum_ns=self.read_map("connection_duration_sum_ns"),
            live=np.maximum(live, 0),
            counters=self.read_counters(),
            closes=closes,
            # every table entry is a live socket counted in its state
            table_entries=max(int(tracked.sum()), 0),
            table_capacity=table_capacity,
            missed_events=missed_events,
            **ages,
        )

    def close(self) -> None:
        for array in self._arrays.values():
            array.close()
        self._arrays = {}
        if self.table is not None:
            self.table.close()
            self.table = None
