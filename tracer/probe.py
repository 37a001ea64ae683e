"""Loads bpf/tcpstate.bpf.c with bcc, attaches it to the tracepoint
sock:inet_sock_set_state, and reads its maps.

The kernel aggregates; this module only copies whole per-CPU arrays out with
one BPF_MAP_LOOKUP_BATCH call each (Linux >= 5.6) and sums the CPUs with
numpy, so a read costs the same whatever the event rate.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import netns
from .errors import EXIT_BPF, TcpstateError, UsageError
from .metrics import BUCKET_MIN_LOG2, MAX_SERVICE_PORTS, NBUCKETS, OTHER_PORT
from .states import FAMILIES, NSTATES, SIDES

log = logging.getLogger(__name__)

# Sockets per socket-table row, passed to bpf/tcpstate.bpf.c as a cflag: 8
# keys fill one cache line, so a lookup reads one line of keys and one of
# its entry. With 262,144 entries, 100k live sockets average 3 per row and
# a full row (an eviction) stays rare (BENCHMARKS.md measures it).
TABLE_WAYS = 8
MIN_SOCKET_TABLE_SIZE = 16
DEFAULT_SOCKET_TABLE_SIZE = 262_144
MAX_SOCKET_TABLE_SIZE = 1 << 24
FUNCTION = "tracepoint__sock__inet_sock_set_state"

# The order of `enum counter` in bpf/tcpstate.bpf.c (a unit test compares).
COUNTERS = (
    "evictions",
    "duration_unknown",
    "other_protocol",
    "ringbuf_drops",
    "trace_matched",
)

NFAMILIES = len(FAMILIES)
NSIDES = len(SIDES)


def bpf_source() -> Path:
    """bpf/tcpstate.bpf.c: inside the installed package (the wheel puts it
    at tracer/bpf/) or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "bpf", here.parent / "bpf"):
        source = candidate / "tcpstate.bpf.c"
        if source.is_file():
            return source
    raise TcpstateError(f"bpf/tcpstate.bpf.c not found next to {here}", EXIT_BPF)


def parse_service_ports(text: str) -> tuple[int, ...]:
    """`80,443` -> (80, 443); UsageError on anything else."""
    ports: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise UsageError(f"--service-ports: {item!r} is not a port number 1-65535")
        if int(item) not in ports:
            ports.append(int(item))
    if len(ports) > MAX_SERVICE_PORTS:
        raise UsageError(f"--service-ports: at most {MAX_SERVICE_PORTS} ports")
    return tuple(ports)


