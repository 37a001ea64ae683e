"""Exact where users run it: counted + missed = the kernel's own counts, on
both attach paths and under scrapes; a socket is un-counted from the cell it
was counted in; the family is the packets'; the program is configured before
it runs."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
from collections import Counter

import pytest

from tracer import metrics as m
from tracer.probe import Probe

from .conftest import SERVICE_PORTS
from .exporter import Exporter, Scrape
from .netlab import Lab, inside, wait_for
from .test_serve import delta, transitions_of
from .workload import _rst_on_close

PORTS = iter(SERVICE_PORTS[20:])
IPV6_ADDRFORM = 1  # linux/in6.h


SCRAPE_LOOP = """
import sys, threading, urllib.request
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
count = 0
while not stop.is_set():
    for url in sys.argv[1:]:
        urllib.request.urlopen(url, timeout=10).read()
    count += 1
    print(count, flush=True)
"""


def _scrapes_done(scraper: subprocess.Popen) -> int:
    """The scraper's last count so far (it prints one per loop)."""
    try:
        lines = os.read(scraper.stdout.fileno(), 65536).split()
    except BlockingIOError:
        lines = []
    if lines:
        _scrapes_done.last = int(lines[-1])
    return getattr(_scrapes_done, "last", 0)


def snmp_tcp(namespace: str) -> dict[str, int]:
    """The namespace's Tcp: line of /proc/net/snmp (the kernel's own counts)."""
    with inside(namespace), open("/proc/thread-self/net/snmp") as snmp:
        names, values = [line.split()[1:] for line in snmp if line.startswith("Tcp:")]
    return dict(zip(names, map(int, values)))


