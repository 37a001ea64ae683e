"""tests/vm/matrix.py's own logic: results read from the guest's files, the
attach path found or not, and a hung run killed at its timeout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from tests.vm.matrix import Kernel, Outcome, read_results, run_with_timeout

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="3" failures="1" skipped="1">
<testcase classname="tests.kernel.test_serve" name="test_a[reset-ipv4]" time="1"/>
<testcase classname="tests.kernel.test_serve" name="test_b"><failure message="x"/></testcase>
<testcase classname="tests.kernel.test_trace" name="test_c"><skipped message="y"/></testcase>
</testsuite></testsuites>
"""


def test_counts_come_from_the_files_and_a_skip_is_a_failure(tmp_path):
    (tmp_path / "release").write_text("6.1.0-57-amd64\n")
    (tmp_path / "dry-run.rc").write_text("0\n")
    (tmp_path / "dry-run.txt").write_text("tcpstate: dry run ok: loaded and attached to "
                                          "sock:inet_sock_set_state in 3.1s\n")
    (tmp_path / "junit.xml").write_text(JUNIT)
    (tmp_path / "stages").write_text("start 100.0\ndry-run 150.5\npytest 400.5\n")
    (tmp_path / "done").touch()
    outcome = Outcome(Kernel("6.1.0-57-amd64", tmp_path / "vmlinuz"), seconds=300)
    read_results(outcome, tmp_path)
    assert (outcome.release, outcome.passed, outcome.failed) == ("6.1.0-57-amd64", 2, 2)
    assert outcome.failures == ["test_b", "test_c (skipped)"]
    assert outcome.attach == "unknown" and not outcome.problem
    assert outcome.line().startswith("6.1.0-57-amd64 (vm): 2 passed, 2 failed, attach: unknown, "
                                     "features: unknown, 300 s (dry-run 50, pytest 250, rest 0)")


def test_attach_path_and_features_are_read_from_the_dry_run(tmp_path):
    for said, path, features in (
            ("tcpstate: dry run ok: loaded and attached to the raw tracepoint "
             "inet_sock_set_state in 52.1s (prog id 7, ...); kernel features: raw_tracepoint "
             "cmpxchg mmapable ringbuf btf; maps readable\n", "raw_tracepoint",
             "raw_tracepoint cmpxchg mmapable ringbuf btf"),
            ("tcpstate: kernel features: cmpxchg mmapable ringbuf\n"
             "tcpstate: dry run ok: loaded and attached to the tracepoint "
             "sock:inet_sock_set_state in 3.1s (prog id 8, ...); maps readable\n", "tracepoint",
             "cmpxchg mmapable ringbuf")):
        (tmp_path / "dry-run.txt").write_text(said)
        outcome = Outcome(Kernel("host", None))
        read_results(outcome, tmp_path)
        assert (outcome.attach, outcome.features) == (path, features)


def test_a_run_that_wrote_nothing_fails_with_a_reason(tmp_path):
    outcome = Outcome(Kernel("6.12.117+deb12-amd64", tmp_path / "vmlinuz"))
    read_results(outcome, tmp_path)
    assert outcome.failed == 1 and outcome.passed == 0
    assert "no test results" in outcome.problem


def test_a_hung_run_is_killed_with_its_children_at_the_timeout(tmp_path):
    pid_file = tmp_path / "child"
    # a child that would outlive its parent if only the parent were killed
    command = ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; wait"]
    started = time.monotonic()
    problem = run_with_timeout(command, tmp_path / "console.log", 1.0, dict(os.environ))
    assert time.monotonic() - started < 10
    assert problem == "killed after 1 s (timeout)"
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z"


def test_a_failed_exit_names_the_console(tmp_path):
    problem = run_with_timeout([sys.executable, "-c", "raise SystemExit(3)"],
                               tmp_path / "console.log", 30, dict(os.environ))
    assert problem.startswith("exited 3 (console: ")


def test_every_test_the_guest_selects_exists():
    """A renamed test must not leave the kernel matrix running nothing."""
    guest = Path(__file__).parents[1] / "vm" / "guest.sh"
    selection = re.findall(r'^\s+"(tests/[^"]+)"$', guest.read_text(), re.MULTILINE)
    assert selection
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *selection], capture_output=True, text=True, cwd=guest.parents[2])
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    names = collected.stdout.splitlines()
    assert all(any(name.startswith(chosen) for name in names) for chosen in selection)
