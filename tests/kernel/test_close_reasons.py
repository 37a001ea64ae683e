"""Why sockets close: one test per row of the close reasons table
(tracer/reasons.py, README), both families, with real packets between a
client namespace and a router namespace (netlab.RoutedLab) whose
`unreachable`, `prohibit` and `blackhole` routes answer for the networks
behind it. Each test counts exactly the closes of its own service port in
`tcpstate_closes_total`: nothing else on that port may move.
"""

from __future__ import annotations

import errno
import socket
import struct
import time
from collections import Counter

import pytest

from tracer import metrics as m
from tracer.reasons import REASONS, possible_reasons
from tracer.states import name_of

from .conftest import SERVICE_PORTS
from .exporter import Scrape
from .netlab import RoutedLab, wait_for
from .test_serve import delta, pairs_of
from .test_trace import Trace

FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
# this file's service ports: one per test
PORTS = dict(zip(("normal", "refused", "timeout", "unreachable", "resets", "cancelled",
                  "no_local_port", "trace", "fin_wait2_reset"), SERVICE_PORTS[8:17]))
LINGER_ZERO = struct.pack("ii", 1, 0)


def closes_of(scrape: Scrape, family: str, port: int) -> Counter:
    return pairs_of(scrape, m.CLOSES, family, port, ("old_state", "reason"))


@pytest.fixture
def routed():
    with RoutedLab() as created:
        yield created


def counts_exactly(exporter, family: str, port: int, before: Scrape, expected: Counter,
                   timeout: float = 5.0) -> None:
    def counted() -> Counter:
        return delta(closes_of(exporter.scrape(), family, port),
                     closes_of(before, family, port))

    wait_for(lambda: counted() == expected, timeout=timeout)
    assert counted() == expected


def connect_error(lab: RoutedLab, family: int, address: str, port: int) -> int:
    """The errno of a blocking connect from the client namespace. Blocking
    for real: with a Python timeout the connect is non-blocking, and the
    router's first ICMP error, which arrives while connect() still holds
    the socket, is left as a soft error that the caller reads (SO_ERROR)
    before it closes the socket itself: counted `cancelled` (README)."""
    client = lab.socket("client", family)
    try:
        client.connect((address, port))
    except OSError as exc:
        return exc.errno
    finally:
        client.close()
    raise AssertionError(f"connect to {address} port {port} succeeded")


@pytest.mark.parametrize("family", FAMILIES)
def test_normal(exporter, routed, family):
    """The client closes first: its orphan is handed to a TIME-WAIT mini-socket
    (fin_wait2 -> close); the server's last ACK arrives (last_ack -> close);
    the listener is closed by its owner."""
    port, af = PORTS["normal"], FAMILIES[family]
    before = exporter.scrape()
    listener = routed.listener(af, port)
    client = routed.connect(af, port)
    server, _ = listener.accept()
    client.close()
    assert server.recv(1) == b""
    server.close()
    listener.close()
    counts_exactly(exporter, family, port, before, Counter(
        {("fin_wait2", "normal"): 1, ("last_ack", "normal"): 1, ("listen", "normal"): 1}))


@pytest.mark.parametrize("family", FAMILIES)
def test_refused(exporter, routed, family):
    """A RST answers the SYN: sk_err is ECONNREFUSED at syn_sent -> close."""
    port, af = PORTS["refused"], FAMILIES[family]
    before = exporter.scrape()
    assert connect_error(routed, af, routed.address(af, "server"), port) == errno.ECONNREFUSED
    counts_exactly(exporter, family, port, before, Counter({("syn_sent", "refused"): 1}))


@pytest.mark.parametrize("family", FAMILIES)
def test_timeout(exporter, routed, family):
    """The router drops the SYNs (blackhole): after tcp_syn_retries (1 here,
    about 3 s) tcp_write_err() closes with ETIMEDOUT."""
    port, af = PORTS["timeout"], FAMILIES[family]
    routed.sysctl("client", "net.ipv4.tcp_syn_retries=1")
    before = exporter.scrape()
    assert connect_error(routed, af, routed.destination(af, "blackhole"), port) == errno.ETIMEDOUT
    counts_exactly(exporter, family, port, before, Counter({("syn_sent", "timeout"): 1}))


@pytest.mark.parametrize("family", FAMILIES)
def test_unreachable(exporter, routed, family):
    """The router answers with ICMP errors: `unreachable` (IPv4 host
    unreachable, IPv6 no route) and `prohibit` (administratively prohibited:
    EHOSTUNREACH on IPv4, EACCES on IPv6). Both count as unreachable."""
    port, af = PORTS["unreachable"], FAMILIES[family]
    before = exporter.scrape()
    got = {route: connect_error(routed, af, routed.destination(af, route), port)
           for route in ("unreachable", "prohibit")}
    if af == socket.AF_INET:
        assert got == {"unreachable": errno.EHOSTUNREACH, "prohibit": errno.EHOSTUNREACH}
    else:
        assert got == {"unreachable": errno.ENETUNREACH, "prohibit": errno.EACCES}
    counts_exactly(exporter, family, port, before, Counter({("syn_sent", "unreachable"): 2}))


