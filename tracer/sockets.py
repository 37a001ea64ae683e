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
import ipaddress
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
from .states import BY_NAME, TABLE_STATES, code_of, name_of

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
@dataclass
class ProcSocket:
    netns: int
    family: str
    local: str
    local_port: int
    remote: str
    remote_port: int
    state: int
    inode: int


def _address(word_hex: str) -> tuple[list[int], str]:
    """/proc's address field -> its 32-bit words and its text."""
    words = [int(word_hex[i:i + 8], 16) for i in range(0, len(word_hex), 8)]
    packed = b"".join(w.to_bytes(4, sys.byteorder) for w in words)
    address = ipaddress.ip_address(packed)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return words, str(address.ipv4_mapped)
    return words, str(address)


def read_proc_net(path: str, netns: int, family: str) -> Iterator[tuple[ProcSocket, list, list]]:
    try:
        with open(path) as listing:
            next(listing, None)
            for line in listing:
                fields = line.split()
                local, remote = fields[1].split(":"), fields[2].split(":")
                local_words, local_text = _address(local[0])
                remote_words, remote_text = _address(remote[0])
                yield (ProcSocket(netns, family, local_text, int(local[1], 16), remote_text,
                                  int(remote[1], 16), int(fields[3], 16), int(fields[9])),
                       local_words, remote_words)
    except (FileNotFoundError, ProcessLookupError):
        return


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


def proc_sockets() -> tuple[list[ProcSocket], np.ndarray, np.ndarray]:
    """Every TCP socket /proc shows, in every namespace a process is in;
    its 4-tuple hash (tuple_hash_of in bpf/tcpstate.h), and the same with
    local port 0."""
    sockets: list[ProcSocket] = []
    hashes, unported = [], []
    for netns, pid in namespaces().items():
        for name, family in (("tcp", "ipv4"), ("tcp6", "ipv6")):
            rows = list(read_proc_net(f"/proc/{pid}/net/{name}", netns, family))
            if not rows:
                continue
            found = [row[0] for row in rows]
            remote_ports = np.array([s.remote_port for s in found])
            local_words = np.array([row[1] for row in rows])
            remote_words = np.array([row[2] for row in rows])
            hashes.append(tuple_hashes(np.array([s.local_port for s in found]), remote_ports,
                                       local_words, remote_words))
            unported.append(tuple_hashes(np.zeros(len(found), np.int64), remote_ports,
                                         local_words, remote_words))
            sockets += found
    if not sockets:
        return sockets, np.zeros(0, np.uint32), np.zeros(0, np.uint32)
    return sockets, np.concatenate(hashes), np.concatenate(unported)


def owners(pids: list[int] | None = None) -> dict[int, tuple[int, str]]:
    """Socket inode -> (pid, command) of the process holding it (the
    lowest pid when several share it)."""
    found: dict[int, tuple[int, str]] = {}
    if pids is None:
        pids = sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
    for pid in pids:
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
                found.setdefault(int(target[8:-1]), (pid, comm))
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


def match(entries: np.ndarray, now_ns: int, sockets: list[ProcSocket], hashes: np.ndarray,
          unported: np.ndarray, owner_of: dict[int, tuple[int, str]]) -> list[Listed]:
    """Each table entry with the /proc socket of its state and 4-tuple
    hash. A socket hashed in SYN-SENT or LISTEN may have had no local port
    yet (connect() and listen() pick it after the transition): those are
    matched on the hash with local port 0 too."""
    candidates: dict[tuple[int, int], list[int]] = {}
    for index, (found, value) in enumerate(zip(sockets, hashes.tolist())):
        candidates.setdefault((found.state, value), []).append(index)
    for index, (found, value) in enumerate(zip(sockets, unported.tolist())):
        if found.state in (LISTEN, SYN_SENT) and value != hashes[index]:
            candidates.setdefault((found.state, value), []).append(index)
    taken: dict[tuple[int, int], int] = {}
    listed = []
    for entry in entries:
        state = int(entry["state"])
        key = (state, int(entry["tuple_hash"]))
        options = candidates.get(key, [])
        age = max(now_ns - int(entry["entered_ns"]), 0) / 1e9
        born = int(entry["born_ns"])
        lifetime = max(now_ns - born, 0) / 1e9 if born else None
        family = "ipv6" if entry["family"] & 1 else "ipv4"
        if not options:
            listed.append(Listed(name_of(state), age, lifetime, family, "?", None, "?", None,
                                 None, None, ""))
            continue
        nth = taken.get(key, 0)
        taken[key] = nth + 1
        found = sockets[options[min(nth, len(options) - 1)]]
        pid, command = owner_of.get(found.inode, (None, "")) if found.inode else (None, "")
        listed.append(Listed(name_of(state), age, lifetime, family, found.local,
                             found.local_port, found.remote, found.remote_port, found.netns,
                             pid, command, ambiguous=len(options) > 1))
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
    sockets, hashes, unported = proc_sockets()
    listed = match(live, now_ns, sockets, hashes, unported,
                   owners([args.pid] if args.pid else None))
    if args.pid:
        listed = [item for item in listed if item.pid == args.pid]
    if args.port:
        listed = [item for item in listed if args.port in (item.local_port, item.remote_port)]
    return listed


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
