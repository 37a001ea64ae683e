"""tcpstate: the TCP connection life-cycle of this host, from eBPF.

Every error a user can cause ends in one line on stderr and a documented
exit code (tracer.errors); tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import NoReturn, Sequence

# Before numpy is imported: its OpenBLAS would start a thread per core,
# which tcpstate never uses, and --run-as must drop privileges while the
# process has one thread (capability sets are per thread).
os.environ["OPENBLAS_NUM_THREADS"] = "1"

from . import __version__  # noqa: E402 (after the environment is set)
from .errors import EXIT_INTERNAL, EXIT_USAGE, TcpstateError, UsageError
from .program import DEFAULT_SOCKET_TABLE_SIZE, parse_service_ports, table_rows

LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
              "error": logging.ERROR}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not usage plus message."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes some values raw: a newline in one must not make two lines
        message = message.replace("\r", "\\r").replace("\n", "\\n")
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _service_ports(text: str) -> tuple[int, ...]:
    try:
        return parse_service_ports(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None


def _socket_table_size(text: str) -> int:
    value = _positive_int(text)
    try:
        table_rows(value)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(" must ", 1)[-1].join(("must ", ""))) from None
    return value


def _telemetry_path(text: str) -> str:
    if not text.startswith("/") or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"{text!r} must be a path starting with /")
    return text


def _without_flag(exc: UsageError, flag: str) -> argparse.ArgumentTypeError:
    """argparse names the flag itself: drop it from our message."""
    message = str(exc)
    if message.startswith(flag):
        message = message[len(flag):].lstrip(": ")
    return argparse.ArgumentTypeError(message)


def _listen_address(text: str) -> str:
    from .http_server import parse_listen_address

    try:
        parse_listen_address(text)
    except UsageError as exc:
        raise _without_flag(exc, "--web.listen-address") from None
    return text


def _max_requests(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10_000:
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number from 1 to 10000")
    return int(text)


def _web_config(text: str):
    from .webconfig import FLAG, load_web_config

    try:
        return load_web_config(text)
    except UsageError as exc:
        raise _without_flag(exc, FLAG) from None
    except Exception as exc:  # whatever the file holds, one line, never a traceback
        raise argparse.ArgumentTypeError(
            f"cannot load {text!r}: {exc.__class__.__name__}") from None


def _run_as(text: str):
    from .privileges import lookup_user

    try:
        return lookup_user(text)
    except UsageError as exc:
        raise _without_flag(exc, "--run-as") from None


def _query_socket_path(flag: str | None) -> str | None:
    from .query_socket import DEFAULT_QUERY_SOCKET

    if flag is None:
        return DEFAULT_QUERY_SOCKET
    return None if flag == "none" else flag


def build_parser() -> argparse.ArgumentParser:
    from .http_server import DEFAULT_LISTEN_ADDRESS, DEFAULT_MAX_REQUESTS

    parser = _Parser(prog="tcpstate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"tcpstate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    from .program import REASONS_NEED

    serve = commands.add_parser(
        "serve", help="export TCP state metrics for Prometheus",
        description="Export TCP state metrics for Prometheus, closes by reason among them "
                    f"(tcpstate_closes_total); {REASONS_NEED}.")
    serve.add_argument("--web.listen-address", dest="listen_address",
                       default=DEFAULT_LISTEN_ADDRESS, metavar="HOST:PORT", type=_listen_address,
                       help=f"address to serve metrics on (default {DEFAULT_LISTEN_ADDRESS})")
    serve.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                       type=_telemetry_path, metavar="PATH",
                       help="path of the metrics (default /metrics)")
    serve.add_argument("--service-ports", type=_service_ports, default=(), metavar="PORT,...",
                       help="label transitions of sockets on these ports with port=PORT, "
                            "all others port=other (default: no port label)")
    serve.add_argument("--socket-table-size", type=_socket_table_size,
                       default=DEFAULT_SOCKET_TABLE_SIZE, metavar="N",
                       help=f"sockets tracked for durations (default {DEFAULT_SOCKET_TABLE_SIZE})")
    serve.add_argument("--web.config.file", dest="web_config", type=_web_config, default=None,
                       metavar="FILE",
                       help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    serve.add_argument("--web.max-requests", dest="max_requests", type=_max_requests,
                       default=DEFAULT_MAX_REQUESTS, metavar="N",
                       help="scrapes answered at once; more wait briefly for a shared "
                            f"body, else get 503 (default {DEFAULT_MAX_REQUESTS})")
    serve.add_argument("--run-as", dest="run_as", type=_run_as, default=None, metavar="USER",
                       help="once attached, become USER with no capabilities "
                            "(`ip netns` namespaces no process is in are then left out "
                            "of the TIME-WAIT gauge)")
    serve.add_argument("--query-socket", dest="query_socket", default=None, metavar="PATH",
                       help="root-only Unix socket on which `tcpstate sockets` is handed the "
                            "socket table (default /run/tcpstate/serve.sock; `none`: no "
                            "socket)")
    _add_attach(serve)
    serve.add_argument("--dry-run", action="store_true",
                       help="check prerequisites, load, attach, read the maps once, and exit")
    _add_log_level(serve)

    from .trace import add_trace_parser

    trace = add_trace_parser(commands)
    _add_attach(trace)
    _add_log_level(trace)

    from .sockets import add_sockets_parser

    add_sockets_parser(commands)
    return parser


def _add_attach(parser: argparse.ArgumentParser) -> None:
    from .program import ATTACH_CHOICES, AUTO

    parser.add_argument(
        "--attach", choices=ATTACH_CHOICES, default=AUTO,
        help="raw_tracepoint: no map read or other BPF program makes the kernel skip "
             "events (needs BTF, /sys/kernel/btf/vmlinux); tracepoint: the classic "
             "tracepoint, for kernels without BTF; auto (default): the raw tracepoint "
             "where BTF allows")


def _add_log_level(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log.level", dest="log_level", choices=sorted(LOG_LEVELS),
                        default="info", help="log verbosity (default info)")


def run(args: argparse.Namespace) -> int:
    if args.command == "sockets":  # reads serve's table: no BPF, no prerequisites
        from .sockets import sockets_command

        return sockets_command(args)
    from .prereq import SERVE_NEEDS, check_all, kernel_features

    logging.basicConfig(
        level=LOG_LEVELS[args.log_level], stream=sys.stderr,
        format="ts=%(asctime)s level=%(levelname)s msg=%(message)s",
    )
    if args.command == "serve":
        from .handoff import Loading, loader_request
        from .program import choose_attachment, warn_if_reasons_off

        features = kernel_features()
        attachment = choose_attachment(args.attach, features=features)
        check_all(needs=SERVE_NEEDS, features=features, attach=attachment.kind)
        warn_if_reasons_off(attachment)  # after the checks: a failing one is the only line
        # The loader compiles while this process imports the server's
        # modules (numpy, prometheus_client): on two cores, at once.
        loading = Loading(loader_request(args.service_ports, args.socket_table_size,
                                         attachment))
        if args.dry_run:
            print(f"tcpstate: {features.summary()}")
        from .serve import serve

        code = serve(
            loading=loading,
            features=features.summary(),
            listen_address=args.listen_address,
            telemetry_path=args.telemetry_path,
            service_ports=args.service_ports,
            socket_table_size=args.socket_table_size,
            dry_run=args.dry_run,
            web_config=args.web_config,
            run_as=args.run_as,
            max_requests=args.max_requests,
            query_socket=_query_socket_path(args.query_socket),
        )
        if not args.dry_run:
            # Stopped and detached. Connection threads may still be inside
            # bcrypt or a write: exit now rather than let interpreter
            # shutdown race them (a daemon thread holding stderr's lock
            # aborts the process).
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    if args.command == "trace":
        from .trace import trace

        return trace(args)
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except TcpstateError as exc:
        sys.stderr.write(f"tcpstate: {exc}\n")
        return exc.exit_code
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a bug: keep it short, say how to see more
        logging.getLogger(__name__).debug("internal error", exc_info=True)
        sys.stderr.write(
            f"tcpstate: internal error: {exc.__class__.__name__}: {exc} "
            "(run with --log.level debug for details)\n"
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
