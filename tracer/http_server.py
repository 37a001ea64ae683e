"""The HTTP server of `tcpstate serve`: /metrics, /-/healthy and /.

Every request is answered by one function of the request, `Site.answer`
(status, headers, body), so what is served to whom is decided in one place;
the rest of this module moves bytes and bounds what a client may hold.

The server faces whatever can reach the port (on a node, any pod may try to
starve the one scraper that matters), so it is bounded:
- connections (Admission): at most MAX_CONNECTIONS, one thread each, and at
  most MAX_CONNECTIONS_PER_SOURCE from one address (one more replaces that
  address's longest-idle one, else is refused). A source under its cap is
  always let in: when the server is full, the source holding the most
  connections gives one up (its longest-idle, else its oldest busy one);
- a request's line and headers must arrive within REQUEST_TIMEOUT_SECONDS
  of its first byte and hold at most MAX_HEADER_BYTES (else 431); a kept
  alive connection may idle IDLE_TIMEOUT_SECONDS between requests; a GET
  with a body is refused (400, closed): nothing hides behind it;
- scrapes (SharedScrapes): at most --web.max-requests at once; scrapes that
  arrive together share one encoded (and gzipped, if asked) body; beyond
  the limit a scrape waits briefly for a body being made, else 503. The
  maps are read one scrape at a time (a lock): counters never go back;
- basic auth (tracer.webconfig.BasicAuth): one bcrypt check at a time,
  answers cached; a connection counts busy only once authorized;
- accept() failing for want of file descriptors logs once and backs off.
Handler errors (garbage, resets, failed handshakes) are logged at debug
level and cost only their own connection.
"""

from __future__ import annotations

import errno
import gzip
import html
import http.client
import io
import logging
import os
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Hashable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from . import metrics as m
from .errors import EXIT_LISTEN, TcpstateError, UsageError
from .webconfig import WebConfig, load_web_config

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
# A Prometheus pair needs a connection each; a quarter of the server is
# plenty for any honest source and leaves room for three others as greedy.
MAX_CONNECTIONS_PER_SOURCE = 32
# node_exporter's --web.max-requests default
DEFAULT_MAX_REQUESTS = 40
# How long a scrape beyond --web.max-requests waits for a body being made
SCRAPE_WAIT_SECONDS = 1.0
# accept() out of file descriptors: retry after this, doubling up to the max
ACCEPT_BACKOFF_SECONDS, ACCEPT_BACKOFF_MAX_SECONDS = 0.05, 1.0
MAX_HEADER_BYTES = 64 * 1024
SERVER_HEADER = "tcpstate"
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


def source_of(client_address) -> str:
    """The address a connection comes from; an IPv4 client of a dual-stack
    socket (::ffff:a.b.c.d) is the IPv4 address it is."""
    host = client_address[0] if isinstance(client_address, tuple) else str(client_address)
    return host[7:] if host.startswith("::ffff:") and "." in host else host


# ---- what is answered ------------------------------------------------------
@dataclass(frozen=True)
class Request:
    method: str
    target: str
    headers: Message
    source: str = ""

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