def test_counted_plus_missed_is_what_the_kernel_counted_under_scrapes(exporters, lab):
    """Connections that complete, are refused and are reset, while both
    exporters are scraped in a loop: on each path the births, resets and
    failed attempts counted plus the events the kernel skipped (and said so)
    equal the namespaces' ActiveOpens, PassiveOpens, EstabResets and
    AttemptFails; and scrapes make the kernel skip nothing."""
    port = next(PORTS)
    before = {path: e.scrape() for path, e in exporters.items()}
    kernel_before = {ns: snmp_tcp(ns) for ns in (lab.client, lab.server)}
    # A scraper of its own, as Prometheus is: scrapes back to back on
    # kept-alive connections, counted.
    scraper = subprocess.Popen(
        [sys.executable, "-c", SCRAPE_LOOP, *(e.url for e in exporters.values())],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _scrapes_done.last = 0
    os.set_blocking(scraper.stdout.fileno(), False)
    connections = 0
    try:
        with lab.listener(socket.AF_INET, port) as listener:
            # at least 1500 connections, and on until 20 scrapes of each ran
            while connections < 1500 or _scrapes_done(scraper) < 20:
                assert connections < 30000, "the scraper did not get to run"
                i, connections = connections, connections + 1
                client = lab.connect(socket.AF_INET, port)
                server, _ = listener.accept()
                if i % 3 == 0:
                    _rst_on_close(client)  # established -> close by RST, both ends
                client.close()
                if i % 3 != 0:
                    assert server.recv(1) == b""
                server.close()
        for _ in range(300):  # nothing listens any more: refused
            refused = lab.socket("client")
            with pytest.raises(ConnectionRefusedError):
                refused.connect((lab.address(socket.AF_INET, "server"), port))
            refused.close()
    finally:
        scraper.communicate(b"stop\n", timeout=30)
    kernel = {ns: Counter(snmp_tcp(ns)) - Counter(kernel_before[ns])
              for ns in (lab.client, lab.server)}
    client, server = kernel[lab.client], kernel[lab.server]
    expected = {
        ("close", "syn_sent"): client["ActiveOpens"],
        ("listen", "syn_recv"): server["PassiveOpens"],
        "resets": client["EstabResets"] + server["EstabResets"],
        ("syn_sent", "close"): client["AttemptFails"],
    }
    resets = (connections + 2) // 3
    assert expected[("close", "syn_sent")] == connections + 300
    assert expected["resets"] == 2 * resets

    for path, exporter in exporters.items():
        def counted() -> dict:
            moved = delta(transitions_of(exporter.scrape(), "ipv4", port),
                          transitions_of(before[path], "ipv4", port))
            return {
                ("close", "syn_sent"): moved[("close", "syn_sent")],
                ("listen", "syn_recv"): moved[("listen", "syn_recv")],
                "resets": moved[("established", "close")] + moved[("close_wait", "close")],
                ("syn_sent", "close"): moved[("syn_sent", "close")],
            }

        exact = wait_for(lambda: counted() == expected)
        missed = exporter.scrape().value(m.MISSED_EVENTS) - before[path].value(m.MISSED_EVENTS)
        if not exact:  # only what the kernel says it skipped may be missing
            shortfall = sum(expected[k] - counted()[k] for k in expected)
            assert 0 < shortfall <= missed, (path, counted(), expected, missed)
        if path == "raw_tracepoint":
            assert exact and missed == 0, (counted(), expected, missed)


def gauge_of(scrape: Scrape, port: int) -> Counter:
    return Counter({(labels["family"], labels["state"]): int(value)
                    for labels, value in ((dict(l), v) for (n, l), v in scrape.items()
                                          if n == m.SOCKETS)
                    if labels.get("port") == str(port) and value})


def test_ipv6_addrform_socket_leaves_the_gauge_where_it_was(exporters, lab):
    """An established v4-mapped IPv6 socket turned into an IPv4 one
    (IPV6_ADDRFORM) is counted as ipv4 throughout and leaves nothing behind
    when it closes."""
    port = next(PORTS)
    mapped_server = f"::ffff:{lab.address(socket.AF_INET, 'server')}"
    with lab.listener(socket.AF_INET, port) as listener:
        clients = []
        for _ in range(5):
            client = lab.socket("client", socket.AF_INET6)
            client.connect((mapped_server, port))
            clients.append((client, listener.accept()[0]))
        for client, _ in clients:
            client.setsockopt(socket.IPPROTO_IPV6, IPV6_ADDRFORM, socket.AF_INET)
        for exporter in exporters.values():
            assert wait_for(lambda: gauge_of(exporter.scrape(), port)[
                ("ipv4", "established")] == 10)
        for client, server in clients:
            client.close()
            assert server.recv(1) == b""
            server.close()
    for path, exporter in exporters.items():
        assert wait_for(lambda: gauge_of(exporter.scrape(), port) == Counter()), \
            (path, gauge_of(exporter.scrape(), port))


def test_ipv4_clients_of_a_dual_stack_listener_count_as_ipv4(exporters, lab):
    """A listener on :: with IPV6_V6ONLY off (Go, Java and Node listen so)
    and 20 IPv4 clients: every transition of the connections is ipv4 on
    both ends; only the listener's own two are ipv6."""
    port = next(PORTS)
    before = {path: e.scrape() for path, e in exporters.items()}
    listener = lab.socket("server", socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind(("::", port))
    listener.listen(64)
    with listener:
        for _ in range(20):
            client = lab.connect(socket.AF_INET, port)
            server, _ = listener.accept()
            client.close()
            assert server.recv(1) == b""
            server.close()
    for path, exporter in exporters.items():
        def families() -> dict[str, int]:
            scrape = exporter.scrape()
            return {family: sum(delta(transitions_of(scrape, family, port),
                                      transitions_of(before[path], family, port)).values())
                    for family in ("ipv4", "ipv6")}

        assert wait_for(lambda: families() == {"ipv4": 200, "ipv6": 2}), (path, families())


def _links_of(prog_id: int) -> list:
    """Where a program is attached: `bpftool perf` lists both raw
    tracepoint and classic tracepoint attachments, by the fd that holds each."""
    listed = json.loads(subprocess.run(["bpftool", "perf", "show", "-j"], check=True,
                                       capture_output=True, text=True).stdout or "[]")
    return [entry for entry in listed if entry.get("prog_id") == prog_id]


@pytest.mark.parametrize("attach", ["raw_tracepoint", "tracepoint"])
def test_the_program_is_configured_before_it_is_attached(attach):
    """bcc attaches tracepoint__* functions as it loads them; ours is
    attached only once the service-port map is written, so no socket is
    ever labelled before its port is known."""
    seen = {}

    class Watching(Probe):
        def _configure(self) -> None:
            super()._configure()
            prog_id = self.prog_stats()["prog_id"]
            port_slot = self.bpf[b"service_port_slot"][ctypes.c_int(SERVICE_PORTS[0])].value
            seen["before"] = (_links_of(prog_id), port_slot)

    probe = Watching(service_ports=SERVICE_PORTS[:1], seed_live_sockets=False, attach=attach)
    try:
        assert seen["before"] == ([], 1)
        assert len(_links_of(probe.prog_stats()["prog_id"])) == 1
        assert probe.attach_kind == attach
    finally:
        probe.close()


def test_sockets_counted_nowhere_are_counted_as_unseen():
    """Sockets no walk can find at start (their namespace has no name and no
    process, only the sockets hold it) and whose birth no program saw: their
    first transitions count them in tcpstate_unseen_sockets_total, once
    each, and the gauge never goes below zero."""
    port = SERVICE_PORTS[1]
    with Lab() as lab:
        listener = lab.listener(socket.AF_INET, port)
        pairs = [(c, listener.accept()[0]) for c in
                 (lab.connect(socket.AF_INET, port) for _ in range(10))]
        lab.close()  # the names go; the sockets keep both namespaces alive
        with Exporter(service_ports=(port,)) as late:
            before = late.scrape().value(m.UNSEEN_SOCKETS)
            for client, server in pairs:
                client.close()
                assert server.recv(1) == b""
                server.close()
            listener.close()
            # each socket once: 10 clients, 10 servers, the listener
            assert wait_for(lambda: late.scrape().value(m.UNSEEN_SOCKETS) - before == 21)
            assert gauge_of(late.scrape(), port) == Counter()


def test_a_client_on_a_service_port_number_keeps_its_slot_unseen():
    """A client whose local port has a service port's number (an ephemeral
    port the kernel picked, here bound by hand) connects to another service
    port before the exporter starts: seeded and first seen later, it counts
    under the port it connects to, as its birth would have."""
    server_port, client_port = SERVICE_PORTS[2], SERVICE_PORTS[3]
    with Lab() as lab:
        listener = lab.listener(socket.AF_INET, server_port)
        client = lab.socket("client")
        client.bind((lab.address(socket.AF_INET, "client"), client_port))
        client.connect((lab.address(socket.AF_INET, "server"), server_port))
        server, _ = listener.accept()
        with Exporter(service_ports=(server_port, client_port)) as late:
            start = late.scrape()
            assert gauge_of(start, server_port) == {("ipv4", "listen"): 1,
                                                     ("ipv4", "established"): 2}
            assert gauge_of(start, client_port) == Counter()
            client.close()
            assert server.recv(1) == b""
            server.close()
            listener.close()

            def moved(port: int) -> Counter:
                return delta(transitions_of(late.scrape(), "ipv4", port),
                             transitions_of(start, "ipv4", port))

            assert wait_for(lambda: sum(moved(server_port).values()) == 7)
            assert moved(client_port) == Counter()
            assert gauge_of(late.scrape(), server_port) == Counter()
