"""The socket-table query socket of `tcpstate serve`: a root-only Unix
socket (default /run/tcpstate/serve.sock; systemd's RuntimeDirectory=
makes the directory) over which serve hands the socket table's descriptor
(SCM_RIGHTS, as tracer/handoff.py hands the loader's) to `tcpstate sockets`,
which maps the table itself. Nothing is pinned: the table lives as long as
serve holds it.

The socket is made before --run-as drops privileges (the file is root's,
mode 0600, in a directory made 0700), and serve answers only peers with
uid 0 (SO_PEERCRED): after the drop the server can no longer open the
file, but it keeps listening on the descriptor it has.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading

from .errors import EXIT_NO_SERVER, TcpstateError
from .handoff import receive, send

log = logging.getLogger(__name__)

DEFAULT_QUERY_SOCKET = "/run/tcpstate/serve.sock"
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


class NoServer(TcpstateError):
    """No `tcpstate serve` answers on the query socket."""

    exit_code = EXIT_NO_SERVER


class Taken(OSError):
    """Another live serve answers on the path."""


def peer_uid(connection: socket.socket) -> int:
    cred = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    return _PEERCRED.unpack(cred)[1]


class QuerySocket:
    """Listens on `path` and hands `table_fd` with `description` to each
    root peer; start() after the privilege drop (a thread)."""

    def __init__(self, path: str, description: dict, table_fd: int):
        self.path = path
        self._description = description
        self._table_fd = table_fd
        self._thread: threading.Thread | None = None
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        if os.path.exists(path) or os.path.islink(path):
            if _answers(path):
                raise Taken(errno.EADDRINUSE, "another tcpstate serve answers there")
            os.unlink(path)  # a stale socket of a serve that is gone
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # no moment at which others may connect
        try:
            self._listener.bind(path)
        except BaseException:
            self._listener.close()
            raise
        finally:
            os.umask(old_umask)
        self._listener.listen(16)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="tcpstate-query",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EINVAL, errno.EBADF):  # closed: stopping
                    return
                log.warning("query socket %s: accept failed: %s", self.path, exc)
                continue
            with connection:
                try:
                    connection.settimeout(5)
                    if peer_uid(connection) != 0:
                        send(connection, {"error": "only root may read the socket table"})
                        continue
                    send(connection, self._description, [self._table_fd])
                except OSError as exc:
                    log.debug("query socket %s: a client left early: %s", self.path, exc)

    def close(self) -> None:
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self._listener.close()
        if self._thread is not None:
            self._thread.join(2)
        try:
            os.unlink(self.path)
        except OSError:
            pass  # after --run-as the directory is root's: the next start removes it


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
            return True
        except OSError:
            return False


def fetch_table(path: str = DEFAULT_QUERY_SOCKET) -> tuple[dict, int]:
    """The description and the socket table's descriptor from the serve
    that listens on `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        try:
            client.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            raise NoServer(f"no tcpstate serve is running (nothing answers on {path})") from None
        except PermissionError:
            raise NoServer(f"{path}: permission denied: tcpstate sockets needs root") from None
        except OSError as exc:
            raise NoServer(f"cannot reach tcpstate serve on {path}: {exc.strerror}") from None
        description, fds = receive(client)
    if "error" in description:
        for fd in fds:
            os.close(fd)
        raise NoServer(f"tcpstate serve on {path}: {description['error']}")
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        raise NoServer(f"tcpstate serve on {path} sent no socket table")
    return description, fds[0]
