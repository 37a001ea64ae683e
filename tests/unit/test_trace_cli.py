"""`tcpstate trace` flags: repeats and comma lists OR, bad values get one
line naming what is valid and exit 2, before anything is loaded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tracer.cli import build_parser
from tracer.errors import EXIT_USAGE
from tracer.reasons import CODE as REASON_CODE
from tracer.states import BY_NAME
from tracer.trace import DEFAULT_RINGBUF_PAGES, Filters

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))


def filters(*argv: str) -> Filters:
    return Filters.from_args(build_parser().parse_args(["trace", *argv]))


def test_defaults_filter_nothing():
    args = build_parser().parse_args(["trace"])
    assert args.ringbuf_pages == DEFAULT_RINGBUF_PAGES
    assert not args.json and args.count is None and args.duration is None
    assert args.log_level == "info"
    assert filters().describe() == "none"


def test_repeats_and_comma_lists_or_their_values():
    parsed = filters("--port", "80,443", "--port", "8080", "--lport", "1", "--rport", "2,3",
                     "--pid", "10", "--pid", "11,12", "--state", "close_wait",
                     "--state", "SYN-SENT,listen", "--transition", "syn_sent:close",
                     "--transition", "ESTABLISHED:close_wait", "-4", "-6", "--min-ms", "1.5")
    assert parsed.ports == {80, 443, 8080}
    assert parsed.lports == {1} and parsed.rports == {2, 3}
    assert parsed.pids == {10, 11, 12}
    assert parsed.states == {"close_wait", "syn_sent", "listen"}
    assert parsed.transitions == {("syn_sent", "close"), ("established", "close_wait")}
    assert parsed.families == {"ipv4", "ipv6"}
    assert parsed.min_ms == 1.5
    assert parsed.describe() == (
        "port=443,80,8080 lport=1 rport=2,3 pid=10,11,12 family=ipv4,ipv6 "
        "state=close_wait,listen,syn_sent transition=established:close_wait,syn_sent:close "
        "min-ms=1.5")


def test_reasons_filter_to_a_kernel_mask():
    args = build_parser().parse_args(["trace", "--reason", "refused,timeout",
                                      "--reason", "no_local_port"])
    filters = Filters.from_args(args)
    assert filters.reasons == {"refused", "timeout", "no_local_port"}
    assert filters.describe() == "reason=no_local_port,refused,timeout"
    mask = filters.kernel_filter().reason_mask
    assert mask == sum(1 << REASON_CODE[r] for r in ("refused", "timeout", "no_local_port"))
    assert Filters.from_args(build_parser().parse_args(["trace"])).kernel_filter().reason_mask == 0


def test_stop_conditions_and_output_flags():
    args = build_parser().parse_args(["trace", "--count", "5", "--duration", "2.5", "--json",
                                      "--ringbuf-pages", "64"])
    assert (args.count, args.duration, args.json, args.ringbuf_pages) == (5, 2.5, True, 64)


@pytest.mark.parametrize("argv, message", [
    (["--state", "closed_wait"], "unknown state 'closed_wait'; valid states: close, listen,"),
    (["--transition", "established"], "'established' is not OLD:NEW"),
    (["--transition", "established:bogus"], "unknown state 'bogus'; valid states:"),
    (["--port", "70000"], "'70000' is not a port number 1-65535"),
    (["--lport", "0"], "'0' is not a port number 1-65535"),
    (["--rport", "80,http"], "'http' is not a port number 1-65535"),
    (["--pid=-3"], "'-3' is not a process id"),
    (["--pid", "0"], "'0' is not a process id"),
    (["--count", "0"], "'0' must be at least 1"),
    (["--duration", "0"], "'0' must be more than 0"),
    (["--min-ms", "soon"], "'soon' is not a number"),
    (["--min-ms", "nan"], "'nan' must be more than 0"),
    (["--ringbuf-pages", "3"], "'3' must be a power of two from 1 to 65536"),
    (["--ringbuf-pages", "131072"], "must be a power of two"),
    (["--reason", "refused,timeout,nope"], "unknown reason 'nope'; valid reasons: normal, "
                                          "refused, timeout, unreachable, reset_by_peer, "
                                          "reset_local, cancelled, no_local_port, other"),
])
def test_bad_values_one_line_exit_2(argv, message):
    result = subprocess.run([TCPSTATE, "trace", *argv], capture_output=True, text=True)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert lines[0].startswith("tcpstate trace: error: argument ")


def test_an_unknown_state_lists_every_valid_name():
    result = subprocess.run([TCPSTATE, "trace", "--state", "nope"], capture_output=True,
                            text=True)
    assert all(name in result.stderr for name in BY_NAME)


def test_too_many_pids_is_a_usage_error():
    pids = ",".join(str(p) for p in range(1, 1100))
    result = subprocess.run([TCPSTATE, "trace", "--pid", pids], capture_output=True, text=True)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == "tcpstate: --pid: at most 1024 processes"
