"""Reads per-namespace socket facts from every network namespace of the host.

The tracepoint sees sockets of every namespace, so the live-socket gauge must
too: the kernel's TIME-WAIT count (/proc/net/sockstat `tw`, which also holds
orphaned FIN-WAIT-2 mini-sockets) exists per namespace, and the sockets that
existed before start must be counted in each. A worker thread enters each
namespace with setns(2) (network namespaces are per thread) and reads
/proc/thread-self/net/*, which shows the thread's own namespace.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import threading
from collections import Counter
from typing import Callable, TypeVar

from .errors import EXIT_PRIVILEGES, PrerequisiteError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_T = TypeVar("_T")

# /proc/net/tcp prints full sockets with these extra columns after the
# socket pointer; TIME-WAIT and request mini-sockets stop at the pointer.
_FULL_SOCKET_MIN_FIELDS = 17
_TIME_WAIT_CODE = 6


class NamespaceAccessError(PrerequisiteError):
    """A namespace exists but we may not enter it (no CAP_SYS_ADMIN)."""

    def __init__(self, path: str, err: int):
        super().__init__(f"cannot enter the network namespace {path}: {os.strerror(err)} "
                         "(entering other namespaces needs CAP_SYS_ADMIN)", EXIT_PRIVILEGES)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def namespace_paths() -> list[str]:
    """One openable path per distinct network namespace (processes' and
    the named ones of `ip netns`, which may have no process)."""
    seen: dict[str, str] = {}
    candidates = glob.glob("/run/netns/*") + glob.glob("/proc/[0-9]*/ns/net")
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue  # the process exited, or the name was removed
        seen.setdefault(f"{st.st_dev}:{st.st_ino}", path)
    return list(seen.values())


def in_every_namespace(read: Callable[[], _T]) -> list[_T]:
    """Call `read` once inside each network namespace; namespaces that
    vanish while we walk (or paths that are no namespace) are skipped; one
    we may not enter raises NamespaceAccessError."""
    results: list[_T] = []
    failure: list[BaseException] = []

    def walk() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            for path in namespace_paths():
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    _setns(fd)
                except OSError as exc:
                    if exc.errno == errno.EPERM:
                        raise NamespaceAccessError(path, exc.errno) from None
                    continue  # not a namespace (a stale /run/netns file, say)
                finally:
                    os.close(fd)
                results.append(read())
        except BaseException as exc:  # reported in the caller's thread
            failure.append(exc)
        finally:
            try:
                _setns(home)  # tidy only: the thread ends here, and with it its namespace
            except OSError:
                pass
            os.close(home)

    worker = threading.Thread(target=walk, name="tcpstate-netns", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return results


def read_time_wait() -> int:
    """This namespace's TIME-WAIT mini-sockets (both families)."""
    with open("/proc/thread-self/net/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def time_wait_total() -> int:
    return sum(in_every_namespace(read_time_wait))


def parse_proc_net_tcp(text: str) -> Counter[tuple[int, int, int]]:
    """Full sockets of one /proc/net/tcp{,6} text, counted by
    (kernel state, local port, remote port)."""
    counts: Counter[tuple[int, int, int]] = Counter()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < _FULL_SOCKET_MIN_FIELDS:
            continue
        state = int(fields[3], 16)
        if state == _TIME_WAIT_CODE:
            continue
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        counts[(state, local_port, remote_port)] += 1
    return counts


def read_full_sockets() -> dict[int, Counter[tuple[int, int, int]]]:
    """This namespace's full sockets by family index (0 ipv4, 1 ipv6)."""
    found = {}
    for family, name in ((0, "tcp"), (1, "tcp6")):
        try:
            with open(f"/proc/thread-self/net/{name}") as table:
                found[family] = parse_proc_net_tcp(table.read())
        except FileNotFoundError:  # no IPv6 in this kernel
            found[family] = Counter()
    return found


def full_sockets_everywhere() -> dict[int, Counter[tuple[int, int, int]]]:
    total: dict[int, Counter[tuple[int, int, int]]] = {0: Counter(), 1: Counter()}
    for per_family in in_every_namespace(read_full_sockets):
        for family, counts in per_family.items():
            total[family].update(counts)
    return total
