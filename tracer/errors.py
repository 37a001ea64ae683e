"""Errors a user can cause or fix, each with its own documented exit code.

cli.main() prints `tcpstate: <message>` on one line and exits with the code;
nothing else reaches the user as a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1       # a bug: please report it
EXIT_USAGE = 2          # unknown flag, bad value, malformed config
EXIT_PRIVILEGES = 3     # not root and no CAP_BPF + CAP_PERFMON
EXIT_TRACEFS = 4        # tracefs not mounted and cannot be
EXIT_HEADERS = 5        # no kernel headers for bcc
EXIT_TRACEPOINT = 6     # the tracepoint does not exist on this kernel
EXIT_LISTEN = 7         # the listen address is in use or cannot be bound
EXIT_BPF = 8            # the kernel refused to load or attach the program
EXIT_KERNEL_VERSION = 9  # the kernel lacks a BPF feature (or version) the command needs
EXIT_NO_SERVER = 10     # tcpstate sockets: no tcpstate serve answers on the query socket

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error",
    EXIT_USAGE: "bad command line, flag value or configuration file",
    EXIT_PRIVILEGES: "not enough privileges",
    EXIT_TRACEFS: "tracefs missing",
    EXIT_HEADERS: "kernel headers missing",
    EXIT_TRACEPOINT: "tracepoint missing",
    EXIT_LISTEN: "cannot listen on the web address",
    EXIT_BPF: "BPF program failed to load or attach",
    EXIT_KERNEL_VERSION: "kernel lacks a feature the command needs",
    EXIT_NO_SERVER: "no tcpstate serve answers on the query socket",
}


class TcpstateError(Exception):
    """An error with a one-line message and an exit code."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(TcpstateError):
    exit_code = EXIT_USAGE


class PrerequisiteError(TcpstateError):
    """A missing privilege, file system or kernel feature."""
