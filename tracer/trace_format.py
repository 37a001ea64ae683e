"""Output of `tcpstate trace`: aligned text columns or NDJSON, and the exit
summary.

Events arrive in batches as numpy arrays of struct trace_event
(bpf/trace.bpf.c). Text lines have fixed-width columns, so a whole batch
is laid out as one byte matrix with numpy, a column at a time, and written
with one call: Python runs per batch and per distinct value (an address, a
process), never per event. JSON needs Python per event, with cached pieces.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import socket
import time
from typing import Callable

import numpy as np

from .reasons import REASONS
from .states import BY_CODE, FAMILIES, NSTATES, SIDES, STATES, name_of

UNKNOWN_NS = (1 << 64) - 1  # the kernel's ~0: duration or lifetime not known

# struct trace_event, field by field (offsets as clang lays it out).
EVENT = np.dtype({
    "names": ["timestamp_ns", "sk", "duration_ns", "lifetime_ns", "owner_pid",
              "sport", "dport", "family", "oldstate", "newstate", "side", "reason",
              "saddr", "daddr", "owner_comm"],
    "formats": ["<u8", "<u8", "<u8", "<u8", "<u4", "<u2", "<u2", "u1", "u1", "u1", "u1",
                "u1", "V16", "V16", "S16"],
    "offsets": [0, 8, 16, 24, 32, 36, 38, 40, 41, 42, 43, 44, 45, 61, 77],
    "itemsize": 96,
})
COMM_LEN = 16
REASON_WIDTH = max(map(len, REASONS))
# Reason text by the event's code: "-" for any code that is not a reason
# (NO_REASON: not a close, or reasons off).
REASON_TEXTS = tuple(REASONS[code] if code < len(REASONS) else "-" for code in range(256))

CORNER = "old \\ new"  # the summary matrix's top left cell


class WallClock:
    """Kernel timestamps (CLOCK_MONOTONIC ns, bpf_ktime_get_ns) to wall-clock
    ns: one offset, taken once at start between two monotonic reads."""

    def __init__(self) -> None:
        before = time.monotonic_ns()
        wall = time.time_ns()
        after = time.monotonic_ns()
        self.offset_ns = wall - (before + after) // 2

    def wall_ns(self, monotonic_ns: np.ndarray) -> np.ndarray:
        return monotonic_ns.astype(np.int64) + self.offset_ns


def format_address(family: int, raw: bytes) -> str:
    """IPv4 events carry IPv4-mapped addresses (::ffff:a.b.c.d)."""
    if family == 0:
        return socket.inet_ntop(socket.AF_INET, raw[12:16])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _fixed(texts: list[str], width: int, align: str = "<") -> np.ndarray:
    """Strings padded (or cut) to `width` as a byte matrix, one row each."""
    joined = "".join(f"{text:{align}{width}.{width}}" for text in texts)
    return np.frombuffer(joined.encode("ascii", "replace"), np.uint8).reshape(len(texts), width)


# Numbers are cut into groups of three digits: one division and one table
# look-up per group, not one division per digit. Rows 0-999 are "000"-"999"
# (inner groups), rows 1000-1999 "  0"-"999" (the leading group), row 2000
# is blank (left of the leading group).
_TRIPLES = _fixed([f"{i:03d}" for i in range(1000)], 3)
_GROUPS = np.concatenate([_TRIPLES, _fixed([str(i) for i in range(1000)], 3, ">"),
                          _fixed([""], 3)])
_LEADING, _BLANK = 1000, 2000
_GROUP_CELLS = np.ascontiguousarray(_GROUPS).view("V3").ravel()


_TIME_CELL = np.dtype({"names": ["seconds", "millis", "space"],
                       "formats": ["V9", "V3", "S1"], "offsets": [0, 9, 12], "itemsize": 13})
_UNKNOWN_MS = np.frombuffer(f"{'-':>14}\n".encode(), "V15")[0]


def _triples(values: np.ndarray) -> np.ndarray:
    """"000"-"999" for values 0-999, as an (n, 3) byte matrix: a take of
    3-byte items is several times faster than indexing the rows of a 2-D
    table."""
    return np.take(_GROUP_CELLS, values).view(np.uint8).reshape(-1, 3)


def _digits(values: np.ndarray, width: int) -> np.ndarray:
    """Decimal digits of non-negative integers, right-aligned in `width`
    columns; values too wide are capped."""
    groups = -(-width // 3)
    capped = np.minimum(values.astype(np.uint64), np.uint64(10 ** width - 1))
    small = width <= 9 or not len(capped) or int(capped.max()) < 1 << 31
    remaining = capped.astype(np.int32 if small else np.int64)  # int32 divides faster
    # a column of 3-byte items per group: assigning items is several times
    # faster than assigning 3 columns of bytes
    out = np.empty((len(remaining), groups), _GROUP_CELLS.dtype)
    for group in range(groups - 1, -1, -1):
        if group < groups - 1 and not remaining.any():
            out[:, group] = _GROUP_CELLS[_BLANK]
            continue
        higher = remaining // 1000
        triple = remaining - higher * 1000
        if group == groups - 1:
            index = np.where(higher > 0, triple, triple + _LEADING)
        else:
            index = np.where(higher > 0, triple,
                             np.where(triple > 0, triple + _LEADING, _BLANK))
        out[:, group] = np.take(_GROUP_CELLS, index)
        remaining = higher
    return out.view(np.uint8).reshape(len(out), 3 * groups)[:, 3 * groups - width:]


def _words(raw: np.ndarray, start: int, size: int) -> np.ndarray:
    """Bytes [start, start + size) of each row as little-endian u64 words."""
    return np.ascontiguousarray(raw[:, start:start + size]).view("<u8")


_PEEL_AT_MOST = 4  # distinct values split off one by one; more are sorted


def _distinct_rows(words: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """For the rows of an (n, k) u64 array: the index of one row of each
    distinct value, and each row's distinct value. Sorting one u64 key is
    far faster than sorting k-word keys, so rows are hashed to one word;
    the rare collision is caught and the exact way taken. When every row
    is the same (one address on a loopback or one-address host), inverse is
    None: the one value stands for all rows. A few distinct values (owners:
    a process, or "-") are peeled off one by one, three times faster than
    sorting."""
    inverse = np.empty(len(words), np.intp)
    unassigned = np.ones(len(words), bool)
    first = []
    for value in range(_PEEL_AT_MOST):
        row = int(np.argmax(unassigned))
        same = words[:, 0] == words[row, 0]
        for column in range(1, words.shape[1]):
            same &= words[:, column] == words[row, column]
        if value == 0 and same.all():
            return np.zeros(1, np.intp), None
        inverse[same] = value
        unassigned &= ~same
        first.append(row)
        if not unassigned.any():
            return np.array(first, np.intp), inverse
    key = words[:, 0].copy()
    for column in range(1, words.shape[1]):
        key *= np.uint64(0x9E3779B97F4A7C15)
        key ^= words[:, column]
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    if words.shape[1] > 1 and not (words[first][inverse] == words).all():
        exact = np.ascontiguousarray(words).view(f"V{8 * words.shape[1]}").ravel()
        _, first, inverse = np.unique(exact, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    return first, inverse


class _Distinct:
    """A column whose values repeat (addresses, process names, pids): each
    distinct value is rendered once, and remembered across batches. A cell
    is `width` bytes: the text, cut to leave room for one space after it."""

    def __init__(self, width: int, render: Callable[..., str]):
        self.width, self.render = width, render
        self._cells: dict[tuple[int, ...], np.ndarray] = {}

    def __call__(self, words: np.ndarray) -> np.ndarray:
        """The cells of each row, as items of `width` bytes; one item when
        every row holds the same value (it broadcasts where assigned)."""
        first, inverse = _distinct_rows(words)
        table = np.empty((len(first), self.width), np.uint8)
        for row, key in enumerate(map(tuple, words[first].tolist())):
            cells = self._cells.get(key)
            if cells is None:
                if len(self._cells) >= 65536:
                    self._cells.clear()
                text = self.render(*key)[:self.width - 1]
                cells = self._cells[key] = _fixed([text], self.width)[0]
            table[row] = cells
        items = _cells(table)
        return items if inverse is None else np.take(items, inverse)


def _address_text(family: int, high: int, low: int) -> str:
    return format_address(family, high.to_bytes(8, "little") + low.to_bytes(8, "little"))


def comm_text(raw: bytes) -> str:
    """A process name, printable: control and non-ASCII bytes become "?" so
    that no process can put escape sequences on the user's terminal."""
    name = raw.split(b"\0", 1)[0]
    return "".join(chr(b) if 0x20 <= b < 0x7F else "?" for b in name) or "-"


