"""Flag parsing: good values parse, bad ones get one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tracer.cli import build_parser
from tracer.errors import EXIT_USAGE
from tracer.http_server import DEFAULT_PORT, parse_listen_address

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))


def test_defaults():
    args = build_parser().parse_args(["serve"])
    assert args.listen_address == f":{DEFAULT_PORT}"
    assert args.telemetry_path == "/metrics"
    assert args.service_ports == ()
    assert args.socket_table_size == 262_144
    assert args.log_level == "info" and not args.dry_run


def test_service_ports_parse_and_deduplicate():
    args = build_parser().parse_args(["serve", "--service-ports", "443, 80,443"])
    assert args.service_ports == (443, 80)


@pytest.mark.parametrize("address, parsed", [
    (":9814", ("", 9814)), ("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:9", ("::1", 9)),
])
def test_listen_addresses(address, parsed):
    assert parse_listen_address(address) == parsed


@pytest.mark.parametrize("argv, message", [
    (["serve", "--service-ports", "80,http"], "'http' is not a port number"),
    (["serve", "--service-ports", "0"], "not a port number 1-65535"),
    (["serve", "--service-ports", ",".join(map(str, range(1, 40)))], "at most 32 ports"),
    (["serve", "--socket-table-size", "8"], "must be between 16 and"),
    (["serve", "--socket-table-size", "lots"], "not a whole number"),
    (["serve", "--web.telemetry-path", "metrics"], "must be a path starting with /"),
    (["serve", "--log.level", "loud"], "invalid choice: 'loud'"),
    (["serve", "--web.listen-address", "9814"], "expected HOST:PORT"),
    (["serve", "--web.listen-address", "host:99999"], "expected HOST:PORT"),
    (["serve", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    ([], "the following arguments are required: COMMAND"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message):
    result = subprocess.run([TCPSTATE, *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_version():
    result = subprocess.run([TCPSTATE, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("tcpstate ")
