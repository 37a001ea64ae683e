"""Reads per-namespace socket facts from every network namespace of the host.

The tracepoint sees sockets of every namespace, so the live-socket gauge must
too: the kernel's TIME-WAIT count (/proc/net/sockstat `tw`, which also holds
orphaned FIN-WAIT-2 mini-sockets) exists per namespace, and the sockets that
existed before start must be counted in each.

A namespace some process is in is read through that process's /proc/PID/net,
which needs no privilege (the files are 0444 whoever owns the process).
Each namespace is read once: /proc/PID/net/sockstat has one inode number per
namespace, shared by all its processes. A namespace no process is in (a name
of `ip netns`, /run/netns/NAME) can only be read from inside: a worker thread
enters it with setns(2), which needs CAP_SYS_ADMIN (network namespaces are
per thread) and reads /proc/thread-self/net/*. Refused, it is left out, with
one warning.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import logging
import os
import threading
from collections import Counter
from typing import Callable, TypeVar

from .errors import EXIT_PRIVILEGES, PrerequisiteError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
OWN_NET = "/proc/thread-self/net"
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


def _walk(paths: list[str], visit: Callable[[], None],
          refused: Callable[[str, int], None]) -> None:
    """In a thread of its own, enter each namespace file of `paths` with
    setns and call `visit` there; `refused(path, errno)` decides what an
    EPERM means (raise, or warn); other failures (a path that vanished or is
    no namespace, a stale /run/netns file) are skipped. An error is raised
    in the caller's thread."""
    failure: list[BaseException] = []

    def walk() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            for path in paths:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    _setns(fd)
                except OSError as exc:
                    if exc.errno == errno.EPERM:
                        refused(path, exc.errno)
                    continue
                finally:
                    os.close(fd)
                visit()
        except BaseException as exc:
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


def in_every_namespace(read: Callable[[], _T]) -> list[_T]:
    """Call `read` once inside each network namespace; namespaces that
    vanish while we walk (or paths that are no namespace) are skipped; one
    we may not enter raises NamespaceAccessError."""
    results: list[_T] = []

    def refused(path: str, err: int) -> None:
        raise NamespaceAccessError(path, err)

    _walk(namespace_paths(), lambda: results.append(read()), refused)
    return results


def namespace_id(net_dir: str = OWN_NET) -> int:
    """The namespace of a /proc/.../net directory, as the inode number of
    its sockstat: one per namespace, readable without privilege."""
    return os.stat(f"{net_dir}/sockstat").st_ino


_refusal_warned = threading.Event()  # one warning a process: pods come and go


def _named_namespaces(read: Callable[[str], _T], seen: set[int]) -> dict[int, _T]:
    """`read` inside each /run/netns namespace not in `seen` (no process
    holds it), entered with setns; a refused one is warned about once."""
    results: dict[int, _T] = {}

    def visit() -> None:
        inode = namespace_id()
        if inode not in seen:
            seen.add(inode)
            results[inode] = read(OWN_NET)

    def refused(path: str, err: int) -> None:
        if not _refusal_warned.is_set():
            _refusal_warned.set()
            log.warning("%s: the sockets of `ip netns` namespaces that no process is in "
                        "are left out (warned once)", NamespaceAccessError(path, err))

    _walk(glob.glob("/run/netns/*"), visit, refused)
    return results


def each_namespace(read: Callable[[str], _T]) -> dict[int, _T]:
    """`read(net_dir)` once per network namespace, by namespace_id: through
    /proc/PID/net of a process in it (no privilege needed), else, for
    `ip netns` names no process holds, inside it (CAP_SYS_ADMIN; refused:
    left out, warned once)."""
    results: dict[int, _T] = {}
    for net_dir in glob.glob("/proc/[0-9]*/net"):
        try:
            inode = namespace_id(net_dir)
            if inode not in results:
                results[inode] = read(net_dir)
        except (FileNotFoundError, ProcessLookupError):
            continue  # the process exited: another of its namespace may follow
    results.update(_named_namespaces(read, set(results)))
    return results


def read_time_wait(net_dir: str = OWN_NET) -> int:
    """A namespace's TIME-WAIT mini-sockets (both families)."""
    with open(f"{net_dir}/sockstat") as sockstat:
        for line in sockstat:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("tw") + 1])
    return 0


def time_wait_total() -> int:
    return sum(each_namespace(read_time_wait).values())


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


def read_full_sockets(net_dir: str = OWN_NET) -> dict[int, Counter[tuple[int, int, int]]]:
    """A namespace's full sockets by family index (0 ipv4, 1 ipv6)."""
    found = {}
    for family, name in ((0, "tcp"), (1, "tcp6")):
        try:
            with open(f"{net_dir}/{name}") as table:
                found[family] = parse_proc_net_tcp(table.read())
        except FileNotFoundError:  # no IPv6 in this kernel
            found[family] = Counter()
    return found


def full_sockets_everywhere() -> dict[int, Counter[tuple[int, int, int]]]:
    total: dict[int, Counter[tuple[int, int, int]]] = {0: Counter(), 1: Counter()}
    for per_family in each_namespace(read_full_sockets).values():
        for family, counts in per_family.items():
            total[family].update(counts)
    return total