def _owner_text(pid: int, first: int, second: int) -> str:
    """The PID and COMM columns; "-" where the owner is not known."""
    comm = comm_text(first.to_bytes(8, "little") + second.to_bytes(8, "little"))
    return f"{pid or '-':>7} {comm[:15] if pid else '-'}"


class _Table:
    """A byte matrix looked up by row: numpy's take is several times faster
    on one fixed-size item per row than on the rows of a 2-D array."""

    def __init__(self, rows: np.ndarray):
        self.width = rows.shape[1]
        self.items = np.ascontiguousarray(rows).view(f"V{self.width}").ravel()

    def __getitem__(self, index: np.ndarray) -> np.ndarray:
        return np.take(self.items, index)


def _cells(rows: np.ndarray) -> np.ndarray:
    """An (n, width) byte matrix as n items of `width` bytes."""
    return np.ascontiguousarray(rows).view(f"V{rows.shape[1]}").ravel()


class TextFormat:
    """Aligned columns: IPv4 and IPv6 share the address columns, which are
    as wide as the widest address the selected families can have.

    A line is a numpy record whose fields are the columns, each cell with
    its separator (a space, the last one a newline): a batch is laid out by
    assigning whole columns of cells, from tables indexed by value where
    the values repeat or are few."""

    def __init__(self, clock: WallClock, ipv4_only: bool = False):
        self.clock = clock
        self.address_width = 15 if ipv4_only else 39
        self.columns = (
            ("TIME", 12, "<"), ("PID", 7, ">"), ("COMM", 15, "<"),
            ("LADDR", self.address_width, "<"), ("LPORT", 5, ">"),
            ("RADDR", self.address_width, "<"), ("RPORT", 5, ">"),
            (f"{'OLDSTATE':<12} -> NEWSTATE", 28, "<"), ("REASON", REASON_WIDTH, "<"),
            ("MS", 14, ">"),
        )
        names = ("time", "owner", "laddr", "lport", "raddr", "rport", "states", "reason", "ms")
        widths = [12 + 1, 7 + 1 + 15 + 1, self.address_width + 1, 5 + 1,
                  self.address_width + 1, 5 + 1, 28 + 1, REASON_WIDTH + 1, 14 + 1]
        offsets = list(np.cumsum([0] + widths[:-1]))
        self.line_length = sum(widths)
        self._line = np.dtype({"names": names, "formats": [f"V{w}" for w in widths],
                               "offsets": offsets, "itemsize": self.line_length})
        # Tables indexed by the value: state pairs, ports, seconds of the day.
        self._transitions = _Table(_fixed([f"{name_of(old):<12} -> {name_of(new)}"
                                           for old in range(NSTATES)
                                           for new in range(NSTATES)], 28 + 1))
        self._ports = _Table(_fixed([f"{port:>5} " for port in range(65536)], 5 + 1))
        self._reasons = _Table(_fixed(list(REASON_TEXTS), REASON_WIDTH + 1))
        self._seconds = _Table(_fixed([f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}."
                                       for s in range(86400)], 9))
        self._addresses = _Distinct(self.address_width + 1, _address_text)
        self._owners = _Distinct(7 + 1 + 15 + 1, _owner_text)

    def header(self) -> bytes:
        return (" ".join(f"{title:{align}{width}}" for title, width, align in self.columns)
                .rstrip() + "\n").encode()

    def lines(self, events: np.ndarray) -> bytes:
        n = len(events)
        if n == 0:
            return b""
        if events.dtype != EVENT:  # e.g. numpy packed it: the byte layout is used below
            events = events.astype(EVENT)
        raw = np.ascontiguousarray(events).view(np.uint8).reshape(n, EVENT.itemsize)
        lines = np.empty(n, self._line)  # every byte is written below
        lines["time"] = self._clock_times(events["timestamp_ns"])
        owners = np.empty((n, 3), np.uint64)  # PID and COMM: one look-up
        owners[:, 0] = events["owner_pid"]
        owners[:, 1:] = _words(raw, EVENT.fields["owner_comm"][1], 16)
        lines["owner"] = self._owners(owners)
        addresses = np.empty((n, 3), np.uint64)
        addresses[:, 0] = events["family"]
        for column, field in (("laddr", "saddr"), ("raddr", "daddr")):
            addresses[:, 1:] = _words(raw, EVENT.fields[field][1], 16)
            lines[column] = self._addresses(addresses)
        lines["lport"] = self._ports[events["sport"]]
        lines["rport"] = self._ports[events["dport"]]
        pairs = events["oldstate"].astype(np.intp) % NSTATES * NSTATES + events["newstate"] % NSTATES
        lines["states"] = self._transitions[pairs]
        lines["reason"] = self._reasons[events["reason"]]
        lines["ms"] = self._milliseconds(events["duration_ns"])
        return lines.tobytes()

    def _clock_times(self, monotonic_ns: np.ndarray) -> np.ndarray:
        """HH:MM:SS.mmm and a space, local time (the zone offset of the
        batch's start)."""
        wall_ms = self.clock.wall_ns(monotonic_ns) // 1_000_000
        zone_ms = time.localtime(int(wall_ms[0]) // 1000).tm_gmtoff * 1000
        of_day = (wall_ms + zone_ms) % 86_400_000
        cells = np.empty(len(of_day), _TIME_CELL)  # fields: items assign fast
        cells["seconds"] = self._seconds[of_day // 1000]
        cells["millis"] = np.take(_GROUP_CELLS, of_day % 1000)
        cells["space"] = b" "
        return cells.view(f"V{_TIME_CELL.itemsize}")

    @staticmethod
    def _milliseconds(duration_ns: np.ndarray) -> np.ndarray:
        """Time in the old state, ms with 3 decimals, and the newline; "-"
        when not known."""
        known = duration_ns != np.uint64(UNKNOWN_NS)
        # capped at 9999999999.999 ms (115 days), far beyond any trace's own
        # age; signed, as numpy divides int64 faster than uint64 (2^63 ns and
        # more, which wrap to negative, are over the cap anyway)
        nanos = duration_ns.astype(np.int64)
        nanos[~known] = 0
        nanos[nanos < 0] = np.iinfo(np.int64).max
        micros = np.minimum(nanos // 1000, 10**13 - 1)
        millis = micros // 1000
        cells = np.empty((len(micros), 14 + 1), np.uint8)
        cells[:, 0:10] = _digits(millis, 10)
        cells[:, 10] = ord(".")
        cells[:, 11:14] = _triples(micros - millis * 1000)
        cells[:, 14] = ord("\n")
        items = _cells(cells)
        if not known.all():
            items[~known] = _UNKNOWN_MS
        return items


class SocketIds:
    """An id per socket that does not reveal its kernel address: a keyed
    hash, the key random per run, of the address and the birth time. The
    kernel reuses a freed socket's memory for the next one; the birth time
    (0 for a socket born before the trace) tells them apart."""

    def __init__(self, key: bytes | None = None):
        self._key = key if key is not None else secrets.token_bytes(16)
        self._known: dict[tuple[int, int], str] = {}

    def __call__(self, sk: int, born_ns: int = 0) -> str:
        known = self._known.get((sk, born_ns))
        if known is None:
            if len(self._known) > 65536:
                self._known.clear()
            known = self._known[(sk, born_ns)] = hashlib.blake2b(
                sk.to_bytes(8, "little") + born_ns.to_bytes(8, "little"),
                key=self._key, digest_size=8).hexdigest()
        return known


def _state_fields(key: str, code: int) -> str:
    """`"old_state":"listen","old_state_code":10,"old_state_mib":2`"""
    state = BY_CODE.get(code)
    mib = state.mib_code if state and state.mib_code is not None else "null"
    return f'"{key}":"{name_of(code)}","{key}_code":{code},"{key}_mib":{mib}'


class JsonFormat:
    """One JSON object per line (NDJSON), every field of the event."""

    def __init__(self, clock: WallClock, socket_id: Callable[[int, int], str] | None = None):
        self.clock = clock
        self.socket_id = socket_id or SocketIds()
        self._addresses: dict[tuple[int, bytes], str] = {}
        self._comms: dict[bytes, str] = {}
        self._states = [
            [f'{_state_fields("old_state", old)},{_state_fields("new_state", new)}'
             for new in range(NSTATES)]
            for old in range(NSTATES)
        ]
        self._families = [f'"{name}"' for name in FAMILIES]
        self._sides = [f'"{name}"' if name else "null" for name in SIDES]
        self._reasons = [f'"{text}"' if text != "-" else "null" for text in REASON_TEXTS]
        self._second = (-1, "")

    @staticmethod
    def header() -> bytes:
        return b""

    def _address(self, family: int, raw: bytes) -> str:
        text = self._addresses.get((family, raw))
        if text is None:
            if len(self._addresses) > 65536:
                self._addresses.clear()
            text = self._addresses[(family, raw)] = json.dumps(format_address(family, raw))
        return text

    def _comm(self, raw: bytes) -> str:
        text = self._comms.get(raw)
        if text is None:
            if len(self._comms) > 4096:
                self._comms.clear()
            text = self._comms[raw] = json.dumps(comm_text(raw))
        return text

    def _time(self, wall_ns: int) -> str:
        """RFC 3339 UTC with milliseconds; the seconds part once a second."""
        second = wall_ns // 1_000_000_000
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return f"{self._second[1]}.{wall_ns // 1_000_000 % 1000:03d}Z"

    def lines(self, events: np.ndarray) -> bytes:
        if len(events) == 0:
            return b""
        walls = self.clock.wall_ns(events["timestamp_ns"]).tolist()
        out = []
        for wall, (mono, sk, duration, lifetime, pid, sport, dport, family, old, new,
                   side, reason, saddr, daddr, comm) in zip(walls, events.tolist()):
            born = 0 if lifetime == UNKNOWN_NS else mono - lifetime
            out.append(
                f'{{"time":"{self._time(wall)}","timestamp_ns":{wall},"monotonic_ns":{mono},'
                f'"pid":{pid or "null"},"comm":{self._comm(comm) if pid else "null"},'
                f'"family":{self._families[family & 1]},'
                f'"local_address":{self._address(family, saddr)},"local_port":{sport},'
                f'"remote_address":{self._address(family, daddr)},"remote_port":{dport},'
                f'{self._states[old % NSTATES][new % NSTATES]},'
                f'"reason":{self._reasons[reason]},'
                f'"duration_ns":{"null" if duration == UNKNOWN_NS else duration},'
                f'"lifetime_ns":{"null" if lifetime == UNKNOWN_NS else lifetime},'
                f'"side":{self._sides[side % len(SIDES)]},'
                f'"socket_id":"{self.socket_id(sk, born)}"}}\n'
            )
        return "".join(out).encode()


def transition_matrix(events: np.ndarray) -> np.ndarray:
    """Counts of the batch's events, [old][new] by kernel code."""
    index = events["oldstate"].astype(np.intp) % NSTATES * NSTATES + events["newstate"] % NSTATES
    return np.bincount(index, minlength=NSTATES * NSTATES).reshape(NSTATES, NSTATES)


def format_summary(matrix: np.ndarray, printed: int, lost: int, missed: int) -> str:
    """The exit summary: totals, then old x new counts of the printed events
    (the rows and columns that have any)."""
    lines = [f"tcpstate trace: {printed} events printed, {lost} lost (ring buffer full), "
             f"{missed} missed (the kernel skipped the program: a nested run on a CPU)"]
    order = [state.kernel_code for state in STATES]  # life-cycle order
    rows = [code for code in order if matrix[code].any()]
    columns = [code for code in order if matrix[:, code].any()]
    if rows:
        names = [name_of(code) for code in columns] + ["total"]
        widths = [max(len(name), len(str(int(matrix[:, code].sum()))))
                  for name, code in zip(names, columns)] + [max(5, len(str(printed)))]
        lines.append(f"{CORNER:<12} " + " ".join(
            f"{name:>{width}}" for name, width in zip(names, widths)))
        for old in rows:
            cells = [int(matrix[old, new]) for new in columns] + [int(matrix[old].sum())]
            lines.append(f"{name_of(old):<12} " + " ".join(
                f"{cell:>{width}}" for cell, width in zip(cells, widths)))
        totals = [int(matrix[:, new].sum()) for new in columns] + [printed]
        lines.append(f"{'total':<12} " + " ".join(
            f"{cell:>{width}}" for cell, width in zip(totals, widths)))
    return "\n".join(lines) + "\n"
