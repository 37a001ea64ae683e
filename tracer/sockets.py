"""`tcpstate sockets`: the sockets now in a state, oldest first, from a
running serve's socket table.

The table (handed over the query socket, tracer/query_socket.py, and
memory-mapped: no bpf() call) knows each socket's state, when it entered
it, when it was born (if seen) and a 32-bit hash of its 4-tuple: the
program adds no work per event beyond that hash, computed from what it
has already read. Everything else is found now, in /proc: each network
namespace's /proc/PID/net/tcp{,6} gives the sockets' 4-tuples, states and
inodes, matched to table entries by (state, 4-tuple hash); each
/proc/PID/fd gives the owner of each socket inode. Reading other users'
/proc/PID/fd needs root (or CAP_SYS_PTRACE); the query socket answers only
root.

Limits: a namespace no process is in (an empty `ip netns`) is not read,
so its sockets show no addresses; sockets with the same 4-tuple in two
namespaces cannot be told apart (marked ambiguous); an orphaned socket
(closed by its program, still in FIN-WAIT or LAST-ACK) has no owner.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

from .query_socket import DEFAULT_QUERY_SOCKET, fetch_table
from .socket_table import MappedTable, tuple_hashes
from .states import BY_NAME, NSTATES, TABLE_STATES, code_of, name_of

LISTEN, SYN_SENT = code_of("listen"), code_of("syn_sent")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90s`, `10m`, `1h30m`, `500ms` -> seconds; ValueError otherwise."""
    text = text.strip()
    if not text or _DURATION.sub("", text):
        raise ValueError(f"{text!r} is not a duration like 90s, 10m, 1h or 1h30m")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _DURATION.findall(text))


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [(days, "d"), (hours, "h"), (minutes, "m"), (secs, "s")]
    shown = [f"{n}{unit}" for n, unit in parts if n]
    return "".join(shown[:2]) or "0s"


# ---- /proc ------------------------------------------------------------------
# A line of /proc/net/tcp{,6}: sl, local address:port, remote address:port,
# state, tx:rx queues, timer, retransmits, uid, timeout, inode. Addresses are
# 32-bit words printed %08X each (1 for tcp, 4 for tcp6), ports %04X.
_LINE = re.compile(rb"^ *\d+: ([0-9A-F]+):([0-9A-F]{4}) ([0-9A-F]+):([0-9A-F]{4}) "
                   rb"([0-9A-F]{2}) \S+ \S+ \S+ +\d+ +\d+ (\d+)", re.M)


def _hex_column(values: tuple, dtype: str, width: int = 1) -> np.ndarray:
    """Fixed-width hex fields, all at once: `>u4` words read as /proc
    printed them are the native reads the program hashed."""
    raw = np.frombuffer(bytes.fromhex(b"".join(values).decode()), dtype)
    return raw.reshape(len(values), width) if width > 1 or dtype == ">u4" else raw


@dataclass
class ProcSockets:
    """Every TCP socket /proc shows, as columns."""

    netns: np.ndarray        # int64: inode of the namespace
    v6: np.ndarray           # bool: from tcp6
    local: np.ndarray        # [n, 16] uint8, IPv4 in the last 4 bytes
    remote: np.ndarray
    local_port: np.ndarray   # int64
    remote_port: np.ndarray
    state: np.ndarray        # int64 kernel code
    inode: np.ndarray        # int64, 0 for an orphaned socket
    hashes: np.ndarray       # uint32: tuple_hash_of
    unported: np.ndarray     # uint32: the same with local port 0

    @classmethod
    def parse(cls, text: bytes, netns: int, v6: bool) -> "ProcSockets | None":
        rows = _LINE.findall(text)
        if not rows:
            return None
        local_hex, local_port_hex, remote_hex, remote_port_hex, state_hex, inodes = zip(*rows)
        width = 4 if v6 else 1
        local_words = _hex_column(local_hex, ">u4", width).astype(np.uint32)
        remote_words = _hex_column(remote_hex, ">u4", width).astype(np.uint32)
        local_port = _hex_column(local_port_hex, ">u2").astype(np.int64)
        remote_port = _hex_column(remote_port_hex, ">u2").astype(np.int64)
        n = len(rows)
        return cls(
            netns=np.full(n, netns, np.int64), v6=np.full(n, v6),
            local=_packed(local_words), remote=_packed(remote_words),
            local_port=local_port, remote_port=remote_port,
            state=_hex_column(state_hex, ">u1").astype(np.int64),
            inode=np.array(inodes).astype(np.int64),
            hashes=tuple_hashes(local_port, remote_port, local_words, remote_words),
            unported=tuple_hashes(np.zeros(n, np.int64), remote_port, local_words,
                                  remote_words))

    @classmethod
    def concatenate(cls, parts: list["ProcSockets"]) -> "ProcSockets":
        if not parts:
            empty = np.zeros(0, np.int64)
            return cls(empty, empty.astype(bool), np.zeros((0, 16), np.uint8),
                       np.zeros((0, 16), np.uint8), empty, empty, empty, empty,
                       empty.astype(np.uint32), empty.astype(np.uint32))
        return cls(*(np.concatenate([getattr(part, name) for part in parts])
                     for name in cls.__dataclass_fields__))


