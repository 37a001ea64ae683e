"""`tcpstate trace`: every TCP state change as it happens, one line each.

Loads its own program, bpf/trace.bpf.c (so it runs beside `tcpstate serve`),
has the filters written into its maps before it is attached, where the
kernel applies them before an event reaches user space, and drains the
ring buffer on a short timer: the kernel submits without waking us
(BPF_RB_NO_WAKEUP), so a busy host does not pay one wake-up per event.

Lost events are counted by the kernel (a failed reserve), so the number in
the exit summary is exact.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import signal
import stat
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .errors import EXIT_KERNEL_VERSION, TcpstateError, UsageError
from .prereq import TRACE_NEEDS, check_all, kernel_features
from .program import REASONS_NEED, REASONS_OFF, choose_attachment, warn_if_reasons_off
from .probe import TraceFilter, TraceProbe
from .reasons import CODE as REASON_CODE, REASONS, parse_reasons
from .ringbuf import RingBufferReader
from .states import BY_NAME, FAMILIES, NSTATES
from .trace_format import EVENT, JsonFormat, TextFormat, WallClock, format_summary, \
    transition_matrix

log = logging.getLogger(__name__)

DEFAULT_RINGBUF_PAGES = 4096  # 16 MiB: 0.8 s of events at 200k/s, for stalls
MAX_RINGBUF_PAGES = 1 << 16   # 256 MiB
MAX_PIDS = 1024               # bpf: trace_pids entries
DRAIN_INTERVAL_S = 0.02       # how long events wait in the ring buffer at most
FINAL_DRAIN_TIMEOUT_S = 0.5


# ---------------------------------------------------------------- flags

def _state(text: str) -> str:
    name = text.strip().lower().replace("-", "_")
    if name not in BY_NAME:
        raise argparse.ArgumentTypeError(
            f"unknown state {text!r}; valid states: {', '.join(BY_NAME)}")
    return name


def _list_of(parse):
    """A flag value that may list several, comma-separated: `80,443`."""
    def parse_all(text: str) -> list:
        return [parse(item) for item in text.split(",")]
    parse_all.__name__ = parse.__name__
    return parse_all


def _port(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 1-65535")
    return int(text)


def _pid(text: str) -> int:
    text = text.strip()
    if not text.isdigit() or int(text) <= 0 or int(text) >= 1 << 22:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


def _transition(text: str) -> tuple[str, str]:
    old, sep, new = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not OLD:NEW (e.g. established:close_wait); "
            f"valid states: {', '.join(BY_NAME)}")
    return _state(old), _state(new)


def _number(minimum: float, inclusive: bool, kind=float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < minimum or (value == minimum and not inclusive) or value != value:
            relation = "at least" if inclusive else "more than"
            raise argparse.ArgumentTypeError(f"{text!r} must be {relation} {minimum}")
        return value
    parse.__name__ = kind.__name__
    return parse


def _reasons(text: str) -> list[str]:
    try:
        return parse_reasons(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ringbuf_pages(text: str) -> int:
    pages = _number(1, True, int)(text)
    if pages & (pages - 1) or pages > MAX_RINGBUF_PAGES:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be a power of two from 1 to {MAX_RINGBUF_PAGES}")
    return pages


def add_trace_parser(subparsers) -> argparse.ArgumentParser:
    """`tcpstate trace` and its flags; returns the parser so the caller can
    add the flags every command shares."""
    parser = subparsers.add_parser(
        "trace", help="print every TCP state change as it happens",
        description="Print one line per TCP state change. Filters run in the kernel; "
                    "a repeated flag (or a comma list) ORs its values, different flags AND.")
    filters = parser.add_argument_group("filters (applied in the kernel)")
    for flag, dest, what in (("--port", "ports", "local or remote port"),
                             ("--lport", "lports", "local port"),
                             ("--rport", "rports", "remote port")):
        filters.add_argument(flag, dest=dest, type=_list_of(_port), action="append",
                             default=[], metavar="PORT", help=f"{what} is PORT")
    filters.add_argument("--pid", dest="pids", type=_list_of(_pid), action="append",
                         default=[], metavar="PID",
                         help="the process that owns the socket is PID (known once it "
                              "connects, listens or closes it)")
    filters.add_argument("-4", dest="families", action="append_const", const="ipv4",
                         default=[], help="IPv4 only")
    filters.add_argument("-6", dest="families", action="append_const", const="ipv6",
                         help="IPv6 only")
    filters.add_argument("--state", dest="states", type=_list_of(_state), action="append",
                         default=[], metavar="STATE",
                         help="old or new state is STATE (e.g. close_wait)")
    filters.add_argument("--transition", dest="transitions", type=_transition,
                         action="append", default=[], metavar="OLD:NEW",
                         help="only this transition (e.g. syn_sent:close)")
    filters.add_argument("--min-ms", type=_number(0, False), metavar="MS",
                         help="only transitions out of a state held at least MS ms")
    filters.add_argument("--reason", dest="reasons", type=_reasons, action="append",
                         default=[], metavar="REASON",
                         help=f"only transitions into close for this reason: "
                              f"{', '.join(REASONS)} (README, close reasons); {REASONS_NEED}")
    parser.add_argument("--duration", type=_number(0, False), metavar="SECONDS",
                        help="stop after SECONDS")
    parser.add_argument("--count", type=_number(1, True, int), metavar="N",
                        help="stop after N events")
    parser.add_argument("--json", action="store_true",
                        help="one JSON object per line (NDJSON), every field")
    parser.add_argument("--ringbuf-pages", type=_ringbuf_pages,
                        default=DEFAULT_RINGBUF_PAGES, metavar="N",
                        help=f"ring buffer size in pages, a power of two "
                             f"(default {DEFAULT_RINGBUF_PAGES})")
    return parser


@dataclass
class Filters:
    ports: set[int] = field(default_factory=set)
    lports: set[int] = field(default_factory=set)
    rports: set[int] = field(default_factory=set)
    pids: set[int] = field(default_factory=set)
    families: set[str] = field(default_factory=set)
    states: set[str] = field(default_factory=set)
    transitions: set[tuple[str, str]] = field(default_factory=set)
    min_ms: float | None = None
    reasons: set[str] = field(default_factory=set)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Filters":
        flat = lambda lists: {item for values in lists for item in values}  # noqa: E731
        filters = cls(ports=flat(args.ports), lports=flat(args.lports),
                      rports=flat(args.rports), pids=flat(args.pids),
                      families=set(args.families), states=flat(args.states),
                      transitions=set(args.transitions), min_ms=args.min_ms,
                      reasons=flat(args.reasons))
        if len(filters.pids) > MAX_PIDS:
            raise UsageError(f"--pid: at most {MAX_PIDS} processes")
        return filters

    def describe(self) -> str:
        parts = [f"{name}={','.join(sorted(map(str, values)))}" for name, values in (
            ("port", self.ports), ("lport", self.lports), ("rport", self.rports),
            ("pid", self.pids), ("family", self.families), ("state", self.states),
            ("transition", {f"{a}:{b}" for a, b in self.transitions}),
            ("reason", self.reasons))
            if values]
        if self.min_ms is not None:
            parts.append(f"min-ms={self.min_ms:g}")
        return " ".join(parts) or "none"

    def kernel_filter(self) -> TraceFilter:
        """The filter maps' contents (tracer/probe.py writes them)."""
        rows = [0] * NSTATES
        for old, new in self.transitions:
            rows[BY_NAME[old].kernel_code] |= 1 << BY_NAME[new].kernel_code
        return TraceFilter(
            ports=frozenset(self.ports), lports=frozenset(self.lports),
            rports=frozenset(self.rports), pids=frozenset(self.pids),
            family_mask=sum(1 << FAMILIES.index(f) for f in self.families),
            state_mask=sum(1 << BY_NAME[s].kernel_code for s in self.states),
            transition_rows=tuple(rows),
            min_duration_ns=round(self.min_ms * 1e6) if self.min_ms else 0,
            reason_mask=sum(1 << REASON_CODE[r] for r in self.reasons),
        )