def reset_by(closer: socket.socket, other: socket.socket) -> None:
    """`closer` closes with SO_LINGER 0 (a RST); `other` receives it."""
    closer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
    closer.close()
    other.settimeout(5)
    with pytest.raises(ConnectionResetError):
        other.recv(1)
    other.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_resets(exporter, routed, family):
    """SO_LINGER 0 on each side in turn: the side that closes resets
    (sk_err 0 in its own call: reset_local), the other receives the RST
    (ECONNRESET: reset_by_peer)."""
    port, af = PORTS["resets"], FAMILIES[family]
    before = exporter.scrape()
    listener = routed.listener(af, port)
    for resetting in ("server", "client"):
        client = routed.connect(af, port)
        server, _ = listener.accept()
        closer, other = (server, client) if resetting == "server" else (client, server)
        reset_by(closer, other)
    listener.close()
    counts_exactly(exporter, family, port, before, Counter(
        {("established", "reset_local"): 2, ("established", "reset_by_peer"): 2,
         ("listen", "normal"): 1}))


@pytest.mark.parametrize("family", FAMILIES)
def test_cancelled(exporter, routed, family):
    """A non-blocking connect the program closes after 0.2 s, unanswered:
    syn_sent -> close with sk_err 0 in the owner's close()."""
    port, af = PORTS["cancelled"], FAMILIES[family]
    before = exporter.scrape()
    client = routed.socket("client", af)
    client.setblocking(False)
    assert client.connect_ex((routed.destination(af, "blackhole"), port)) == errno.EINPROGRESS
    time.sleep(0.2)
    client.close()
    counts_exactly(exporter, family, port, before, Counter({("syn_sent", "cancelled"): 1}))


@pytest.mark.parametrize("family", FAMILIES)
def test_no_local_port(exporter, routed, family):
    """ip_local_port_range of one port: a second connection to the same
    address and port finds none (EADDRNOTAVAIL) after connect() set
    SYN_SENT: syn_sent -> close with local port 0."""
    port, af = PORTS["no_local_port"], FAMILIES[family]
    routed.sysctl("client", "net.ipv4.ip_local_port_range=40000 40000")
    listener = routed.listener(af, port)
    first = routed.connect(af, port)  # holds the one port
    server, _ = listener.accept()
    before = exporter.scrape()
    assert connect_error(routed, af, routed.address(af, "server"), port) == errno.EADDRNOTAVAIL
    counts_exactly(exporter, family, port, before, Counter({("syn_sent", "no_local_port"): 1}))
    for sock in (first, server, listener):
        sock.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reset_received_in_fin_wait2_is_told_from_the_hand_off(exporter, routed, family):
    """fin_wait2 -> close is also the TIME-WAIT hand-off (`normal`); a RST
    received there carries ECONNRESET. The client shuts its side down and
    waits in FIN-WAIT-2; the server, in CLOSE-WAIT, closes with SO_LINGER 0."""
    port, af = PORTS["fin_wait2_reset"], FAMILIES[family]
    before = exporter.scrape()
    listener = routed.listener(af, port)
    client = routed.connect(af, port)
    server, _ = listener.accept()
    client.shutdown(socket.SHUT_WR)
    assert server.recv(1) == b""
    # the server acknowledges the FIN after its delayed-ACK timer
    assert wait_for(lambda: routed.ss_states("client", port)["fin_wait2"] == 1)
    reset_by(server, client)
    listener.close()
    counts_exactly(exporter, family, port, before, Counter(
        {("fin_wait2", "reset_by_peer"): 1, ("close_wait", "reset_local"): 1,
         ("listen", "normal"): 1}))


def test_every_possible_pair_is_exported_from_start(exporter):
    scrape = exporter.scrape()
    pairs = {(dict(labels)["old_state"], dict(labels)["reason"])
             for name, labels in scrape if name == m.CLOSES}
    assert {(name_of(old), reason) for old, reason in possible_reasons()} <= pairs
    assert {reason for _, reason in pairs} == set(REASONS)


def test_the_classic_tracepoint_says_reasons_are_off(exporters):
    """Without the raw tracepoint's `sk` there are no reasons: no family,
    and one line at start that says so."""
    classic = exporters["tracepoint"]
    assert not classic.scrape().series(m.CLOSES)
    assert sum("close reasons are off" in line for line in classic.log().splitlines()) == 1
    assert not any("close reasons are off" in line
                   for line in exporters["raw_tracepoint"].log().splitlines())


@pytest.mark.parametrize("family", FAMILIES)
def test_trace_shows_and_filters_reasons(routed, family):
    """`trace --reason refused,cancelled` prints those closes only, with
    their reason in the column and the JSON field."""
    port, af = PORTS["trace"], FAMILIES[family]
    flag = "-4" if af == socket.AF_INET else "-6"
    with Trace("--json", flag, "--rport", str(port), "--reason", "refused,cancelled") as trace:
        connect_error(routed, af, routed.address(af, "server"), port)  # refused
        connect_error(routed, af, routed.destination(af, "unreachable"), port)
        client = routed.socket("client", af)
        client.setblocking(False)
        client.connect_ex((routed.destination(af, "blackhole"), port))
        time.sleep(0.2)
        client.close()  # cancelled
        result = trace.stop()
    assert result.returncode == 0, result.stderr
    records = [r for r in result.records() if r["remote_port"] == port]
    assert [(r["old_state"], r["new_state"], r["reason"]) for r in records] == [
        ("syn_sent", "close", "refused"), ("syn_sent", "close", "cancelled")]
