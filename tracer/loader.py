"""The loader: `python -m tracer.loader FD PARENT`, started by `tcpstate
serve` (tracer/handoff.py). Compiles serve's program with bcc, configures
it, attaches it, seeds the sockets that predate it, hands the descriptors
to the server over the Unix socket FD, and leaves with os._exit(): bcc's
atexit clean-up would disable the perf event of the classic tracepoint,
which the server now shares.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys

from .errors import EXIT_INTERNAL, TcpstateError
from .handoff import die_with_parent, receive, send
from .program import Attachment


def load(request: dict) -> tuple[dict, list[int]]:
    from .probe import Probe

    attachment = Attachment(request["attach"], request["offsets"])
    probe = Probe(service_ports=request["service_ports"],
                  socket_table_size=request["socket_table_size"],
                  seed_live_sockets=request["seed"], attachment=attachment)
    return probe.handoff()


def main(argv: list[str]) -> None:
    fd, parent = int(argv[0]), int(argv[1])
    # The server decides when to stop (a Ctrl-C or systemd's SIGTERM reach
    # the whole group); if it dies, so does this process (PDEATHSIG).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)
    sock = socket.socket(fileno=fd)
    request, _ = receive(sock)
    logging.basicConfig(level=request.get("log_level", logging.INFO), stream=sys.stderr,
                        format="ts=%(asctime)s level=%(levelname)s msg=%(message)s")
    try:
        message, fds = load(request)
    except TcpstateError as exc:
        message, fds = {"error": str(exc), "exit_code": exc.exit_code}, []
    except Exception as exc:  # a bug: one line to the server, which exits 1
        message, fds = {"error": f"internal error in the loader: "
                                 f"{exc.__class__.__name__}: {exc}",
                        "exit_code": EXIT_INTERNAL}, []
    send(sock, message, fds)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