# ---------------------------------------------------------------- output

class Output:
    """Standard output, written a batch at a time. A closed pipe (the reader
    exited, as `head` does) ends the trace quietly, even when no event comes
    to be written: poll reports the pipe's error state."""

    def __init__(self, fd: int = 1):
        self.fd = fd
        self.closed = False
        self._poll = None
        mode = os.fstat(fd).st_mode
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            self._poll = select.poll()
            self._poll.register(fd, 0)  # POLLERR and POLLHUP are always reported

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view and not self.closed:
                view = view[os.write(self.fd, view):]
        except BrokenPipeError:
            self._close()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            self._close()

    def wait(self, seconds: float) -> None:
        """Sleep `seconds`, waking early when the reader goes away."""
        if self._poll is None:
            time.sleep(seconds)
        elif self._poll.poll(seconds * 1000):
            self._close()

    def _close(self) -> None:
        # Nothing may write to the dead pipe again, Python's own flush of
        # sys.stdout at exit included.
        self.closed = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self.fd)
        os.close(devnull)


# ---------------------------------------------------------------- run

class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum, _frame) -> None:
        log.debug("received %s, stopping", signal.Signals(signum).name)
        self.requested = True


def trace(args: argparse.Namespace) -> int:
    filters = Filters.from_args(args)  # a bad flag before any work
    features = kernel_features()
    attachment = choose_attachment(args.attach, features=features)
    if filters.reasons and not attachment.close_reasons:
        raise TcpstateError(f"--reason: {REASONS_OFF}", EXIT_KERNEL_VERSION)
    check_all(needs=TRACE_NEEDS, features=features, attach=attachment.kind)
    warn_if_reasons_off(attachment)  # after the checks: a failing one is the only line
    stop = _Stop()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    output = Output()
    clock = WallClock()
    ipv4_only = filters.families == {"ipv4"}
    formatter = JsonFormat(clock) if args.json else TextFormat(clock, ipv4_only=ipv4_only)

    pages = args.ringbuf_pages
    probe = TraceProbe(filters.kernel_filter(), pages, attachment=attachment)
    reader = None
    try:
        reader = RingBufferReader(probe.ring_buffer_fd(), pages * os.sysconf("SC_PAGE_SIZE"),
                                  EVENT)
        log.info("tracing the %s (prog id %s, ring buffer %d pages); filters: %s; %s",
                 probe.attachment.describe(),
                 probe.prog_stats().get("prog_id"), pages, filters.describe(),
                 features.summary())
        output.write(formatter.header())
        session = _Session(reader, formatter, output, args.count)
        deadline = time.monotonic() + args.duration if args.duration else None
        while not (stop.requested or session.done or output.closed):
            session.drain()
            if deadline is not None and time.monotonic() >= deadline:
                break
            if session.last_batch < reader.capacity // 4:  # else: more is waiting
                output.wait(DRAIN_INTERVAL_S)
        probe.stop_matching()
        matched, lost = session.final_drain(probe)
        missed = probe.prog_stats().get("recursion_misses", 0)
    finally:
        if reader is not None:
            reader.close()
        probe.close()
    log.debug("matched %d, taken %d, printed %d, lost %d", matched, session.taken,
              session.printed, lost)
    try:
        sys.stderr.write(format_summary(session.matrix, session.printed, lost, missed))
        sys.stderr.flush()
    except OSError:
        pass
    return 0