class SharedScrapes:
    """At most `max_requests` scrapes in progress at once, and scrapes in
    progress together share one body: the first one of a format renders it,
    the others wait for it. A scrape beyond the limit waits up to
    `wait_seconds` for a body being rendered (or a free place), else is
    refused (None: a 503). A shared body was rendered after its sharers'
    previous scrapes, so their counters still never go back."""

    def __init__(self, render: Callable[[Hashable], bytes], max_requests: int,
                 wait_seconds: float = SCRAPE_WAIT_SECONDS):
        self.render = render
        self.max_requests = max_requests
        self.wait_seconds = wait_seconds
        self._cond = threading.Condition()
        self._inside = 0
        self._rendering: dict[Hashable, _Rendering] = {}
        self.rendered = 0  # bodies rendered
        self.refused = 0   # scrapes answered 503

    def body(self, key: Hashable) -> bytes | None:
        with self._cond:
            deadline = None
            while self._inside >= self.max_requests:
                rendering = self._rendering.get(key)
                if rendering is not None:  # sharing costs only the wait
                    return self._wait_for(rendering)
                deadline = deadline or time.monotonic() + self.wait_seconds
                left = deadline - time.monotonic()
                if left <= 0:
                    self.refused += 1
                    return None
                self._cond.wait(left)
            self._inside += 1
            try:
                rendering = self._rendering.get(key)
                if rendering is not None:
                    return self._wait_for(rendering)
                return self._render(key)
            finally:
                self._inside -= 1
                self._cond.notify_all()

    def _wait_for(self, rendering: "_Rendering") -> bytes:
        while not rendering.done:
            self._cond.wait()
        if rendering.error is not None:
            raise rendering.error
        return rendering.body

    def _render(self, key: Hashable) -> bytes:
        rendering = self._rendering[key] = _Rendering()
        self._cond.release()
        try:
            rendering.body = self.render(key)
        except Exception as exc:  # every sharer fails alike
            rendering.error = exc
        finally:
            self._cond.acquire()
            rendering.done = True
            del self._rendering[key]
            self.rendered += 1
            self._cond.notify_all()
        if rendering.error is not None:
            raise rendering.error
        return rendering.body


class _Rendering:
    done = False
    body = b""
    error: Exception | None = None


class Site:
    """The answers: authentication, routing, the scrape and the headers
    every reply, an error page included, carries. The web configuration
    can be swapped whole (a reload) while requests are answered."""

    def __init__(self, registry: CollectorRegistry, telemetry_path: str,
                 web_config: WebConfig | None = None,
                 scrape_lock: threading.Lock | None = None,
                 max_requests: int = DEFAULT_MAX_REQUESTS):
        self.registry = registry
        self.telemetry_path = telemetry_path
        self.web_config = web_config
        self.scrape_lock = scrape_lock or threading.Lock()
        self.scrapes = SharedScrapes(self._render, max_requests)
        self._encoders: dict[str, Callable] = {}
        self.landing = (
            "<html><head><title>tcpstate</title></head><body><h1>tcpstate</h1>"
            f'<p><a href="{html.escape(telemetry_path)}">Metrics</a></p></body></html>'
        ).encode()

    def answer(self, request: Request, authorized: Callable[[], None] = lambda: None) -> Reply:
        """`authorized` is called once the request passed authentication,
        before any work for it: from then on its connection counts busy."""
        config = self.web_config  # one configuration for the whole request
        auth = config.auth if config else None
        if auth is not None and not auth.allows(request.headers.get("Authorization"),
                                                request.source):
            return self._reply(401, b"Unauthorized\n", _TEXT, config,
                               {"WWW-Authenticate": 'Basic realm="tcpstate"'})
        authorized()
        path = request.path
        if path == self.telemetry_path:
            return self._scrape(request, config)
        if path == HEALTH_PATH:
            return self._reply(200, b"OK\n", _TEXT, config)
        if path == "/":
            return self._reply(200, self.landing, "text/html; charset=utf-8", config)
        return self._reply(404, b"Not Found\n", _TEXT, config)

    def error(self, status: int) -> Reply:
        """A request that could not be read or is refused: a short page with
        the configured headers, its connection to be closed."""
        phrase = HTTPStatus(status).phrase
        return self._reply(status, f"{status} {phrase}\n".encode(), _TEXT, self.web_config,
                           {"Connection": "close"})

    def _scrape(self, request: Request, config: WebConfig | None) -> Reply:
        encoder, content_type = choose_encoder(request.headers.get("Accept"))
        self._encoders.setdefault(content_type, encoder)
        compress = _gzip_accepted(request.headers.get("Accept-Encoding", ""))
        body = self.scrapes.body((content_type, compress))
        if body is None:
            return self._reply(503, b"Too many scrapes at once, try again\n", _TEXT, config,
                               {"Retry-After": "1"})
        extra = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"} if compress \
            else {"Vary": "Accept-Encoding"}
        return self._reply(200, body, content_type, config, extra)

    def _render(self, key: tuple[str, bool]) -> bytes:
        content_type, compress = key
        with self.scrape_lock:
            body = self._encoders[content_type](self.registry)
        return gzip.compress(body, compresslevel=1) if compress else body

    @staticmethod
    def _reply(status: int, body: bytes, content_type: str, config: WebConfig | None,
               headers: dict[str, str] | None = None) -> Reply:
        configured = config.headers if config else {}
        return Reply(status, (("Content-Type", content_type),
                              ("Content-Length", str(len(body))),
                              *{**configured, **(headers or {})}.items()), body)


