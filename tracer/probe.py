"""Compiles the program tracer/program.py chooses with bcc, writes its
configuration maps, attaches it last (so no event runs half-configured),
and reads its maps.

Serve's maps are memory-mapped arrays (tracer/maps.py): a read is a copy of
memory and a sum over CPUs with numpy, no system call, so it costs the same
whatever the event rate and opens no window in which the kernel skips
tracing programs.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from collections import Counter
from typing import Collection, Iterator, Sequence

import numpy as np

from . import netns
from .errors import EXIT_BPF, TcpstateError
from .maps import MappedArray
from .serve_maps import ServeMaps, Snapshot, port_labels_of, prog_stats_of_fd, serve_layout
from .program import (AUTO, COUNTERS, DEFAULT_SOCKET_TABLE_SIZE, FUNCTION, RAW_TRACEPOINT,
                      TABLE_WAYS, Attachment, bpf_dir, cflags, choose_attachment,
                      possible_cpus, table_rows)
from .reasons import close_reason_table
from .states import NSTATES, code_of

log = logging.getLogger(__name__)


LISTEN = code_of("listen")


def bpf_source(command: str = "serve") -> Path:
    """bpf/serve.bpf.c or bpf/trace.bpf.c."""
    return bpf_dir() / f"{command}.bpf.c"


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



class LoadedProgram:
    """One compiled program (bpf/<command>.bpf.c), configured by the
    subclass in `_configure`, then attached; its counters and run stats."""

    command = ""

    def __init__(self, attach: str = AUTO, service_ports: Sequence[int] = (),
                 socket_table_size: int = DEFAULT_SOCKET_TABLE_SIZE,
                 extra_cflags: Sequence[str] = (), attachment: Attachment | None = None):
        self.attachment = attachment or choose_attachment(attach)  # warns on a fallback
        self.service_ports = tuple(service_ports)
        self.port_slots = 1 + len(self.service_ports)
        self.table_capacity = table_rows(socket_table_size) * TABLE_WAYS
        self.cpus = possible_cpus()
        flags = cflags(self.attachment, self.port_slots, self.table_capacity // TABLE_WAYS,
                       self.cpus) + list(extra_cflags)
        self.bpf = self._load(bpf_source(self.command), flags, self.attachment)
        self._mapped: list[MappedArray] = []
        try:
            self.counters = self._mapped_array("counters", len(COUNTERS), per_cpu=True)
            self._write_service_ports()
            self._write_close_reasons()
            self._configure()
            self.attach()
        except BaseException:
            self.close()
            raise

    @property
    def attach_kind(self) -> str:
        return self.attachment.kind

    @staticmethod
    def _load(source: Path, flags: list[str], attachment: Attachment):
        from bcc import BPF

        kind = BPF.RAW_TRACEPOINT if attachment.kind == RAW_TRACEPOINT else BPF.TRACEPOINT
        with _stderr_captured() as clang_output:
            try:
                bpf = BPF(src_file=str(source).encode(), cflags=flags)
                bpf.load_func(FUNCTION.encode(), kind)
            except Exception as exc:
                detail = _first_failure(clang_output.read_text()) or str(exc)
                raise TcpstateError(
                    f"loading {source.name} failed: {detail}", EXIT_BPF
                ) from None
        log.debug("loaded %s with %s", source, " ".join(flags))
        return bpf

    def _configure(self) -> None:
        """Write what the program reads before its first event."""

    def attachment_fd(self) -> int:
        """The descriptor that keeps the program attached: the raw
        tracepoint's, or the perf event's of the classic tracepoint."""
        target = self.attachment.target.encode()
        if self.attachment.kind == RAW_TRACEPOINT:
            return self.bpf.raw_tracepoint_fds[target]
        return self.bpf.tracepoint_fds[target]

    def attach(self) -> None:
        """Attach the loaded program (done once configured; bench/ detaches
        and attaches again to time programs one at a time)."""
        try:
            if self.attachment.kind == RAW_TRACEPOINT:
                self.bpf.attach_raw_tracepoint(tp=self.attachment.target.encode(),
                                               fn_name=FUNCTION.encode())
            else:
                self.bpf.attach_tracepoint(tp=self.attachment.target.encode(),
                                           fn_name=FUNCTION.encode())
        except Exception as exc:
            raise TcpstateError(f"attaching to {self.attachment.kind} "
                                f"{self.attachment.target} failed: {exc}", EXIT_BPF) from None

    def detach(self) -> None:
        target = self.attachment.target.encode()
        if self.attachment.kind == RAW_TRACEPOINT:
            self.bpf.detach_raw_tracepoint(target)
        else:
            self.bpf.detach_tracepoint(target)

    def _mapped_array(self, name: str, cells: int, per_cpu: bool, dtype=np.uint64,
                      writable: bool = False) -> MappedArray:
        cpus = self.cpus if per_cpu else 1
        array = MappedArray(self.bpf[name.encode()].map_fd, cells * cpus, dtype, cpus, writable)
        self._mapped.append(array)
        return array

    def _write_service_ports(self) -> None:
        if not self.service_ports:
            return
        table = self.bpf[b"service_port_slot"]
        for slot, port in enumerate(self.service_ports, start=1):
            table[ct.c_int(port)] = ct.c_uint8(slot)

    def _write_close_reasons(self) -> None:
        """The table of tracer/reasons.py, into the program's close_reason map
        (an array's cells start at 0, the first reason: only others are written)."""
        if not self.attachment.close_reasons:
            return
        table = self.bpf[b"close_reason"]
        for key, code in enumerate(close_reason_table()):
            if code:
                table[ct.c_int(key)] = ct.c_uint8(code)

    def read_counters(self) -> dict[str, int]:
        return dict(zip(COUNTERS, (int(v) for v in self.counters.read())))

    def prog_stats(self) -> dict[str, int]:
        """run_time_ns, run_cnt and recursion_misses of our program (the
        kernel skips and counts events that arrive while the program
        already runs on that CPU)."""
        return prog_stats_of_fd(self.bpf.funcs[FUNCTION.encode()].fd)

    def close(self) -> None:
        for array in getattr(self, "_mapped", ()):
            array.close()
        self._mapped = []
        bpf, self.bpf = getattr(self, "bpf", None), None
        if bpf is not None:
            bpf.cleanup()


class Probe(LoadedProgram):
    """`tcpstate serve`'s program and readers of its maps."""

    command = "serve"

    def __init__(self, service_ports: Sequence[int] = (),
                 socket_table_size: int = DEFAULT_SOCKET_TABLE_SIZE,
                 extra_cflags: Sequence[str] = (), seed_live_sockets: bool = True,
                 attach: str = AUTO, attachment: Attachment | None = None):
        self.port_labels = port_labels_of(service_ports)
        super().__init__(attach, service_ports, socket_table_size, extra_cflags, attachment)
        try:
            if seed_live_sockets:
                self.seed_live_sockets()
        except BaseException:
            self.close()
            raise

    def _configure(self) -> None:
        self.layout = serve_layout(self.port_slots, self.attachment.close_reasons)
        self.maps = ServeMaps({name: self.map_fd(name) for name in self.layout},
                              self.layout, self.cpus, self.map_fd("socket_table"),
                              self.table_capacity // TABLE_WAYS, TABLE_WAYS)

    def map_fd(self, name: str) -> int:
        return self.bpf[name.encode()].map_fd

    def read_map(self, name: str) -> np.ndarray:
        return self.maps.read_map(name)

    def port_slot_of(self, local_port: int, remote_port: int,
                     listening: Collection[int] = ()) -> int:
        """The slot the kernel gives a socket first seen after its birth
        (bpf: port_slot_unseen): a server's local port (something listens
        on it), else a client's remote port, else its local port."""
        order = ((local_port,) if local_port in listening else
                 (remote_port, local_port))
        for port in order:
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
        seeded = np.zeros(self.layout["live_untracked"].shape, dtype=np.int64)
        listening: Counter[int] = Counter()
        for counts in found.values():
            for (state, local_port, _), n in counts.items():
                if state == LISTEN:
                    listening[local_port] += n
        self._write_listeners(listening)
        for family, counts in found.items():
            for (state, local_port, remote_port), n in counts.items():
                if 0 < state < NSTATES:
                    slot = self.port_slot_of(local_port, remote_port, listening)
                    seeded[slot, family, state] += n
        seeded = np.maximum(seeded - after, 0)
        self.maps.write_untracked(seeded)
        log.info("seeded %d sockets that predate start", int(seeded.sum()))

    def _write_listeners(self, listening: Counter[int]) -> None:
        """Add the listeners that predate the program to its per-port count
        (its own count of those born since attach stays in the cell)."""
        if not self.service_ports:
            return
        table = self.bpf[b"listeners"]
        for port, n in listening.items():
            key = ct.c_int(port)
            table[key] = ct.c_int64(table[key].value + n)

    def refresh_sums(self) -> None:
        self.maps.refresh_sums()

    def read(self) -> Snapshot:
        return self.maps.snapshot(self.table_capacity,
                                  self.prog_stats().get("recursion_misses", 0))

    def time_wait(self) -> int:
        """TIME-WAIT mini-sockets in every namespace (the kernel's count)."""
        return netns.time_wait_total()

    def handoff(self) -> tuple[dict, list[int]]:
        """What the serving process needs to keep the program attached and
        read it (tracer/held.py), and the descriptors, in that order: the
        program, its attachment, each map of the layout, the socket table."""
        fds = [self.bpf.funcs[FUNCTION.encode()].fd, self.attachment_fd()]
        fds += [self.map_fd(name) for name in self.layout]
        fds.append(self.map_fd("socket_table"))
        return {
            "attach": self.attachment.kind,
            "target": self.attachment.target,
            "maps": list(self.layout),
            "port_slots": self.port_slots,
            "close_reasons": self.attachment.close_reasons,
            "port_labels": list(self.port_labels),
            "cpus": self.cpus,
            "table_capacity": self.table_capacity,
            "table_ways": TABLE_WAYS,
            "bcc_version": bcc_version(),
        }, fds

    def close(self) -> None:
        maps = getattr(self, "maps", None)
        if maps is not None:
            maps.close()
        super().close()


def bcc_version() -> str:
    try:
        import bcc

        return getattr(bcc, "__version__", "")
    except ImportError:
        return ""


# bpf/trace.bpf.c: the bits of trace_ports
PORT_ANY_END, PORT_LOCAL, PORT_REMOTE = 1, 2, 4


@dataclass(frozen=True)
class TraceFilter:
    """What trace.bpf.c's filter maps hold: the trace's flags, decided."""

    ports: frozenset[int] = frozenset()  # either end
    lports: frozenset[int] = frozenset()
    rports: frozenset[int] = frozenset()
    pids: frozenset[int] = frozenset()
    family_mask: int = 0  # bit: index in FAMILIES
    state_mask: int = 0  # bit: kernel state code
    transition_rows: tuple[int, ...] = ()  # per old state: bit of each new state
    min_duration_ns: int = 0
    reason_mask: int = 0  # bit: reason code (tracer/reasons.py); 0 = any event


class TraceProbe(LoadedProgram):
    """`tcpstate trace`'s program: the filters are written before it is
    attached, so no event passes half-configured ones."""

    command = "trace"

    def __init__(self, trace_filter: TraceFilter, ringbuf_pages: int, attach: str = AUTO,
                 attachment: Attachment | None = None):
        self.trace_filter = trace_filter
        super().__init__(attach, extra_cflags=[f"-DRINGBUF_PAGES={ringbuf_pages}"],
                         attachment=attachment)

    def _configure(self) -> None:
        f = self.trace_filter
        ports = self.bpf[b"trace_ports"]
        bits: dict[int, int] = {}
        for values, bit in ((f.ports, PORT_ANY_END), (f.lports, PORT_LOCAL),
                            (f.rports, PORT_REMOTE)):
            for port in values:
                bits[port] = bits.get(port, 0) | bit
        for port, value in bits.items():
            ports[ct.c_int(port)] = ct.c_uint8(value)
        pids = self.bpf[b"trace_pids"]
        for pid in f.pids:
            pids[ct.c_uint32(pid)] = ct.c_uint8(1)
        table = self.bpf[b"trace_transitions"]
        for old, row in enumerate(f.transition_rows):
            if row:
                table[ct.c_int(old)] = ct.c_uint32(row)
        config = self.bpf[b"trace_config"].Leaf()
        config.min_duration_ns = f.min_duration_ns
        config.state_mask = f.state_mask
        config.family_mask = f.family_mask
        config.any_port, config.local_port = bool(f.ports), bool(f.lports)
        config.remote_port, config.pid = bool(f.rports), bool(f.pids)
        config.transition = any(f.transition_rows)
        config.reason_mask = f.reason_mask
        config.reason = bool(f.reason_mask)
        config.ready = 1
        self.bpf[b"trace_config"][ct.c_int(0)] = config

    def stop_matching(self) -> None:
        """Clear `ready`: the program matches nothing from now on."""
        config = self.bpf[b"trace_config"][ct.c_int(0)]
        config.ready = 0
        self.bpf[b"trace_config"][ct.c_int(0)] = config

    def ring_buffer_fd(self) -> int:
        return self.bpf[b"events"].map_fd
