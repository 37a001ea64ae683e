"""The session-end check (tests/hygiene.py) fails a run that left something
of its own behind, says what, and removes it.

Each test runs a pytest session of its own (a child process) on a test
file written here: one that leaves things behind on purpose, the way a
killed or careless test does, one that cleans up after itself, and one
stopped by SIGTERM in the middle of a test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ..hygiene import HEADLINE, mount_points
from .staging import CHECKOUT

LEAKY = """
    import json, os, subprocess
    from tests.kernel.exporter import Exporter, prog_ids_of

    REPORT = {report!r}

    def tell(**left):
        known = json.loads(open(REPORT).read()) if os.path.exists(REPORT) else {{}}
        open(REPORT, "w").write(json.dumps({{**known, **left}}))

    def test_strace_killed_leaves_serve_running():
        # what test_every_system_call_is_in_the_unit_filter did: strace
        # -o FILE blocks SIGTERM, so the stop came down to SIGKILL, which
        # detached serve; it lived on, re-parented, its program attached
        exporter = Exporter()
        exporter.command = ["strace", "-f", "-qq", "-o", "/dev/null", *exporter.command]
        exporter.start()
        pid = exporter.process.pid
        with open(f"/proc/{{pid}}/task/{{pid}}/children") as children:
            (serve,) = map(int, children.read().split())
        tell(serve=serve, started=open(f"/proc/{{serve}}/stat").read().rsplit(")", 1)[1].split()[19],
             programs=sorted(prog_ids_of(serve)))
        exporter.process.kill()
        exporter.process.wait()

    def test_a_namespace_and_a_mount_are_left(tmp_path):
        namespace = f"tcpst-{{os.getpid()}}-left"
        subprocess.run(["ip", "netns", "add", namespace], check=True)
        (tmp_path / "mounted").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "left", str(tmp_path / "mounted")], check=True)
        tell(namespace=namespace, mount=str(tmp_path / "mounted"))
"""

TIDY = """
    import subprocess
    from tests.kernel.exporter import Exporter
    from tests.kernel.netlab import Lab

    def test_serve_and_a_lab_cleaned_up():
        with Exporter() as exporter, Lab():
            exporter.scrape()
        subprocess.run(["sleep", "0"], check=True)
"""


STUCK = """
    import subprocess, time

    def test_stuck_with_a_process_of_its_own():
        # in a session of its own: not even a process-group kill reaches it
        sleeper = subprocess.Popen(["sleep", "300"], start_new_session=True)
        open({report!r}, "w").write(str(sleeper.pid))
        time.sleep(300)
"""


def session_command(directory: Path, body: str) -> list[str]:
    test_file = directory / "test_session.py"
    test_file.write_text(textwrap.dedent(body))
    return [sys.executable, "-m", "pytest", "-p", "tests.hygiene", "-p", "no:cacheprovider",
            "-q", "--rootdir", str(directory), "--basetemp", str(directory / "base"),
            str(test_file)]


def run_session(directory: Path, body: str) -> subprocess.CompletedProcess:
    # the checkout as the working directory: `tests` (the plugin, Exporter) imports
    return subprocess.run(session_command(directory, body), cwd=CHECKOUT, capture_output=True,
                          text=True, timeout=300)


def is_running(pid: int, started: str) -> bool:
    """Whether that process (pid and start time: a pid is soon reused) runs."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[19] == started
    except FileNotFoundError:
        return False


def is_loaded(prog: int) -> bool:
    return subprocess.run(["bpftool", "prog", "show", "id", str(prog)],
                          capture_output=True, timeout=60).returncode == 0


def test_what_a_session_leaves_fails_the_run_and_is_removed(tmp_path):
    report = tmp_path / "left.json"
    session = run_session(tmp_path, LEAKY.format(report=str(report)))
    output = session.stdout + session.stderr
    left = json.loads(report.read_text())
    assert session.returncode == 1, output
    assert "2 passed" in output and HEADLINE in output
    assert f"process {left['serve']} (started during test_session.py::" in output
    assert left["programs"], "serve held no BPF program"
    for prog in left["programs"]:
        assert f"BPF program {prog} " in output
    assert f"network namespace {left['namespace']}" in output
    assert f"mount {left['mount']}" in output
    assert "could not remove" not in output
    # removed, all of it
    assert not is_running(left["serve"], left["started"])
    assert not any(is_loaded(prog) for prog in left["programs"])
    assert not os.path.exists(f"/run/netns/{left['namespace']}")
    assert left["mount"] not in mount_points()


def test_a_session_that_cleans_up_passes(tmp_path):
    session = run_session(tmp_path, TIDY)
    output = session.stdout + session.stderr
    assert session.returncode == 0, output
    assert "1 passed" in output and HEADLINE not in output


def test_a_session_stopped_by_sigterm_still_removes_what_its_test_left(tmp_path):
    report = tmp_path / "sleeper"
    session = subprocess.Popen(session_command(tmp_path, STUCK.format(report=str(report))),
                               cwd=CHECKOUT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while not (report.exists() and report.read_text()):
            assert time.monotonic() < deadline and session.poll() is None, "no test started"
            time.sleep(0.05)
        sleeper = int(report.read_text())
        with open(f"/proc/{sleeper}/stat") as stat:
            started = stat.read().rsplit(")", 1)[1].split()[19]
        session.send_signal(signal.SIGTERM)
        output, _ = session.communicate(timeout=60)
    finally:
        if session.poll() is None:
            session.kill()
            session.wait()
    assert session.returncode == pytest.ExitCode.INTERRUPTED, output
    assert HEADLINE in output and f"process {sleeper} " in output, output
    assert not is_running(sleeper, started)
