"""Every flag of every command, fuzzed: a value is either accepted or
refused with exactly one line on stderr and exit code 2, never a traceback.

The flags are found in the parser itself, so a flag added later is fuzzed
without editing this file. Parsing runs in-process (fast, and nothing is
loaded: only run() loads BPF); values it refuses are then also given to the
real `tcpstate` binary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from tracer.cli import build_parser
from tracer.errors import EXIT_USAGE

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def flags_taking_values() -> list[tuple[str, str]]:
    found = []
    for name, command in commands(build_parser()).items():
        for action in command._actions:
            long = [s for s in action.option_strings if s.startswith("--")]
            if long and action.nargs is None and isinstance(
                    action, (argparse._StoreAction, argparse._AppendAction)):
                found.append((name, long[0]))
    return sorted(found)


def switches() -> list[tuple[str, str]]:
    found = []
    for name, command in commands(build_parser()).items():
        for action in command._actions:
            if action.nargs == 0 and action.option_strings and action.dest != "help":
                found.append((name, action.option_strings[-1]))
    return sorted(found)


FLAGS = flags_taking_values()


def parse(argv: list[str]) -> tuple[int | None, str]:
    """(None, "") when accepted, else (exit code, stderr)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(argv)
        except SystemExit as exc:
            return exc.code, stderr.getvalue()
    return None, ""


def assert_one_line_usage_error(code, stderr: str) -> None:
    assert code == EXIT_USAGE, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, repr(stderr)
    assert "Traceback" not in stderr


def test_the_flags_are_found():
    assert ("serve", "--service-ports") in FLAGS and ("serve", "--web.config.file") in FLAGS
    assert ("serve", "--dry-run") in switches()


values = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789,:-.[]/ x", max_size=20),
    st.integers().map(str),
    st.sampled_from(["", " ", "-1", "0", "1e3", "0x10", "65536", "99999999999999999999",
                     "/", "/dev/null", "/etc/passwd", "root", "\n", "a\nb", "\x00", "☃"]),
)


@pytest.mark.parametrize("command, flag", FLAGS)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(value=values)
def test_any_value_is_accepted_or_one_line_exit_2(command, flag, value):
    code, stderr = parse([command, f"{flag}={value}"])
    if code is not None:
        assert_one_line_usage_error(code, stderr)
        assert flag in stderr


# Values that must be refused: one table per serve flag.
BAD = {
    "--web.listen-address": ["9814", "host:99999", "host:", ":-1", ":port", ""],
    "--web.telemetry-path": ["metrics", "", "/a b", "/x\n"],
    "--service-ports": ["0", "65536", "80,http", ",", "", "-80", ",".join(map(str, range(1, 40)))],
    "--socket-table-size": ["0", "8", "-64", "lots", "1e6", str(1 << 25), ""],
    "--log.level": ["loud", "", "INFO"],
    "--web.config.file": ["/nonexistent/web.yml", "/", "/dev/null/x", "", "/etc/shadow-"],
    "--run-as": ["root", "0", "no-such-user-here", "", "\x00"],
}


@pytest.mark.parametrize("flag, value", [(f, v) for f, vs in BAD.items() for v in vs])
def test_bad_serve_values_refused(flag, value):
    code, stderr = parse(["serve", f"{flag}={value}"])
    assert_one_line_usage_error(code, stderr)


@pytest.mark.parametrize("command, switch", switches())
def test_switches_take_no_value(command, switch):
    assert_one_line_usage_error(*parse([command, f"{switch}=yes"]))


@pytest.mark.parametrize("command, flag", FLAGS)
def test_missing_value(command, flag):
    assert_one_line_usage_error(*parse([command, flag]))


@settings(max_examples=25)
@given(flag_value=st.tuples(st.sampled_from([f for c, f in FLAGS if c == "serve"]),
                            values.filter(lambda v: "\x00" not in v)))
@example(flag_value=("--service-ports", "80,\nhttp"))
def test_the_binary_agrees(flag_value):
    """What the parser refuses, the installed command refuses the same way
    (values it accepts would start the exporter: they are skipped)."""
    flag, value = flag_value
    code, _ = parse(["serve", f"{flag}={value}"])
    if code is None:
        return
    result = subprocess.run([TCPSTATE, "serve", f"{flag}={value}"],
                            capture_output=True, text=True, timeout=60)
    assert_one_line_usage_error(result.returncode, result.stderr)
    assert result.stdout == ""
