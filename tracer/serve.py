"""`tcpstate serve`: the Prometheus exporter.

Loads the BPF program (tracer.probe), registers a collector that reads its
maps at scrape time (tracer.collector) in a private registry, and serves the
exposition over HTTP until SIGTERM or SIGINT. No Python code runs per event.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import __version__
from .collector import TcpstateCollector
from .errors import EXIT_LISTEN, TcpstateError, UsageError
from .probe import Probe

log = logging.getLogger(__name__)

DEFAULT_PORT = 9814
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
HEALTH_PATH = "/-/healthy"
# A scraper that stops sending must not hold a server thread forever.
REQUEST_TIMEOUT_SECONDS = 10


def parse_listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--web.listen-address {text!r}: expected HOST:PORT, e.g. :{DEFAULT_PORT}")
    host = host.strip("[]")
    return host, int(port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], handler):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        super().__init__((host or "::", address[1]), handler)

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # An empty host listens on both families, like Go exporters do.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def make_handler(registry: CollectorRegistry, telemetry_path: str) -> type:
    landing = (
        "<html><head><title>tcpstate</title></head><body><h1>tcpstate</h1>"
        f'<p><a href="{telemetry_path}">Metrics</a></p></body></html>'
    ).encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = f"tcpstate/{__version__}"
        # Keep-alive: Prometheus reuses its connection, so scrapes do not
        # leave a TIME-WAIT socket each on the host we measure.
        protocol_version = "HTTP/1.1"
        timeout = REQUEST_TIMEOUT_SECONDS

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == telemetry_path:
                encoder, content_type = choose_encoder(self.headers.get("Accept"))
                self._reply(200, encoder(registry), content_type)
            elif path == HEALTH_PATH:
                self._reply(200, b"OK\n", "text/plain; charset=utf-8")
            elif path == "/":
                self._reply(200, landing, "text/html; charset=utf-8")
            else:
                self._reply(404, b"Not Found\n", "text/plain; charset=utf-8")

        def _reply(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def bind(listen_address: str, registry: CollectorRegistry, telemetry_path: str) -> _Server:
    host, port = parse_listen_address(listen_address)
    try:
        return _Server((host, port), make_handler(registry, telemetry_path))
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise TcpstateError(
            f"cannot listen on {listen_address}: {reason}", EXIT_LISTEN
        ) from None


def bcc_version() -> str:
    try:
        import bcc

        return getattr(bcc, "__version__", "")
    except ImportError:
        return ""


def serve(
    listen_address: str,
    telemetry_path: str,
    service_ports: tuple[int, ...],
    socket_table_size: int,
    dry_run: bool = False,
    report: Callable[[str], None] = print,
) -> int:
    stop = threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    registry = CollectorRegistry(auto_describe=True)
    # Bind before loading: a busy port fails fast, with nothing to undo.
    server = None if dry_run else bind(listen_address, registry, telemetry_path)
    started = time.monotonic()
    probe = Probe(service_ports=service_ports, socket_table_size=socket_table_size)
    try:
        collector = TcpstateCollector(probe, bcc_version=bcc_version())
        registry.register(collector)
        stats = probe.prog_stats()
        loaded = (
            f"loaded and attached to sock:inet_sock_set_state in "
            f"{time.monotonic() - started:.2f}s (prog id {stats.get('prog_id')}, "
            f"socket table {probe.table_capacity} sockets, "
            f"service ports {','.join(map(str, service_ports)) or 'none'})"
        )
        if dry_run:
            probe.read()
            probe.time_wait()
            report(f"tcpstate: dry run ok: {loaded}; maps readable")
            return 0
        log.info("%s", loaded)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="tcpstate-http", daemon=True)
        thread.start()
        log.info("serving %s on %s", telemetry_path, listen_address)
        while not stop.wait(0.5):
            pass
        server.shutdown()
        return 0
    finally:
        if server is not None:
            server.server_close()
        probe.close()
