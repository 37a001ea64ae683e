"""The HTTP server of `tcpstate serve`: /metrics, /-/healthy and /.

Every request is answered by one function of the request, `Site.answer`
(status, headers, body), so what is served to whom is decided in one place;
the rest of this module moves bytes and bounds what a client may hold.

The server faces whatever can reach the port, so it is bounded:
- at most MAX_CONNECTIONS connections, one thread each; one more sheds the
  connection that has waited longest without a request being answered
  (an idle keep-alive, a slow sender, a stalled TLS handshake), so a
  scraper always gets in and a reply being written is never cut;
- a request's line and headers must arrive within REQUEST_TIMEOUT_SECONDS
  of its first byte and hold at most MAX_HEADER_BYTES (else 431); a kept
  alive connection may idle IDLE_TIMEOUT_SECONDS between requests;
- scrapes read the maps one at a time (a lock): concurrent scrapes each
  get a whole snapshot, and counters never go backwards.
Handler errors (garbage, resets, failed handshakes) are logged at debug
level and cost only their own connection.
"""

from __future__ import annotations

import errno
import http.client
import io
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import __version__
from .errors import EXIT_LISTEN, TcpstateError, UsageError
from .webconfig import WebConfig

log = logging.getLogger(__name__)

DEFAULT_PORT = 9814
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
HEALTH_PATH = "/-/healthy"
# Time for a request line and headers once their first byte arrived, and
# for writing a reply: a client that stops must not hold a thread forever.
REQUEST_TIMEOUT_SECONDS = 10
# A kept-alive connection waits this long for its next request: longer
# than common scrape intervals, so scrapes reuse their connection and leave
# no TIME-WAIT socket each on the host we measure.
IDLE_TIMEOUT_SECONDS = 120
MAX_CONNECTIONS = 128
MAX_HEADER_BYTES = 64 * 1024
_PLAIN_HTTP_TO_TLS = (b"HTTP/1.0 400 Bad Request\r\nContent-Type: text/plain\r\n"
                      b"Connection: close\r\n\r\n"
                      b"Client sent an HTTP request to an HTTPS server.\n")
_TLS_HANDSHAKE_RECORD = 0x16
_TEXT = "text/plain; charset=utf-8"