class _Session:
    """What one trace has taken, printed and counted."""

    def __init__(self, reader: RingBufferReader, formatter, output: Output, count: int | None):
        self.reader, self.formatter, self.output = reader, formatter, output
        self.remaining = count
        self.taken = 0
        self.printed = 0
        self.last_batch = 0
        self.matrix = np.zeros((NSTATES, NSTATES), np.int64)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def drain(self) -> None:
        events = self.reader.take()
        self.taken += len(events)
        self.last_batch = len(events)
        if self.output.closed or self.done or not len(events):
            return
        if self.remaining is not None:
            events = events[:self.remaining]
            self.remaining -= len(events)
        self.output.write(self.formatter.lines(events))
        if not self.output.closed:
            self.printed += len(events)
            self.matrix += transition_matrix(events)

    def final_drain(self, probe: TraceProbe) -> tuple[int, int]:
        """Take what is left until every event the kernel matched is either
        taken or counted as lost: an event reserved just before the filter
        was cleared may still be being written. Returns (matched, lost)."""
        deadline = time.monotonic() + FINAL_DRAIN_TIMEOUT_S
        while True:
            self.drain()
            counters = probe.read_counters()
            matched, lost = counters["trace_matched"], counters["ringbuf_drops"]
            if self.taken + lost >= matched or time.monotonic() >= deadline:
                return matched, lost
            time.sleep(0.001)