def _packed(words: np.ndarray) -> np.ndarray:
    """The addresses' bytes in network order, [n, 16]."""
    raw = words.astype(np.uint32).view(np.uint8).reshape(len(words), -1)  # native order
    packed = np.zeros((len(words), 16), np.uint8)
    packed[:, 16 - raw.shape[1]:] = raw
    return packed


def _chunks(data: bytes, size: int = 16) -> Iterator[bytes]:
    return (data[i:i + size] for i in range(0, len(data), size))


def address_text(packed, v6: bool) -> str:
    """16 bytes (IPv4 in the last 4) as text; an IPv4-mapped IPv6 address
    shows as IPv4."""
    data = bytes(packed)
    if not v6:
        return socket.inet_ntop(socket.AF_INET, data[12:])
    if data[:12] == b"\0" * 10 + b"\xff\xff":
        return socket.inet_ntop(socket.AF_INET, data[12:])
    return socket.inet_ntop(socket.AF_INET6, data)


def namespaces() -> dict[int, int]:
    """Network namespace inode -> a process in it."""
    found: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                found.setdefault(os.stat(f"/proc/{entry}/ns/net").st_ino, int(entry))
            except OSError:
                continue
    return found


def proc_sockets() -> ProcSockets:
    """Every TCP socket of every namespace a process is in."""
    parts = []
    for netns, pid in namespaces().items():
        for name, v6 in (("tcp", False), ("tcp6", True)):
            try:
                with open(f"/proc/{pid}/net/{name}", "rb") as listing:
                    text = listing.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            part = ProcSockets.parse(text, netns, v6)
            if part is not None:
                parts.append(part)
    return ProcSockets.concatenate(parts)