def _gzip_accepted(accept_encoding: str) -> bool:
    """gzip listed, and not with q=0."""
    for part in accept_encoding.split(","):
        coding, *params = part.split(";")
        if coding.strip().lower() != "gzip":
            continue
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.strip().lower() == "q":
                try:
                    return float(value) > 0
                except ValueError:
                    return False
        return True
    return False


# ---- who may hold a connection ---------------------------------------------
@dataclass
class _Open:
    source: str
    since: float   # idle since (a waiting connection), or busy since
    busy: bool
    handle: object


class Admission:
    """Which connection is let in, and which one makes room for it.

    A source (an address) holds at most `per_source` connections: one more
    replaces that source's longest-idle connection (waiting for a request,
    or for its credentials to be checked), else is refused. A source under
    its cap is always let in: when all `limit` places are taken, the source
    holding the most connections gives up one, its longest-idle, else its
    longest-busy one (a slow reader of a reply). So a flood from a few
    addresses costs the other addresses nothing.

    Pure bookkeeping: the caller sheds the `handle` admit() returns."""

    def __init__(self, limit: int = MAX_CONNECTIONS,
                 per_source: int = MAX_CONNECTIONS_PER_SOURCE):
        self.limit, self.per_source = limit, per_source
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Open] = {}
        self._held: Counter[str] = Counter()
        self.refused = 0
        self.shed = 0

    def admit(self, key: Hashable, source: str, handle: object = None,
              now: float | None = None) -> tuple[bool, object | None]:
        """(let in?, the handle of the connection to shed for it, or None)"""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._held[source] >= self.per_source:
                # at its cap, a source may replace one of its own idle ones
                victim_key = self._longest_idle(source)
                if victim_key is None:
                    self.refused += 1
                    return False, None
            elif len(self._open) >= self.limit:
                greediest = max(self._held, key=self._held.__getitem__)
                victim_key = self._longest_idle(greediest)
                if victim_key is None:
                    victim_key = min((k for k, c in self._open.items() if c.source == greediest),
                                     key=lambda k: self._open[k].since)
            else:
                victim_key = None
            victim = None
            if victim_key is not None:
                victim = self._forget(victim_key).handle
                self.shed += 1
            self._open[key] = _Open(source, now, False, handle)
            self._held[source] += 1
            return True, victim

    def _longest_idle(self, source: str) -> Hashable | None:
        idle = [k for k, c in self._open.items() if c.source == source and not c.busy]
        return min(idle, key=lambda k: self._open[k].since) if idle else None

    def busy(self, key: Hashable, now: float | None = None) -> None:
        with self._lock:
            if key in self._open:
                self._open[key].busy = True
                self._open[key].since = time.monotonic() if now is None else now

    def idle(self, key: Hashable, now: float | None = None) -> None:
        with self._lock:
            if key in self._open:
                self._open[key].busy = False
                self._open[key].since = time.monotonic() if now is None else now

    def rehandle(self, key: Hashable, handle: object) -> None:
        with self._lock:
            if key in self._open:
                self._open[key].handle = handle

    def release(self, key: Hashable) -> None:
        """Before the socket is closed: a freed descriptor number must never
        be shed on behalf of the connection that had it."""
        with self._lock:
            if key in self._open:
                self._forget(key)

    def held_by(self, source: str) -> int:
        with self._lock:
            return self._held[source]

    def _forget(self, key: Hashable) -> _Open:
        entry = self._open.pop(key)
        self._held[entry.source] -= 1
        if not self._held[entry.source]:
            del self._held[entry.source]
        return entry

    def handles(self) -> list:
        with self._lock:
            return [entry.handle for entry in self._open.values()]


