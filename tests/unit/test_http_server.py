"""The HTTP front's policies, checked deterministically: who is let in
(Admission), how scrapes share a body and when one gets 503
(SharedScrapes), and what a real in-process server answers to a hostile
client. Load and latency are the benchmark's (bench figure 9)."""

from __future__ import annotations

import base64
import gzip
import http.client
import logging
import os
import random
import socket
import subprocess
import sys
import threading
import time
from email.message import Message
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily

from tracer.http_server import (MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE, Admission, _shut,
                                FrontCollector, Request, SharedScrapes, Site, bind)
from tracer.webconfig import BasicAuth, WebConfig, load_web_config

PASSWORD = "correct horse"
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


# ---- Admission: a pure policy ----------------------------------------------
def test_a_source_at_its_cap_replaces_its_own_idle_one_or_is_refused():
    admission = Admission(limit=10, per_source=3)
    for i in range(3):
        assert admission.admit(i, "10.0.0.1", handle=i, now=float(i)) == (True, None)
    admission.busy(0)
    assert admission.admit(3, "10.0.0.1", handle=3, now=5.0) == (True, 1)  # its longest idle
    admission.busy(2)
    admission.busy(3)
    assert admission.admit(4, "10.0.0.1", handle=4) == (False, None)  # all busy: refused
    assert admission.admit(5, "10.0.0.2") == (True, None)  # another source is let in
    admission.release(0)
    assert admission.admit(6, "10.0.0.1") == (True, None)
    assert admission.refused == 1 and admission.shed == 1


def test_when_full_the_greediest_source_gives_up_its_longest_idle_then_oldest_busy():
    admission = Admission(limit=6, per_source=3)
    for i, since in enumerate((1.0, 5.0, 3.0)):
        admission.admit(f"a{i}", "A", handle=f"a{i}", now=since)
    admission.busy("a0", now=0.5)
    for i in range(2):
        admission.admit(f"b{i}", "B", handle=f"b{i}", now=0.0)
    admission.admit("c0", "C", handle="c0", now=0.0)
    # full; A holds the most: of its idle ones, a2 has waited longest
    assert admission.admit("d0", "D", handle="d0", now=9.0) == (True, "a2")
    admission.busy("a1", now=7.0)
    # A and B hold two each, D one: a tie between A and B; with every A busy,
    # A's oldest busy one goes (a0), or B's longest idle: both are fair
    admitted, victim = admission.admit("e0", "E", handle="e0", now=9.5)
    assert admitted and victim in ("a0", "b0", "b1")
    assert admission.shed == 2


def test_a_source_under_its_cap_is_always_admitted():
    """Random opens, closes and busy marks from a few greedy sources and a
    few modest ones: every admission of a source under its cap succeeds, and
    what is shed always belongs to a source that held the most."""
    rng = random.Random(15)
    admission = Admission(limit=20, per_source=6)
    sources = [f"10.0.0.{i}" for i in range(8)]
    open_keys: dict[int, str] = {}
    for key in range(5000):
        action = rng.random()
        if action < 0.6 or not open_keys:
            source = rng.choice(sources[:3] if rng.random() < 0.7 else sources)
            held = {s: admission.held_by(s) for s in sources}
            admitted, victim = admission.admit(key, source, handle=key)
            if held[source] < 6:
                assert admitted
            if admitted:
                open_keys[key] = source
            if victim is not None:
                assert open_keys[victim] == source if held[source] == 6 \
                    else held[open_keys[victim]] == max(held.values())
                del open_keys[victim]
            assert len(open_keys) <= 20
        elif action < 0.8:
            gone = rng.choice(list(open_keys))
            admission.release(gone)
            del open_keys[gone]
        else:
            admission.busy(rng.choice(list(open_keys)))


