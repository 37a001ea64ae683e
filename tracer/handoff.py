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
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Sequence

from .errors import EXIT_BPF, EXIT_INTERNAL, TcpstateError

if TYPE_CHECKING:
    from .program import Attachment

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


class Loading:
    """A loader at work. Started early (tracer/cli.py starts it before the
    server imports its own modules, so the two overlap on a multi-core
    host); finish() waits for its descriptors."""

    def __init__(self, request: dict):
        self.started = time.monotonic()
        self._ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._child = subprocess.Popen(
                [sys.executable, "-m", "tracer.loader", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            self._ours.close()
            raise
        finally:
            theirs.close()
        send(self._ours, request)

    def finish(self) -> tuple[dict, list[int]]:
        """The loader's description and descriptors, or its error raised
        with its exit code."""
        with self._ours:
            try:
                message, fds = receive(self._ours)
            finally:
                code = self._child.wait()
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

    def cancel(self) -> None:
        """The server gives up (its port is taken): nothing stays attached."""
        self._child.kill()
        self._child.wait()
        self._ours.close()


def loader_request(service_ports: Sequence[int], socket_table_size: int,
                   attachment: "Attachment", seed_live_sockets: bool = True) -> dict:
    """What the loader is asked to build (tracer/loader.py reads it)."""
    return {
        "service_ports": list(service_ports),
        "socket_table_size": socket_table_size,
        "attach": attachment.kind,
        "offsets": attachment.offsets,
        "seed": seed_live_sockets,
        "log_level": logging.getLogger().getEffectiveLevel(),
    }
