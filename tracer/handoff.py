"""Handing the loaded program from the short-lived process that compiled it
(tracer/loader.py, which needs bcc and its LLVM: ~150 MiB) to the serving
process, which then never maps them: the program's, its attachment's and
its maps' descriptors over a Unix socket (SCM_RIGHTS), with a JSON
description of what they are.

The serving side starts the loader, sends it the request, and gets back
either the descriptors or the one-line error and exit code the loader met.
The loader dies with its parent (PR_SET_PDEATHSIG), so a server killed
during the compile leaves nothing attached; it leaves with os._exit(), so
bcc's atexit clean-up never disables the perf event the server now shares.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import subprocess
import sys
from typing import Sequence

from .errors import EXIT_BPF, EXIT_INTERNAL, TcpstateError

MAX_FDS = 32
MAX_MESSAGE = 1 << 20
PR_SET_PDEATHSIG = 1


def send(sock: socket.socket, message: dict, fds: Sequence[int] = ()) -> None:
    data = json.dumps(message).encode()
    if len(data) > MAX_MESSAGE or len(fds) > MAX_FDS:
        raise TcpstateError("the loader's message is too large to hand over", EXIT_INTERNAL)
    socket.send_fds(sock, [data], list(fds))


def receive(sock: socket.socket) -> tuple[dict, list[int]]:
    """One message and its descriptors; ({}, []) when the peer closed
    without sending (it died)."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if flags & socket.MSG_CTRUNC:
        for fd in fds:
            os.close(fd)
        raise TcpstateError("the loader's descriptors did not all arrive", EXIT_INTERNAL)
    return (json.loads(data) if data else {}), fds


def die_with_parent(parent: int) -> None:
    """In the loader: be killed when the process that started it dies, and
    leave at once if that already happened."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os._exit(1)


def load_in_child(request: dict) -> tuple[dict, list[int]]:
    """Run the loader with `request`; return its description and
    descriptors, or raise its error with its exit code."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "tracer.loader", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        try:
            send(ours, request)
            message, fds = receive(ours)
        finally:
            code = child.wait()
    # what the compile cost: the pod's memory limit must cover it
    message["loader_peak_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if "error" in message:
        for fd in fds:
            os.close(fd)
        raise TcpstateError(message["error"], message.get("exit_code", EXIT_BPF))
    if not message:
        raise TcpstateError(f"the loader exited {code} without handing the program over",
                            EXIT_BPF)
    return message, fds
