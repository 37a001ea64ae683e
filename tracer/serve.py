"""`tcpstate serve`: the Prometheus exporter.

Has the BPF program compiled, loaded and attached by a short-lived loader
process and holds its descriptors (tracer.held), so that this process never
maps bcc or LLVM; registers a collector that reads the maps at scrape time
(tracer.collector) in a private registry, and serves the exposition over
HTTP until SIGTERM or SIGINT. No Python code runs per event.

The HTTP server is tracer.http_server.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Callable

from prometheus_client import CollectorRegistry

from .collector import TcpstateCollector
from .http_server import DEFAULT_MAX_REQUESTS, bind
from .handoff import Loading, loader_request
from .held import HeldProgram
from .program import choose_attachment
from .webconfig import WebConfig

log = logging.getLogger(__name__)

# SIGHUP reloads --web.config.file; the others stop.
_CONTROL_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
# The duration sums are read this often between scrapes, so that none
# wraps unseen (tracer.maps.WrappingSums).
SUMS_REFRESH_SECONDS = 60


class _RepeatsOnce(logging.Filter):
    """A collector part that fails at every scrape (an unreadable
    /proc, say) is logged once, not every 15 seconds; its
    failure stays visible in tcpstate_scrape_collector_success."""

    def __init__(self) -> None:
        super().__init__()
        self._last = ""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        repeated, self._last = message == self._last, message
        return not repeated


def _warn_unreadable(web_config: WebConfig | None, user: str) -> None:
    """After --run-as, a reload (SIGHUP) reads the web config and its
    certificates as `user`: say now which it could not."""
    if web_config is None:
        return
    unreadable = [str(path) for path in web_config.files if not os.access(path, os.R_OK)]
    if unreadable:
        log.warning("--web.config.file: %s cannot read %s: a reload (SIGHUP) will fail and "
                    "keep the current configuration (make them readable by %s, e.g. group "
                    "%s and mode 0640)", user, ", ".join(unreadable), user, user)


def _open_query_socket(path: str, probe: HeldProgram):
    """The query socket, or None (with one warning) when it cannot be made:
    metrics matter more than `tcpstate sockets`."""
    from .query_socket import QuerySocket

    description = {"rows": probe.table_capacity // probe.table_ways,
                   "ways": probe.table_ways, "port_labels": list(probe.port_labels),
                   "serve_pid": os.getpid()}
    try:
        query = QuerySocket(path, description, probe.table_fd)
    except OSError as exc:
        log.warning("no query socket at %s (%s): `tcpstate sockets` cannot reach this serve",
                    path, exc.strerror or exc)
        return None
    log.info("socket table answers `tcpstate sockets` on %s", path)
    return query


def serve(
    listen_address: str,
    telemetry_path: str,
    service_ports: tuple[int, ...],
    socket_table_size: int,
    dry_run: bool = False,
    web_config: WebConfig | None = None,
    run_as=None,
    report: Callable[[str], None] = print,
    max_requests: int = DEFAULT_MAX_REQUESTS,
    loading: Loading | None = None,
    features: str = "",
    query_socket: str | None = None,
) -> int:
    """`run_as` is a pwd entry (tracer.privileges.lookup_user) or None;
    `query_socket` the path `tcpstate sockets` asks for the socket table
    (None: none)."""
    # A signal goes to any thread that does not block it, and Python runs
    # its handler only when the main thread next wakes: with the HTTP threads
    # busy (a flood) a SIGTERM could wait an hour. So the signals are blocked
    # before any thread starts (threads inherit the mask), and the main
    # thread takes them synchronously; one sent while loading waits for it.
    signal.pthread_sigmask(signal.SIG_BLOCK, _CONTROL_SIGNALS)
    logging.getLogger("tracer.collector").addFilter(_RepeatsOnce())

    registry = CollectorRegistry(auto_describe=True)
    scrape_lock = threading.Lock()
    # The loader is at work already (tracer/cli.py starts it first): a busy
    # port stops it, with nothing left attached.
    if loading is None:
        loading = Loading(loader_request(service_ports, socket_table_size,
                                         choose_attachment()))
    try:
        server = None if dry_run else bind(listen_address, registry, telemetry_path,
                                           web_config, scrape_lock, max_requests)
    except BaseException:
        loading.cancel()
        raise
    try:
        probe = HeldProgram(*loading.finish())
    except BaseException:
        if server is not None:
            server.server_close()
        raise
    query = None
    try:
        if query_socket and not dry_run:
            query = _open_query_socket(query_socket, probe)  # before the drop: root's
        collector = TcpstateCollector(probe, bcc_version=probe.bcc_version,
                                      attach=probe.attach_kind)
        registry.register(collector)
        stats = probe.prog_stats()
        loaded = (
            f"loaded and attached to the {probe.attachment.describe()} in "
            f"{time.monotonic() - loading.started:.2f}s (prog id {stats.get('prog_id')}, "
            f"socket table {probe.table_capacity} sockets, "
            f"loader peak {probe.loader_peak_kib / 1024:.0f} MiB, "
            f"service ports {','.join(map(str, service_ports)) or 'none'})"
            + (f"; {features}" if features else "")
        )
        if run_as is not None:
            from .privileges import drop_to

            drop_to(run_as)
            log.info("running as %s with no capabilities", run_as.pw_name)
            _warn_unreadable(web_config, run_as.pw_name)
        if dry_run:
            probe.read()
            probe.time_wait()
            report(f"tcpstate: dry run ok: {loaded}; maps readable")
            return 0
        log.info("%s", loaded)
        if query is not None:
            query.start()
        thread = threading.Thread(target=server.serve_until_stopped, name="tcpstate-http",
                                  daemon=True)
        thread.start()
        log.info("serving %s on %s://%s", telemetry_path,
                 web_config.scheme if web_config else "http", listen_address)
        while True:  # idle, the process sleeps here
            received = signal.sigtimedwait(_CONTROL_SIGNALS, SUMS_REFRESH_SECONDS)
            if received is None:
                with scrape_lock:
                    probe.refresh_sums()
            elif received.si_signo == signal.SIGHUP:
                server.reload()
            else:
                break
        log.info("received %s, stopping", signal.Signals(received.si_signo).name)
        server.stop()
        thread.join(5)
        return 0
    finally:
        if query is not None:
            query.close()
        if server is not None:
            server.server_close()
        with scrape_lock:  # a scrape in flight finishes before the maps close
            probe.close()