# ---- SharedScrapes ---------------------------------------------------------
class _Gate:
    """A render that blocks until opened, and counts its calls."""

    def __init__(self):
        self.opened = threading.Event()
        self.calls = 0
        self.started = threading.Event()

    def __call__(self, key) -> bytes:
        self.calls += 1
        self.started.set()
        assert self.opened.wait(30)
        return f"body {self.calls} of {key}".encode()


def _call_in_threads(function, arguments) -> tuple[list, list[threading.Thread]]:
    results = [None] * len(arguments)

    def run(i):
        results[i] = function(arguments[i])

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(arguments))]
    for thread in threads:
        thread.start()
    return results, threads


def test_concurrent_scrapes_share_one_rendering():
    gate = _Gate()
    scrapes = SharedScrapes(gate, max_requests=40)
    results, threads = _call_in_threads(scrapes.body, ["text"] * 20)
    assert gate.started.wait(10)
    while scrapes._inside < 20:  # everyone arrived during the one rendering
        time.sleep(0.01)
    gate.opened.set()
    for thread in threads:
        thread.join(10)
    assert gate.calls == 1 and set(results) == {b"body 1 of text"}
    assert scrapes.body("text") == b"body 2 of text"  # a later scrape: a fresh body


def test_beyond_max_requests_a_scrape_shares_a_body_being_made_or_gets_503():
    gate = _Gate()
    scrapes = SharedScrapes(gate, max_requests=2, wait_seconds=0.2)
    results, threads = _call_in_threads(scrapes.body, ["text", "text"])
    assert gate.started.wait(10)
    while scrapes._inside < 2:
        time.sleep(0.01)
    # the limit is reached: another format has no body being made: refused
    assert scrapes.body("openmetrics") is None and scrapes.refused == 1
    # the same format shares the body being made
    late, late_threads = _call_in_threads(scrapes.body, ["text"])
    gate.opened.set()
    for thread in threads + late_threads:
        thread.join(10)
    assert results == late * 2 == [b"body 1 of text"] * 2 and gate.calls == 1