def _shut(connection: socket.socket) -> None:
    """Wake the thread blocked on this connection: it reads end-of-file.
    By the socket object, never its descriptor number: its own thread may
    have closed it meanwhile, and the number may belong to another
    connection by now. The plain socket's shutdown, also for TLS: the
    connection is ending, there is no TLS goodbye to say."""
    try:
        socket.socket.shutdown(connection, socket.SHUT_RDWR)
    except OSError:  # closed already
        pass


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

    def __init__(self, address: tuple[str, int], handler, site: Site):
        host = address[0]
        self.address_family = socket.AF_INET6 if ":" in host or host == "" else socket.AF_INET
        self.site = site
        self.connections = Admission()
        self.accept_failures = 0
        # before binding: a failed bind calls server_close(), which closes it
        self._wake_read, self._wake_write = os.pipe()
        super().__init__((host or "::", address[1]), handler)

    @property
    def tls(self) -> ssl.SSLContext | None:
        config = self.site.web_config
        return config.tls if config else None

    def serve_until_stopped(self) -> None:
        """Accept connections until stop(). Blocks in one select on the
        listening socket and a pipe, so an idle exporter sleeps until a
        scraper connects (serve_forever would wake every poll interval to
        look at its shutdown flag)."""
        backoff = 0.0
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_read, selectors.EVENT_READ)
            selector.register(self, selectors.EVENT_READ)
            while True:
                if backoff:  # the listening socket stays readable: sleep instead
                    selector.unregister(self)
                    stopped = selector.select(backoff)
                    selector.register(self, selectors.EVENT_READ)
                    if stopped:
                        return
                ready = {key.fileobj for key, _ in selector.select()}
                if self._wake_read in ready:
                    return
                backoff = self._accept_one(backoff)

    def _accept_one(self, backoff: float) -> float:
        """Accept and start one connection; the backoff to wait next."""
        try:
            request, client_address = self.get_request()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self.accept_failures += 1
                if not backoff:  # once per episode, not once per retry
                    log.warning("cannot accept connections: %s; retrying with a backoff "
                                "(raise the open files limit?)", exc.strerror)
                return min(max(2 * backoff, ACCEPT_BACKOFF_SECONDS), ACCEPT_BACKOFF_MAX_SECONDS)
            return 0.0  # EAGAIN, ECONNABORTED: the client left
        if backoff:
            log.info("accepting connections again")
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        return 0.0

    def stop(self) -> None:
        """Make serve_until_stopped() return (from another thread), and wake
        every connection's thread: each reads end-of-file and ends."""
        os.write(self._wake_write, b"x")
        for connection in self.connections.handles():
            _shut(connection)

    def reload(self) -> bool:
        """Read --web.config.file again (SIGHUP): the new file and its
        certificates are swapped in whole, or the old ones stay."""
        config = self.site.web_config
        if config is None:
            log.info("reload asked, but there is no --web.config.file to read")
            return False
        try:
            new = load_web_config(str(config.path))
        except Exception as exc:  # whatever the file holds: one line, keep serving
            log.error("reload of %s failed, the previous configuration stays: %s",
                      config.path, exc)
            return False
        self.site.web_config = new
        for warning in new.warnings():
            log.warning("%s", warning)
        log.info("reloaded %s (%s%s)", new.path, new.scheme,
                 ", basic auth" if new.auth else "")
        return True

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
        admitted, victim = self.connections.admit(id(request), source_of(client_address),
                                                  request)
        if victim is not None:
            _shut(victim)
            log.debug("connection limit %d reached: shed one of the greediest source",
                      self.connections.limit)
        if not admitted:
            super().shutdown_request(request)
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


