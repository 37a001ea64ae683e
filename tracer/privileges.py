"""`--run-as USER`: once the BPF program is attached, the daemon becomes an
unprivileged USER with no capabilities left in any set, and can never gain
any back (no_new_privs).

Why this works: loading and attaching need CAP_BPF and CAP_PERFMON (or
root), and the loader child does them before the drop. After it the server
makes no bpf(2) call: it reads the maps through the memory it mapped before
the drop, and the program's statistics from /proc/self/fdinfo; the program
stays attached as long as the process holds its descriptors. So it works
on every kernel serve runs on.

What is lost: entering a network namespace (setns) needs CAP_SYS_ADMIN.
Namespaces some process is in are read through /proc/PID/net, which needs
none; only `ip netns` namespaces no process is in are then left out of the
TIME-WAIT gauge (tracer/netns.py, one warning).
"""

from __future__ import annotations

import ctypes
import os
import pwd
import threading
import time

from .errors import EXIT_PRIVILEGES, TcpstateError, UsageError

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def lookup_user(name: str) -> pwd.struct_passwd:
    """The account to run as, by name or number; never root."""
    try:
        user = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except (KeyError, ValueError, OverflowError):
        raise UsageError(f"--run-as: no user {name!r} on this host") from None
    if user.pw_uid == 0:
        raise UsageError(f"--run-as: {name!r} is root: name an unprivileged user")
    return user


def _prctl(option: int, arg: int, what: str) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        raise _failed(what, ctypes.get_errno())


def _failed(what: str, err: int) -> TcpstateError:
    return TcpstateError(f"--run-as: cannot {what}: {os.strerror(err)}", EXIT_PRIVILEGES)


def status() -> dict[str, str]:
    """This process's identity and capability lines of /proc/self/status."""
    found = {}
    with open("/proc/self/status") as lines:
        for line in lines:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups", "NoNewPrivs", *CAP_SETS):
                found[key] = value.strip()
    return found


def _wait_for_one_thread(timeout: float = 2.0) -> None:
    """A joined thread may still be leaving the kernel for a moment."""
    deadline = time.monotonic() + timeout
    while True:
        tasks = len(os.listdir("/proc/self/task"))
        if threading.active_count() == 1 and tasks == 1:
            return
        if time.monotonic() > deadline:
            raise TcpstateError(f"--run-as: {tasks} threads running, must be one")
        time.sleep(0.01)


def drop_to(user: pwd.struct_passwd) -> None:
    """Become `user` with every capability set empty. Must run before any
    other thread starts: capabilities and prctl settings are per thread."""
    _wait_for_one_thread()
    with open("/proc/sys/kernel/cap_last_cap") as last:
        last_cap = int(last.read())
    for cap in range(last_cap + 1):  # needs CAP_SETPCAP: before setuid
        _prctl(PR_CAPBSET_DROP, cap, "drop the capability bounding set")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, "clear the ambient capabilities")
    try:
        os.setgroups([])
        os.setresgid(user.pw_gid, user.pw_gid, user.pw_gid)
        os.setresuid(user.pw_uid, user.pw_uid, user.pw_uid)
    except OSError as exc:
        raise _failed(f"become {user.pw_name}", exc.errno) from None
    # setuid away from 0 empties the permitted and effective sets, not the
    # inheritable one: empty all three.
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _failed("clear the capability sets", ctypes.get_errno())
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    # The setuid also left the process non-dumpable: other processes of
    # USER cannot ptrace it to borrow its BPF descriptors, and it can still
    # read its own /proc/self/fdinfo (the program's run statistics).
    now = status()
    held = [name for name in CAP_SETS if int(now.get(name, "0"), 16)]
    if held or set(now["Uid"].split()) != {str(user.pw_uid)}:
        raise TcpstateError(f"--run-as: privileges still held after the drop: {now}",
                            EXIT_PRIVILEGES)