def owners(wanted: set[int], pids: list[int] | None = None) -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, command) of the process holding it (the
    lowest pid when several share it), for the inodes `wanted`; stops once
    all are found."""
    found: dict[int, tuple[int, str]] = {}
    if pids is None:
        pids = sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
    left = set(wanted)
    for pid in pids:
        if not left:
            break
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            with open(f"/proc/{pid}/comm") as comm_file:
                comm = comm_file.read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in left:
                    found[inode] = (pid, comm)
                    left.discard(inode)
    return found


# ---- matching ---------------------------------------------------------------
@dataclass
class Listed:
    state: str
    age_seconds: float
    lifetime_seconds: float | None  # None: its birth predates serve (or was not seen)
    family: str
    local: str
    local_port: int | None
    remote: str
    remote_port: int | None
    netns: int | None
    pid: int | None
    command: str
    ambiguous: bool = False  # another namespace has a socket with the same 4-tuple


def match(entries: np.ndarray, found: ProcSockets) -> tuple[np.ndarray, np.ndarray]:
    """For each table entry, the index of its /proc socket (same state and
    4-tuple hash; -1: none) and whether several sockets had that key (the
    same 4-tuple in several namespaces). A socket hashed in SYN-SENT or
    LISTEN may have had no local port yet (connect() and listen() pick it
    after the transition): those match on the hash with local port 0 too.
    Entries with the same key take that key's sockets in turn."""
    keys = (found.state.astype(np.uint64) << np.uint64(32)) | found.hashes.astype(np.uint64)
    unported = np.flatnonzero(np.isin(found.state, (LISTEN, SYN_SENT))
                              & (found.unported != found.hashes))
    keys = np.concatenate([keys, (found.state[unported].astype(np.uint64) << np.uint64(32))
                           | found.unported[unported].astype(np.uint64)])
    index = np.concatenate([np.arange(len(found.state)), unported])
    order = np.argsort(keys, kind="stable")
    keys, index = keys[order], index[order]
    wanted = ((entries["state"].astype(np.uint64) << np.uint64(32))
              | entries["tuple_hash"].astype(np.uint64))
    first = np.searchsorted(keys, wanted, "left")
    count = np.searchsorted(keys, wanted, "right") - first
    by_key = np.argsort(wanted, kind="stable")
    in_order = wanted[by_key]
    rank = np.empty(len(wanted), np.int64)
    rank[by_key] = np.arange(len(wanted)) - np.searchsorted(in_order, in_order, "left")
    pick = first + np.minimum(rank, np.maximum(count - 1, 0))
    matched = np.where(count > 0, index[np.minimum(pick, max(len(index) - 1, 0))]
                       if len(index) else -1, -1)
    return matched, count > 1


def listed_of(entries: np.ndarray, now_ns: int, found: ProcSockets, matched: np.ndarray,
              ambiguous: np.ndarray, owner_of: dict[int, tuple[int, str]]) -> list[Listed]:
    """The rows to show, computed by column (a listing can hold 100,000)."""
    names = [name_of(code) for code in range(NSTATES)]
    ages = (np.maximum(now_ns - entries["entered_ns"].astype(np.int64), 0) / 1e9).tolist()
    born = entries["born_ns"].astype(np.int64)
    lifetimes = (np.maximum(now_ns - born, 0) / 1e9).tolist()
    at = np.maximum(matched, 0) if len(found.state) else np.zeros(0, np.int64)
    if len(found.state):
        gathered = zip(found.v6[at].tolist(), found.inode[at].tolist(),
                       found.local_port[at].tolist(), found.remote_port[at].tolist(),
                       found.netns[at].tolist(), _chunks(found.local[at].tobytes()),
                       _chunks(found.remote[at].tobytes()))
    else:
        gathered = iter(())
    columns = zip(entries["state"].tolist(), ages, lifetimes, born.tolist(),
                  (entries["family"] & 1).tolist(), (matched >= 0).tolist(),
                  ambiguous.tolist())
    texts: dict[tuple[bytes, bool], str] = {}  # addresses repeat: each made once

    def text(packed: bytes, v6: bool) -> str:
        key = (packed, v6)
        if key not in texts:
            texts[key] = address_text(packed, v6)
        return texts[key]

    listed = []
    for state, age, lifetime, born_ns, family, known, several in columns:
        socket_of = next(gathered, None)
        common = dict(state=names[state], age_seconds=age,
                      lifetime_seconds=lifetime if born_ns else None,
                      family="ipv6" if family else "ipv4")
        if not known:
            listed.append(Listed(**common, local="?", local_port=None, remote="?",
                                 remote_port=None, netns=None, pid=None, command=""))
            continue
        v6, inode, local_port, remote_port, netns, local, remote = socket_of
        pid, command = owner_of.get(inode, (None, ""))
        listed.append(Listed(**common, local=text(local, v6), local_port=local_port,
                             remote=text(remote, v6), remote_port=remote_port,
                             netns=netns, pid=pid, command=command, ambiguous=several))
    return listed