class _Handler(BaseHTTPRequestHandler):
    # Keep-alive: Prometheus reuses its connection (see IDLE_TIMEOUT_SECONDS).
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT_SECONDS
    server: _Server

    def version_string(self) -> str:
        return SERVER_HEADER  # no version: nothing to look up a weakness by

    def setup(self) -> None:
        self._key = id(self.request)
        self._source = source_of(self.client_address)
        tls = self.server.tls
        if tls is not None:
            self.request = self._start_tls(self.request, tls)
        super().setup()
        self.rfile.close()
        self._reader = _RequestReader(self.connection)
        self.rfile = io.BufferedReader(self._reader)

    def _start_tls(self, raw: socket.socket, context: ssl.SSLContext) -> ssl.SSLSocket:
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
        tls = context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self.server.connections.rehandle(self._key, tls)  # wrapping emptied `raw`
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
        except http.client.LineTooLong:  # the request line ate the budget
            self.requestline = self.request_version = self.command = ""
            self.send_error(431)
        self.server.connections.idle(self._key)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.connections.release(self._key)
            if isinstance(self.connection, ssl.SSLSocket):
                self.connection.close()

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        # A GET has no body: one announced may hide a second request that a
        # proxy in front took for the body (request smuggling).
        if "Transfer-Encoding" in self.headers or \
                self.headers.get("Content-Length", "0").strip() != "0":
            self.send_error(400)
            return
        self.connection.settimeout(REQUEST_TIMEOUT_SECONDS)
        reply = self.server.site.answer(
            Request(self.command, self.path, self.headers, self._source),
            authorized=lambda: self.server.connections.busy(self._key))
        self._send(reply)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's error page, but plain, with the configured headers,
        and the connection closed after it."""
        self.log_error("code %d, message %s", code, message)
        self.close_connection = True
        try:
            self._send(self.server.site.error(code))
        except ValueError:  # e.g. no status line to answer in (HTTP/0.9)
            pass

    def _send(self, reply: Reply) -> None:
        self.send_response(reply.status)
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and reply.status >= 200 and reply.status not in (204, 304):
            self.wfile.write(reply.body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("%s %s", self.address_string(), format % args)


class FrontCollector(Collector):
    """What the HTTP front turned away, so that nothing it drops is silent:
    connections refused or shed by the admission policy, scrapes answered
    503, accepts that failed (out of descriptors)."""

    def __init__(self, server: "_Server"):
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        for name, value, text in (
            (m.HTTP_CONNECTIONS_REFUSED, server.connections.refused,
             "Connections closed at once: their source held its cap of connections, "
             "none of them idle."),
            (m.HTTP_CONNECTIONS_SHED, server.connections.shed,
             "Connections closed to admit another: the server was full (from the source "
             "holding the most) or the source was at its cap (its longest-idle one)."),
            (m.HTTP_SCRAPES_REFUSED, server.site.scrapes.refused,
             "Scrapes answered 503: --web.max-requests were being answered and no body "
             "being made could be shared in time."),
            (m.HTTP_ACCEPT_FAILURES, server.accept_failures,
             "Connections the kernel could not hand over (out of file descriptors): the "
             "server backed off."),
        ):
            yield CounterMetricFamily(m.family_name(name), text, value=value)


def bind(listen_address: str, registry: CollectorRegistry, telemetry_path: str,
         web_config: WebConfig | None = None,
         scrape_lock: threading.Lock | None = None,
         max_requests: int = DEFAULT_MAX_REQUESTS) -> _Server:
    host, port = parse_listen_address(listen_address)
    site = Site(registry, telemetry_path, web_config, scrape_lock, max_requests)
    try:
        server = _Server((host, port), _Handler, site)
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise TcpstateError(
            f"cannot listen on {listen_address}: {reason or exc}", EXIT_LISTEN
        ) from None
    for warning in web_config.warnings() if web_config else ():
        log.warning("%s", warning)
    registry.register(FrontCollector(server))
    return server