def parse_listen_address(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[v6]:PORT` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--web.listen-address {text!r}: expected HOST:PORT, e.g. :{DEFAULT_PORT}")
    host = host.strip("[]")
    return host, int(port)


# ---- what is answered ------------------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Message

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class Site:
    """The answers: authentication, routing, the scrape and the headers
    every reply carries."""

    def __init__(self, registry: CollectorRegistry, telemetry_path: str,
                 web_config: WebConfig | None = None,
                 scrape_lock: threading.Lock | None = None):
        self.registry = registry
        self.telemetry_path = telemetry_path
        self.auth = web_config.auth if web_config else None
        self.extra_headers = dict(web_config.headers) if web_config else {}
        self.scrape_lock = scrape_lock or threading.Lock()
        self.landing = (
            "<html><head><title>tcpstate</title></head><body><h1>tcpstate</h1>"
            f'<p><a href="{telemetry_path}">Metrics</a></p></body></html>'
        ).encode()

    def answer(self, request: Request) -> Reply:
        if self.auth is not None and not self.auth.allows(request.headers.get("Authorization")):
            return self._reply(401, b"Unauthorized\n", _TEXT,
                               {"WWW-Authenticate": 'Basic realm="tcpstate"'})
        path = request.path
        if path == self.telemetry_path:
            encoder, content_type = choose_encoder(request.headers.get("Accept"))
            with self.scrape_lock:
                body = encoder(self.registry)
            return self._reply(200, body, content_type)
        if path == HEALTH_PATH:
            return self._reply(200, b"OK\n", _TEXT)
        if path == "/":
            return self._reply(200, self.landing, "text/html; charset=utf-8")
        return self._reply(404, b"Not Found\n", _TEXT)

    def _reply(self, status: int, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> Reply:
        return Reply(status, (("Content-Type", content_type),
                              ("Content-Length", str(len(body))),
                              *{**self.extra_headers, **(headers or {})}.items()), body)


# ---- who may hold a connection ---------------------------------------------
class _Connections:
    """The open connections, each waiting (for a request, since a time) or
    answering one. Keyed by the accepted socket object; the file descriptor
    is kept to shed it, as TLS takes the object over."""

    def __init__(self, limit: int):
        self.limit = limit
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[float, int]] = {}
        self._answering: dict[int, int] = {}

    def admit(self, key: int, fd: int) -> bool:
        with self._lock:
            if len(self._waiting) + len(self._answering) >= self.limit:
                if not self._waiting:
                    return False  # every slot is writing a reply: refuse
                victim = min(self._waiting, key=lambda k: self._waiting[k][0])
                _, victim_fd = self._waiting.pop(victim)
                _shut(victim_fd)
                log.debug("connection limit %d reached: shed the longest-waiting one", self.limit)
            self._waiting[key] = (time.monotonic(), fd)
            return True

    def answering(self, key: int) -> None:
        with self._lock:
            if key in self._waiting:
                self._answering[key] = self._waiting.pop(key)[1]

    def waiting(self, key: int) -> None:
        with self._lock:
            if key in self._answering:
                self._waiting[key] = (time.monotonic(), self._answering.pop(key))

    def release(self, key: int) -> None:
        """Before the socket is closed: a freed descriptor number must never
        be shed on behalf of the connection that had it."""
        with self._lock:
            self._waiting.pop(key, None)
            self._answering.pop(key, None)


def _shut(fd: int) -> None:
    """Wake the thread blocked on this connection: it reads end-of-file."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.detach()


class _RequestReader(io.RawIOBase):
    """The socket's reads for one request at a time, each given only the
    time left until the request's deadline and capped in bytes, so that a
    trickling (slowloris) or endless request is cut off."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.start_request()

    def readable(self) -> bool:
        return True

    def start_request(self) -> None:
        self._deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
        self._started = False
        self._budget = MAX_HEADER_BYTES

    def readinto(self, buffer) -> int:
        if self._budget <= 0:
            raise http.client.LineTooLong(f"request headers over {MAX_HEADER_BYTES} bytes")
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request not received in time")
        self._sock.settimeout(left)
        received = self._sock.recv_into(memoryview(buffer)[: self._budget])
        if received and not self._started:
            self._started = True
            self._deadline = min(self._deadline, time.monotonic() + REQUEST_TIMEOUT_SECONDS)
        self._budget -= received
        return received


# ---- moving bytes ----------------------------------------------------------
class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], handler, tls: ssl.SSLContext | None = None):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.tls = tls
        self.connections = _Connections(MAX_CONNECTIONS)
        # before binding: a failed bind calls server_close(), which closes it
        self._wake_read, self._wake_write = os.pipe()
        super().__init__((host or "::", address[1]), handler)

    def serve_until_stopped(self) -> None:
        """Accept connections until stop(). Blocks in one select on the
        listening socket and a pipe, so an idle exporter sleeps until a
        scraper connects (serve_forever would wake every poll interval to
        look at its shutdown flag)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_read, selectors.EVENT_READ)
            while True:
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_read in ready:
                    return
                self.handle_request()  # the socket is readable: accepts at once

    def stop(self) -> None:
        """Make serve_until_stopped() return (from another thread)."""
        os.write(self._wake_write, b"x")

    def server_close(self) -> None:
        super().server_close()
        for fd in (self._wake_read, self._wake_write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_read = self._wake_write = -1

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # An empty host listens on both families, like Go exporters do.
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()

    def process_request(self, request, client_address) -> None:
        if not self.connections.admit(id(request), request.fileno()):
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        self.connections.release(id(request))
        super().shutdown_request(request)

    def handle_error(self, request, client_address) -> None:
        # A client's garbage, reset or failed handshake ends its own
        # connection; it is no fault of ours and gets no traceback.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _NotTls(Exception):
    """A plain-HTTP client on the TLS port: answered 400, then closed."""


def make_handler(site: Site) -> type:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"tcpstate/{__version__}"
        # Keep-alive: Prometheus reuses its connection (see IDLE_TIMEOUT_SECONDS).
        protocol_version = "HTTP/1.1"
        timeout = REQUEST_TIMEOUT_SECONDS

        def setup(self) -> None:
            self._key = id(self.request)
            if self.server.tls is not None:
                self.request = self._start_tls(self.request)
            super().setup()
            self.rfile.close()
            self._reader = _RequestReader(self.connection)
            self.rfile = io.BufferedReader(self._reader)

        def _start_tls(self, raw: socket.socket) -> ssl.SSLSocket:
            raw.settimeout(REQUEST_TIMEOUT_SECONDS)
            first = raw.recv(1, socket.MSG_PEEK)
            if first and first[0] != _TLS_HANDSHAKE_RECORD:
                # Read what the client sent first: closing on unread data
                # would reset the connection before it reads the answer.
                try:
                    raw.recv(MAX_HEADER_BYTES, socket.MSG_DONTWAIT)
                except OSError:
                    pass
                raw.sendall(_PLAIN_HTTP_TO_TLS)
                raise _NotTls()
            tls = self.server.tls.wrap_socket(raw, server_side=True,
                                              do_handshake_on_connect=False)
            try:
                tls.do_handshake()
            except BaseException:
                self.server.connections.release(self._key)
                tls.close()
                raise
            return tls

        def handle_one_request(self) -> None:
            self._reader.start_request()
            try:
                super().handle_one_request()
            except http.client.LineTooLong as exc:  # the request line ate the budget
                self.requestline = self.request_version = self.command = ""
                self.send_error(431, str(exc))
                self.close_connection = True
            self.server.connections.waiting(self._key)

        def finish(self) -> None:
            try:
                super().finish()
            finally:
                self.server.connections.release(self._key)
                if self.server.tls is not None:
                    self.connection.close()

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.server.connections.answering(self._key)
            self.connection.settimeout(REQUEST_TIMEOUT_SECONDS)
            reply = site.answer(Request(self.command, self.path, self.headers))
            self.send_response(reply.status)
            for name, value in reply.headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(reply.body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002
            log.debug("%s %s", self.address_string(), format % args)

    return Handler


def bind(listen_address: str, registry: CollectorRegistry, telemetry_path: str,
         web_config: WebConfig | None = None,
         scrape_lock: threading.Lock | None = None) -> _Server:
    host, port = parse_listen_address(listen_address)
    handler = make_handler(Site(registry, telemetry_path, web_config, scrape_lock))
    try:
        return _Server((host, port), handler, web_config.tls if web_config else None)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise TcpstateError(
            f"cannot listen on {listen_address}: {reason or exc}", EXIT_LISTEN
        ) from None
