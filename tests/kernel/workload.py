"""Connection scenarios across a Lab, each with the transitions it must cause.

Each scenario makes `n` connections on the server's `port` and returns the
exact transitions, counted over both ends, that the kernel reports for them
(Counter of (old_state, new_state)). Every socket involved has `port` as its
local or remote port, so the exporter labels all of them port=<port>.
"""

from __future__ import annotations

import socket
import struct
import time
from collections import Counter

from .netlab import Lab, wait_for

Transitions = Counter  # Counter[(old_state, new_state)]

CONNECT = (("close", "syn_sent"), ("syn_sent", "established"))
ACCEPT = (("listen", "syn_recv"), ("syn_recv", "established"))
ACTIVE_CLOSE = (("established", "fin_wait1"), ("fin_wait1", "fin_wait2"), ("fin_wait2", "close"))
PASSIVE_CLOSE = (("established", "close_wait"), ("close_wait", "last_ack"), ("last_ack", "close"))
LISTENER = (("close", "listen"), ("listen", "close"))


def _times(n: int, *steps: tuple[tuple[str, str], ...]) -> Transitions:
    expected: Transitions = Counter()
    for group in steps:
        for step in group:
            expected[step] += n
    return expected


def _rst_on_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def client_closes_first(lab: Lab, family: int, port: int, n: int) -> Transitions:
    with lab.listener(family, port) as listener:
        for _ in range(n):
            client = lab.connect(family, port)
            server, _ = listener.accept()
            client.close()
            assert server.recv(1) == b""  # the client's FIN arrived
            server.close()
    return _times(n, CONNECT, ACCEPT, ACTIVE_CLOSE, PASSIVE_CLOSE) + _times(1, LISTENER)


def server_closes_first(lab: Lab, family: int, port: int, n: int) -> Transitions:
    with lab.listener(family, port) as listener:
        for _ in range(n):
            client = lab.connect(family, port)
            server, _ = listener.accept()
            server.close()
            assert client.recv(1) == b""
            client.close()
    return _times(n, CONNECT, ACCEPT, ACTIVE_CLOSE, PASSIVE_CLOSE) + _times(1, LISTENER)


def reset(lab: Lab, family: int, port: int, n: int) -> Transitions:
    """The client aborts with RST (SO_LINGER 0): both ends go straight to CLOSE."""
    with lab.listener(family, port) as listener:
        for _ in range(n):
            client = lab.connect(family, port)
            server, _ = listener.accept()
            _rst_on_close(client)
            client.close()
            try:
                server.recv(1)
            except ConnectionResetError:
                pass
            else:
                raise AssertionError("the server end did not see the reset")
            server.close()
    return _times(n, CONNECT, ACCEPT, (("established", "close"),) * 2) + _times(1, LISTENER)


def refused(lab: Lab, family: int, port: int, n: int) -> Transitions:
    for _ in range(n):
        client = lab.socket("client", family)
        try:
            client.connect((lab.address(family, "server"), port))
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("connect succeeded with no listener")
        finally:
            client.close()
    return _times(n, (("close", "syn_sent"), ("syn_sent", "close")))


def listener_cycles(lab: Lab, family: int, port: int, n: int) -> Transitions:
    for _ in range(n):
        lab.listener(family, port).close()
    return _times(n, LISTENER)


def simultaneous_close(lab: Lab, family: int, port: int, n: int) -> Transitions:
    """Each client sends its FIN while the link is down (lost: FIN-WAIT-1);
    then its server sends its own FIN, which crosses the client's: the
    client sees a FIN that does not ack its own and goes to CLOSING. The
    server gets the client's FIN only on retransmission, in FIN-WAIT-2."""
    pairs = []
    with lab.listener(family, port) as listener:
        for _ in range(n):
            client = lab.connect(family, port)
            pairs.append((client, listener.accept()[0]))
    lab.set_link(False)
    for client, _ in pairs:
        client.shutdown(socket.SHUT_WR)
    lab.set_link(True)
    for _, server in pairs:  # well within the client's 200 ms retransmission timeout
        server.shutdown(socket.SHUT_WR)
    assert wait_for(lambda: lab.ss_states("client", port)["time_wait"] == n
                    and lab.ss_states("server", port)["time_wait"] == n, timeout=20)
    for client, server in pairs:
        client.close()
        server.close()
    return _times(n, CONNECT, ACCEPT, CROSSING, ACTIVE_CLOSE) + _times(1, LISTENER)


CROSSING = (("established", "fin_wait1"), ("fin_wait1", "closing"), ("closing", "close"))


def simultaneous_close_outcomes(n: int) -> list[Transitions]:
    """What the kernel may report for simultaneous_close on a loaded host,
    where timers decide: per connection, the intended path (client CLOSING,
    server FIN-WAIT-2); both ends CLOSING (the server's FIN crossed the
    client's retransmission); or the client's retransmitted FIN reached the
    server first (server CLOSE-WAIT, client FIN-WAIT-2). Most connections
    must take a CLOSING path, or the scenario tested nothing."""
    outcomes = []
    for both in range(n + 1):
        for passive in range(n + 1 - both):
            intended = n - both - passive
            if intended + both < n / 2:
                continue
            outcomes.append(_times(n, CONNECT, ACCEPT) + _times(1, LISTENER)
                            + _times(intended, CROSSING, ACTIVE_CLOSE)
                            + _times(both, CROSSING, CROSSING)
                            + _times(passive, ACTIVE_CLOSE, PASSIVE_CLOSE))
    return outcomes


SCENARIOS = {
    "client_closes_first": client_closes_first,
    "server_closes_first": server_closes_first,
    "reset": reset,
    "refused": refused,
    "listener_cycles": listener_cycles,
    "simultaneous_close": simultaneous_close,
}