# ---- the server, in-process ------------------------------------------------
class _BlockingCollector:
    def __init__(self):
        self.release = threading.Event()

    def collect(self):
        self.release.wait(60)
        yield CounterMetricFamily("blocking", "a scrape that waits", value=1)


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(registry=None, config_text=None, telemetry_path="/metrics", **options):
        if registry is None:
            registry = CollectorRegistry()
            Counter("probe_requests", "a metric to find", registry=registry).inc()
        config = None
        if config_text is not None:
            path = tmp_path / "web.yml"
            path.write_text(config_text)
            config = load_web_config(str(path))
        server = bind("127.0.0.1:0", registry, telemetry_path, config, **options)
        threading.Thread(target=server.serve_until_stopped, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
        server.server_close()


def exchange(port: int, data: bytes, source: str = "127.0.0.1") -> bytes:
    """Send `data`, return everything answered until the server closes."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=10,
                                  source_address=(source, 0)) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, TimeoutError):
            pass
    return b"".join(chunks)


def get(port: int, path="/metrics", headers=None, source="127.0.0.1"):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(source, 0))
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read(), dict(response.getheaders())
    finally:
        connection.close()


def test_a_scraper_on_its_own_address_gets_in_beside_a_full_house_of_busy_scrapes(serve):
    """Every connection from 127.0.0.1 is answering a scrape (the registry
    blocks): the server was full, and a newcomer was refused. Now 127.0.0.1
    holds at most its cap and 127.0.0.2 gets in."""
    blocking = _BlockingCollector()
    registry = CollectorRegistry()
    registry.register(blocking)
    server = serve(registry)
    port = server.server_address[1]
    flood = []
    try:
        for _ in range(MAX_CONNECTIONS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            flood.append(sock)
        deadline = time.monotonic() + 10
        while server.connections.refused + server.connections.shed \
                < MAX_CONNECTIONS - MAX_CONNECTIONS_PER_SOURCE and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.connections.held_by("127.0.0.1") == MAX_CONNECTIONS_PER_SOURCE
        status, body, _ = get(port, "/-/healthy", source="127.0.0.2")
        assert (status, body) == (200, b"OK\n")
        # what was turned away is exported, never silent
        exported = {family.name: family.samples[0].value
                    for family in FrontCollector(server).collect()}
        assert (exported["tcpstate_http_connections_refused"]
                + exported["tcpstate_http_connections_shed"]
                >= MAX_CONNECTIONS - MAX_CONNECTIONS_PER_SOURCE)
        assert exported["tcpstate_http_scrapes_refused"] == 0
    finally:
        blocking.release.set()
        for sock in flood:
            sock.close()


def test_shedding_a_connection_its_thread_just_closed_spares_the_reused_descriptor():
    """stop() and shedding wake connections from another thread: the
    connection's own thread may have closed it meanwhile, and a new
    connection may have its descriptor number. (CI once failed with EBADF
    here when the shedding went by number.)"""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        closed = socket.create_connection(listener.getsockname())
        number = closed.fileno()
        listener.accept()[0].close()
        closed.close()
        reused = socket.create_connection(listener.getsockname())
        peer, _ = listener.accept()
        with reused, peer:
            assert reused.fileno() == number  # the lowest free number
            _shut(closed)
            peer.sendall(b"still here")
            assert reused.recv(16) == b"still here"


def test_a_get_with_a_body_is_refused_and_closed_nothing_hides_behind_it(serve):
    port = serve().server_address[1]
    hidden = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
    for framing in (b"Content-Length: %d\r\n" % len(hidden),
                    b"Transfer-Encoding: chunked\r\n"):
        answer = exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n"
                          + (hidden if b"Length" in framing else b"%x\r\n%s\r\n0\r\n\r\n"
                             % (len(hidden), hidden)))
        assert answer.startswith(b"HTTP/1.1 400 ") and answer.count(b"HTTP/1.1") == 1, answer
        assert b"Connection: close" in answer
    assert get(port, headers={"Content-Length": "0"})[0] == 200


def test_non_ascii_authorization_is_a_401(serve):
    port = serve(config_text=f"basic_auth_users:\n  alice: '{HASH}'\n").server_address[1]
    answer = exchange(port, "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic ééé\r\n"
                      "Connection: close\r\n\r\n".encode("latin-1"))
    assert answer.startswith(b"HTTP/1.1 401 "), answer


def test_generic_server_header_and_security_headers_on_error_pages(serve):
    port = serve(config_text="http_server_config:\n  headers:\n    X-Frame-Options: deny\n"
                             "    X-Content-Type-Options: nosniff\n").server_address[1]
    for request in (b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",  # 400
                    b"BREW /pot HTTP/1.1\r\nHost: x\r\n\r\n",                                # 501
                    b"GET /metrics HTTP/1.1\r\nX-Long: " + b"z" * 70000 + b"\r\n\r\n",      # 431
                    b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"):       # 404
        answer = exchange(port, request)
        head = answer.split(b"\r\n\r\n", 1)[0].decode() + "\r\n"
        assert "\r\nX-Frame-Options: deny\r\n" in head, head
        assert "\r\nX-Content-Type-Options: nosniff\r\n" in head, head
        assert "\r\nServer: tcpstate\r\n" in head, head
    _, _, headers = get(port)
    assert headers["Server"] == "tcpstate"


def test_the_landing_page_escapes_the_telemetry_path(serve):
    port = serve(telemetry_path='/m"><script>alert(1)</script>').server_address[1]
    status, body, _ = get(port, "/")
    assert status == 200 and b"<script>" not in body
    assert b"/m&quot;&gt;&lt;script&gt;" in body


def test_gzip_when_the_scraper_asks(serve):
    port = serve().server_address[1]
    status, body, headers = get(port, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert b"probe_requests_total 1.0" in gzip.decompress(body)
    for no in ({}, {"Accept-Encoding": "identity"}, {"Accept-Encoding": "gzip;q=0"}):
        status, body, headers = get(port, headers=no)
        assert "Content-Encoding" not in headers and b"probe_requests_total 1.0" in body


def test_credentials_are_checked_before_the_connection_counts_busy():
    site = Site(CollectorRegistry(), "/metrics",
                WebConfig(Path("web.yml"), auth=BasicAuth({"alice": HASH.encode()})))
    calls = []

    def request(password: str) -> Request:
        headers = Message()
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"alice:{password}".encode()).decode()
        return Request("GET", "/-/healthy", headers, "127.0.0.1")

    assert site.answer(request("wrong"), authorized=lambda: calls.append(1)).status == 401
    assert calls == []
    assert site.answer(request(PASSWORD), authorized=lambda: calls.append(1)).status == 200
    assert calls == [1]


def test_reload_swaps_the_configuration_whole_or_keeps_the_old_one(serve, tmp_path, caplog):
    server = serve(config_text=f"basic_auth_users:\n  alice: '{HASH}'\n")
    port = server.server_address[1]
    path = tmp_path / "web.yml"

    def as_user(user):
        return {"Authorization": "Basic " + base64.b64encode(
            f"{user}:{PASSWORD}".encode()).decode()}

    assert get(port, headers=as_user("alice"))[0] == 200
    old_auth = server.site.web_config.auth
    assert len(old_auth.successes) == 1
    path.write_text(f"basic_auth_users:\n  bob: '{HASH}'\n")
    assert server.reload()
    assert len(server.site.web_config.auth.successes) == 0  # caches flushed
    assert get(port, headers=as_user("alice"))[0] == 401
    assert get(port, headers=as_user("bob"))[0] == 200
    path.write_text("basic_auth_users:\n  bob: 'not a hash'\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tracer.http_server"):
        assert not server.reload()
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failed) == 1 and "previous configuration stays" in failed[0].getMessage()
    assert "\n" not in failed[0].getMessage()
    assert get(port, headers=as_user("bob"))[0] == 200


def test_basic_auth_without_tls_warns_at_start(tmp_path, caplog):
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: '{HASH}'\n")
    with caplog.at_level(logging.WARNING, logger="tracer.http_server"):
        server = bind("127.0.0.1:0", CollectorRegistry(), "/metrics", load_web_config(str(path)))
        server.server_close()
    assert any("without TLS" in r.getMessage() for r in caplog.records)


# ---- out of file descriptors -----------------------------------------------
_EMFILE_SERVER = """
import logging, resource, sys, os
from prometheus_client import CollectorRegistry
from tracer.http_server import bind
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
server = bind("127.0.0.1:0", CollectorRegistry(), "/metrics")
print(server.server_address[1], flush=True)
sys.stdin.readline()  # the test counted our descriptors: leave room for 3 connections
lowest = len(os.listdir("/proc/self/fd")) + 3
resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
server.serve_until_stopped()
"""


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_file_descriptors_logs_once_and_backs_off_instead_of_spinning():
    process = subprocess.Popen([sys.executable, "-c", _EMFILE_SERVER], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held = []
    try:
        port = int(process.stdout.readline())
        process.stdin.write("go\n")
        process.stdin.flush()
        time.sleep(0.5)
        # more connections than descriptors left: the rest wait in the backlog
        held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(8)]
        time.sleep(0.5)
        before = _cpu_seconds(process.pid)
        time.sleep(2)
        spent = _cpu_seconds(process.pid) - before
        # a spin burns the whole 2 s; the backoff (up to 1 s) next to nothing
        assert spent < 0.5, f"{spent:.2f} s of CPU in 2 s: accept() spins"
        for sock in held:
            sock.close()
        held = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # descriptors free again: it serves
            try:
                if get(port, "/-/healthy")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("no longer serving after the descriptors were freed")
    finally:
        for sock in held:
            sock.close()
        process.kill()
        _, stderr = process.communicate(timeout=10)
    assert stderr.count("cannot accept connections: Too many open files") == 1, stderr