def table_rows(socket_table_size: int) -> int:
    if not MIN_SOCKET_TABLE_SIZE <= socket_table_size <= MAX_SOCKET_TABLE_SIZE:
        raise UsageError(
            f"--socket-table-size must be between {MIN_SOCKET_TABLE_SIZE} "
            f"and {MAX_SOCKET_TABLE_SIZE}"
        )
    return -(-socket_table_size // TABLE_WAYS)


@dataclass
class Snapshot:
    """Totals over all CPUs, shaped by (port slot, family, ...)."""

    transitions: np.ndarray  # [port, family, old, new]
    duration_buckets: np.ndarray  # [port, family, old, new, slot]
    duration_sum_ns: np.ndarray  # [port, family, old, new]
    connection_buckets: np.ndarray  # [port, family, side, slot]
    connection_sum_ns: np.ndarray  # [port, family, side]
    live: np.ndarray  # [port, family, state], never negative
    counters: dict[str, int] = field(default_factory=dict)
    table_entries: int = 0  # sockets in the table: the sum of live_tracked
    table_capacity: int = 0
    missed_events: int = 0


def _possible_cpus() -> int:
    from bcc.utils import get_possible_cpus

    return len(get_possible_cpus())


class _BatchArray:
    """A BPF array read whole with BPF_MAP_LOOKUP_BATCH into numpy."""

    def __init__(self, table, length: int, per_cpu: bool, dtype=np.uint64):
        from bcc.libbcc import lib

        self._lookup_batch = lib.bpf_lookup_batch
        self._fd = table.map_fd
        self._length = length
        self._cpus = _possible_cpus() if per_cpu else 1
        self._keys = np.zeros(length, dtype=np.uint32)
        self._values = np.zeros(length * self._cpus, dtype=dtype)

    def read(self) -> np.ndarray:
        in_batch, out_batch = ct.c_uint32(0), ct.c_uint32(0)
        count = ct.c_uint32(0)
        keys_at, values_at = self._keys.ctypes.data, self._values.ctypes.data
        done = 0
        while done < self._length:
            count.value = self._length - done
            result = self._lookup_batch(
                self._fd,
                ct.byref(in_batch) if done else None,
                ct.byref(out_batch),
                ct.c_void_p(keys_at + 4 * done),
                ct.c_void_p(values_at + 8 * self._cpus * done),
                ct.byref(count),
            )
            done += count.value
            if result != 0:
                code = ct.get_errno()
                if code == errno.ENOENT:
                    break
                raise TcpstateError(f"reading a BPF map failed: {os.strerror(code)}")
            in_batch.value = out_batch.value
        return self._values.reshape(self._length, self._cpus).sum(axis=1)


@contextlib.contextmanager
def _stderr_captured() -> Iterator[Path]:
    """clang prints to fd 2 while bcc compiles; keep it for the log."""
    with tempfile.NamedTemporaryFile(prefix="tcpstate-clang-", mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield Path(sink.name)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_failure(output: str) -> str | None:
    """The line that says why clang or the verifier refused the program."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line or line.startswith("LLVM ERROR"):
            return line
    for before, line in zip(lines, lines[1:]):
        if line.startswith("processed ") and "insns" in line:
            return f"the verifier refused it: {before}"
    return None


class Probe:
    """The loaded and attached BPF program and readers of its maps."""

    def __init__(
        self,
        service_ports: Sequence[int] = (),
        socket_table_size: int = DEFAULT_SOCKET_TABLE_SIZE,
        extra_cflags: Sequence[str] = (),
        seed_live_sockets: bool = True,
    ):
        self.service_ports = tuple(service_ports)
        self.port_slots = 1 + len(self.service_ports)
        # label values by port slot; () when ports are not labelled
        self.port_labels: tuple[str, ...] = (
            (OTHER_PORT, *map(str, self.service_ports)) if self.service_ports else ()
        )
        self.table_capacity = table_rows(socket_table_size) * TABLE_WAYS
        cflags = [
            f"-DNSTATES={NSTATES}",
            f"-DNBUCKETS={NBUCKETS}",
            f"-DBUCKET_MIN_LOG2={BUCKET_MIN_LOG2}",
            f"-DNPORT_SLOTS={self.port_slots}",
            f"-DTABLE_BUCKETS={self.table_capacity // TABLE_WAYS}",
            f"-DTABLE_WAYS={TABLE_WAYS}",
            "-Wno-ignored-attributes",
            "-Wno-unused-function",
            *extra_cflags,
        ]
        self.bpf = self._load(cflags)
        try:
            self._prepare_readers()
            self._write_service_ports()
            if seed_live_sockets:
                self.seed_live_sockets()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _load(cflags: list[str]):
        from bcc import BPF

        source = bpf_source()
        with _stderr_captured() as clang_output:
            try:
                bpf = BPF(src_file=str(source).encode(), cflags=cflags)
            except Exception as exc:
                detail = _first_failure(clang_output.read_text()) or str(exc)
                raise TcpstateError(
                    f"loading {source.name} failed: {detail}", EXIT_BPF
                ) from None
        log.debug("loaded %s with %s", source, " ".join(cflags))
        return bpf

    def _prepare_readers(self) -> None:
        p, f, s, b = self.port_slots, NFAMILIES, NSTATES, NBUCKETS
        self._shapes = {
            "transitions": (p, f, s, s),
            "state_duration_buckets": (p, f, s, s, b),
            "state_duration_sum_ns": (p, f, s, s),
            "connection_duration_buckets": (p, f, NSIDES, b),
            "connection_duration_sum_ns": (p, f, NSIDES),
            "live_tracked": (p, f, s),
            "live_untracked": (p, f, s),
            "counters": (len(COUNTERS),),
        }
        self._readers = {
            name: _BatchArray(
                self.bpf[name],
                int(np.prod(shape)),
                per_cpu=name != "live_untracked",
                dtype=np.int64 if name.startswith("live_") else np.uint64,
            )
            for name, shape in self._shapes.items()
        }

    def read_map(self, name: str) -> np.ndarray:
        return self._readers[name].read().reshape(self._shapes[name])

    def _write_service_ports(self) -> None:
        if not self.service_ports:
            return
        table = self.bpf["service_port_slot"]
        for slot, port in enumerate(self.service_ports, start=1):
            table[ct.c_int(port)] = ct.c_uint8(slot)

    def port_slot_of(self, local_port: int, remote_port: int) -> int:
        """The slot the kernel gives a socket (bpf: port_slot_of)."""
        for port in (local_port, remote_port):
            if port in self.service_ports:
                return 1 + self.service_ports.index(port)
        return 0

    def seed_live_sockets(self, attempts: int = 5) -> None:
        """Count the sockets that predate the program into the untracked
        pool: all full sockets of every namespace, less those the table
        already tracks (born after attach but before the walk). The walk
        is repeated until the tracked counts held still around it."""
        walk = netns.full_sockets_everywhere
        for _ in range(attempts):
            before = self.read_map("live_tracked")
            try:
                found = walk()
            except netns.NamespaceAccessError as exc:
                log.warning("%s: only this namespace's sockets that predate start are "
                            "counted", exc)
                walk = netns.read_full_sockets
                found = walk()
            after = self.read_map("live_tracked")
            if np.array_equal(before, after):
                break
        seeded = np.zeros(self._shapes["live_untracked"], dtype=np.int64)
        for family, counts in found.items():
            for (state, local_port, remote_port), n in counts.items():
                if 0 < state < NSTATES:
                    seeded[self.port_slot_of(local_port, remote_port), family, state] += n
        seeded = np.maximum(seeded - after, 0)
        table = self.bpf["live_untracked"]
        for index, value in enumerate(seeded.reshape(-1)):
            if value:
                table[ct.c_int(index)] = ct.c_longlong(int(value))
        log.info("seeded %d sockets that predate start", int(seeded.sum()))

    def prog_stats(self) -> dict[str, int]:
        """run_time_ns, run_cnt and recursion_misses of our program, from
        /proc/self/fdinfo (the kernel skips and counts events that arrive
        while the program already runs on that CPU)."""
        fd = self.bpf.funcs[FUNCTION.encode()].fd
        stats = {}
        with open(f"/proc/self/fdinfo/{fd}") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key in ("run_time_ns", "run_cnt", "recursion_misses", "prog_id"):
                    stats[key] = int(value)
        return stats

    def read(self) -> Snapshot:
        counters = dict(zip(COUNTERS, (int(v) for v in self.read_map("counters"))))
        tracked = self.read_map("live_tracked")
        live = tracked + self.read_map("live_untracked")
        return Snapshot(
            transitions=self.read_map("transitions"),
            duration_buckets=self.read_map("state_duration_buckets"),
            duration_sum_ns=self.read_map("state_duration_sum_ns"),
            connection_buckets=self.read_map("connection_duration_buckets"),
            connection_sum_ns=self.read_map("connection_duration_sum_ns"),
            live=np.maximum(live, 0),
            counters=counters,
            # every table entry is a live socket counted in its state
            table_entries=max(int(tracked.sum()), 0),
            table_capacity=self.table_capacity,
            missed_events=self.prog_stats().get("recursion_misses", 0),
        )

    def time_wait(self) -> int:
        """TIME-WAIT mini-sockets in every namespace (the kernel's count)."""
        return netns.time_wait_total()

    def close(self) -> None:
        bpf, self.bpf = getattr(self, "bpf", None), None
        if bpf is not None:
            bpf.cleanup()
