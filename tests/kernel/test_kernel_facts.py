"""The kernel facts the README states, each shown on the real kernel."""

from __future__ import annotations

import socket
import threading

from tracer import metrics as m, netns

from .conftest import SERVICE_PORTS
from .netlab import inside, wait_for
from .test_serve import delta, gauge, transitions_of

IPPROTO_MPTCP = 262


def listen_overflows(lab) -> int:
    """The server namespace's TcpExt ListenOverflows: SYNs a full accept queue dropped."""
    with inside(lab.server), open("/proc/thread-self/net/netstat") as netstat:
        lines = [line.split() for line in netstat if line.startswith("TcpExt:")]
    names, values = lines
    return int(values[names.index("ListenOverflows")])


def test_time_wait_is_a_hand_off_not_a_transition(exporter, lab):
    """A socket entering TIME-WAIT is handed to a mini-socket: the tracepoint
    says FIN_WAIT2 -> CLOSE; an orphan in FIN-WAIT-2 is handed over at once,
    so `ss` shows FIN-WAIT-2 while the full socket is gone; sockstat's `tw`
    counts those mini-sockets, per namespace."""
    port, n = SERVICE_PORTS[-2], 10
    before = transitions_of(exporter.scrape(), "ipv4", port)
    listener = lab.listener(socket.AF_INET, port)
    servers = []
    for _ in range(n):
        client = lab.connect(socket.AF_INET, port)
        servers.append(listener.accept()[0])
        client.close()  # orphaned; the server never closes: the client waits in FIN-WAIT-2
    assert wait_for(lambda: lab.ss_states("client", port)["fin_wait2"] == n)
    with inside(lab.client):
        assert netns.read_time_wait() == n
    assert wait_for(lambda: delta(transitions_of(exporter.scrape(), "ipv4", port), before)
                    [("fin_wait2", "close")] == n)
    counted = delta(transitions_of(exporter.scrape(), "ipv4", port), before)
    assert counted[("fin_wait1", "fin_wait2")] == n
    assert not any("time_wait" in step for step in counted)
    assert gauge(exporter.scrape(), port)["fin_wait2"] == 0  # no full socket left there
    for server in servers:
        server.close()
    listener.close()


def test_handshake_time_is_in_syn_sent_not_in_syn_recv(exporter, lab):
    """The child socket is created when the handshake's last ACK arrives:
    its SYN_RECV lasts microseconds even when the handshake takes a second."""
    port = SERVICE_PORTS[-3]
    labels = dict(family="ipv4", port=str(port))
    syn_sent = dict(old_state="syn_sent", new_state="established", **labels)
    syn_recv = dict(old_state="syn_recv", new_state="established", **labels)
    name = f"{m.STATE_DURATION}_bucket"
    start = exporter.scrape()

    def added(scrape, **labels) -> float:
        return scrape.value(name, **labels) - start.value(name, **labels)

    listener = lab.listener(socket.AF_INET, port, backlog=0)
    listener.settimeout(10)
    first = lab.connect(socket.AF_INET, port)  # fills the accept queue of one
    overflows = listen_overflows(lab)
    slow = lab.socket("client")
    slow.settimeout(10)
    worker = threading.Thread(target=slow.connect, args=((lab.address(socket.AF_INET, "server"), port),))
    worker.start()
    assert wait_for(lambda: listen_overflows(lab) > overflows)  # its SYN was dropped
    accepted = [listener.accept()[0]]  # room again: the SYN retransmitted after 1 s gets in
    worker.join(10)
    assert not worker.is_alive()
    accepted.append(listener.accept()[0])
    assert wait_for(lambda: exporter.scrape().value(f"{m.STATE_DURATION}_count", **syn_recv)
                    - start.value(f"{m.STATE_DURATION}_count", **syn_recv) == 2)
    scrape = exporter.scrape()
    assert added(scrape, **syn_sent, le=str(2**29 / 1e9)) == 1  # only the first is < 0.54 s
    assert added(scrape, **syn_sent, le="+Inf") == 2
    assert added(scrape, **syn_recv, le=str(2**20 / 1e9)) == 2  # both <= 1 ms
    for sock in (first, slow, *accepted, listener):
        sock.close()


def test_mptcp_state_changes_are_not_counted_as_tcp(exporter, lab):
    """The tracepoint reports MPTCP sockets too (protocol IPPROTO_MPTCP):
    they are skipped and counted apart; their TCP subflows count as TCP."""
    port, n = SERVICE_PORTS[-4], 5
    before = transitions_of(exporter.scrape(), "ipv4", port)
    skipped = exporter.scrape().value(m.OTHER_PROTOCOL)
    with inside(lab.server):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
    listener.bind((lab.address(socket.AF_INET, "server"), port))
    listener.listen()
    for _ in range(n):
        with inside(lab.client):
            client = socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP)
        client.connect((lab.address(socket.AF_INET, "server"), port))
        server, _ = listener.accept()
        client.close()
        server.recv(1)
        server.close()
    listener.close()
    assert wait_for(lambda: exporter.scrape().value(m.OTHER_PROTOCOL) - skipped >= 4 * n)
    counted = delta(transitions_of(exporter.scrape(), "ipv4", port), before)
    # one TCP subflow per connection: the MPTCP socket's own SYN_SENT is not here
    assert counted[("close", "syn_sent")] == n
    assert counted[("listen", "syn_recv")] == n
