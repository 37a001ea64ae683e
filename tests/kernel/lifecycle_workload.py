"""Connections for the dashboard tests that stay open or take long: the
CLOSE_WAIT leak a dashboard must show, a handshake slowed by a lost SYN,
and a varying load for the committed preview. Everything happens inside a
netlab.Lab, on the port the caller owns."""

from __future__ import annotations

import errno
import math
import select
import socket
import time

from .netlab import Lab, wait_for
from .workload import client_closes_first, refused, reset


def hold_close_wait(lab: Lab, listener: socket.socket, family: int, port: int,
                    n: int) -> list[socket.socket]:
    """n connections whose client closes while the server keeps its end
    open: the server sockets stay in CLOSE_WAIT until the caller closes them."""
    held = []
    for _ in range(n):
        client = lab.connect(family, port)
        server, _ = listener.accept()
        client.close()
        held.append(server)
    assert wait_for(lambda: lab.ss_states("server", port)["close_wait"] >= n)
    return held


def slow_handshake(lab: Lab, family: int, port: int) -> list[socket.socket]:
    """One connect whose first SYN is dropped because the listener's accept
    queue is full (backlog 0 holds one connection): the kernel retransmits
    the SYN after the initial RTO (1 s), by when the queue has room, so that
    connect spends ~1 s in SYN-SENT. Also makes the connection that filled
    the queue. Returns the four sockets, open."""
    with lab.listener(family, port, backlog=0) as listener:
        first = lab.connect(family, port)
        client = lab.socket("client", family)
        client.setblocking(False)
        code = client.connect_ex((lab.address(family, "server"), port))
        assert code == errno.EINPROGRESS, errno.errorcode.get(code, code)
        time.sleep(0.3)  # well before the retransmission
        first_accepted, _ = listener.accept()
        _, writable, _ = select.select([], [client], [], 5)
        assert writable and client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        client.setblocking(True)
        server, _ = listener.accept()
    return [first, first_accepted, client, server]


def churn(lab: Lab, port: int, seconds: float) -> list[socket.socket]:
    """A load that varies over `seconds`, for the dashboard preview: waves of
    successful connections, refusals, resets, an occasional connect slowed
    by a lost SYN, and a slow CLOSE_WAIT leak. Returns the sockets it holds."""
    held: list[socket.socket] = []
    deadline = time.monotonic() + seconds
    tick = 0
    while time.monotonic() < deadline:
        wave = 1 + math.sin(tick / 8)
        client_closes_first(lab, socket.AF_INET, port, 4 + int(12 * wave))
        refused(lab, socket.AF_INET, port, 1 + int(2 * wave) * (tick % 3 == 0))
        if tick % 5 == 0:
            reset(lab, socket.AF_INET6, port, 2)
        if tick % 12 == 6:
            held += slow_handshake(lab, socket.AF_INET, port)
        if tick % 4 == 0:
            with lab.listener(socket.AF_INET, port) as listener:
                held += hold_close_wait(lab, listener, socket.AF_INET, port, 1)
        tick += 1
        time.sleep(0.3)
    return held