# ---- the command ------------------------------------------------------------
def add_sockets_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "sockets", help="list the sockets now in a state, oldest first, from a running serve",
        description="List the TCP sockets now in a state, oldest first, from the socket "
                    "table of a running `tcpstate serve`: owner PID and command, addresses, "
                    "network namespace, age in state, lifetime. Needs root (or "
                    "CAP_SYS_PTRACE to read other processes' /proc/PID/fd).")
    parser.add_argument("--state", type=_state, default=None, metavar="STATE",
                        help=f"only sockets in STATE ({', '.join(TABLE_STATES)})")
    parser.add_argument("--older-than", dest="older_than", type=_duration, default=0.0,
                        metavar="DURATION", help="only sockets in their state longer than "
                                                 "DURATION (90s, 10m, 1h, 1h30m)")
    parser.add_argument("--port", type=_port, default=None, metavar="PORT",
                        help="only sockets with PORT at either end")
    parser.add_argument("--pid", type=_pid, default=None, metavar="PID",
                        help="only sockets held by process PID")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--query-socket", dest="query_socket", default=DEFAULT_QUERY_SOCKET,
                        metavar="PATH",
                        help=f"serve's query socket (default {DEFAULT_QUERY_SOCKET})")
    return parser


def _state(text: str) -> str:
    if text not in TABLE_STATES:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a state a socket is listed in; one of {', '.join(TABLE_STATES)}")
    return text


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number 1-65535")
    return int(text)


def _pid(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a process id")
    return int(text)


def list_sockets(args: argparse.Namespace) -> list[Listed]:
    description, fd = fetch_table(args.query_socket)
    try:
        table = MappedTable(fd, description["rows"], description["ways"])
    finally:
        os.close(fd)  # the mapping keeps the table
    try:
        live = table.live_entries()
        now_ns = time.monotonic_ns()
    finally:
        table.close()
    if args.state:
        live = live[live["state"] == BY_NAME[args.state].kernel_code]
    if args.older_than:
        live = live[(now_ns - live["entered_ns"].astype(np.int64)) > args.older_than * 1e9]
    live = live[np.argsort(live["entered_ns"], kind="stable")]  # oldest first
    if not len(live):
        return []
    found = proc_sockets()
    matched, ambiguous = match(live, found)
    keep = np.ones(len(live), bool)
    if args.port and len(found.state):
        at = np.maximum(matched, 0)
        keep &= (matched >= 0) & ((found.local_port[at] == args.port)
                                  | (found.remote_port[at] == args.port))
    elif args.port:
        keep[:] = False
    if args.pid:
        keep &= matched >= 0
    live, matched, ambiguous = live[keep], matched[keep], ambiguous[keep]
    inodes = found.inode[matched[matched >= 0]]
    owner_of = owners(set(inodes[inodes != 0].tolist()), [args.pid] if args.pid else None)
    if args.pid:
        held = np.array([int(found.inode[at]) in owner_of for at in matched.tolist()], bool)
        live, matched, ambiguous = live[held], matched[held], ambiguous[held]
    return listed_of(live, now_ns, found, matched, ambiguous, owner_of)


def _endpoint(address: str, port: int | None) -> str:
    if port is None:
        return "?"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


def sockets_command(args: argparse.Namespace) -> int:
    listed = list_sockets(args)
    out = sys.stdout
    if args.json:
        for item in listed:
            out.write(json.dumps(asdict(item)) + "\n")
        return 0
    out.write(f"{'PID':>7} {'COMMAND':<15} {'NETNS':>10} {'STATE':<11} {'AGE':>7} "
              f"{'LIFETIME':>8} {'LOCAL':<24} REMOTE\n")
    for item in listed:
        out.write(f"{item.pid or '-':>7} {item.command[:15] or '-':<15} "
                  f"{item.netns or '?':>10} {item.state:<11} "
                  f"{format_duration(item.age_seconds):>7} "
                  f"{format_duration(item.lifetime_seconds):>8} "
                  f"{_endpoint(item.local, item.local_port):<24} "
                  f"{_endpoint(item.remote, item.remote_port)}"
                  f"{'  (ambiguous: same 4-tuple in another namespace)' if item.ambiguous else ''}\n")
    if any(item.lifetime_seconds is None for item in listed):
        out.write("# LIFETIME ?: born before serve started (or its birth was not seen)\n")
    return 0
