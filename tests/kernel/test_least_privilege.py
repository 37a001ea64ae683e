"""The privileges the deployment files grant are enough, and each is needed.

deploy/systemd/tcpstate.service and deploy/kubernetes/daemonset.yaml grant
tcpstate one list of capabilities (the DaemonSet all but CAP_SYS_ADMIN: a
unit test checks they agree), and both drop them once attached (--run-as). Here the
real daemon runs with exactly that list (setpriv: uid 0, a reduced bounding
set, no_new_privs), and with one capability fewer to show why each is
there. The unit's SystemCallFilter is checked against every system call the
daemon makes (strace), and the container recipe's entrypoint runs in a
stand-in for the DaemonSet's pod: a read-only root, empty /lib/modules and
/tmp, the pod's capabilities.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tracer.errors import EXIT_PRIVILEGES
from tracer.metrics import SCRAPE_SUCCESS
from tracer.prereq import DEFAULT_TRACEFS

from ..unit.deploy_files import (
    RUN_AS_USER,
    UNIT,
    capabilities,
    daemonset_capabilities,
    daemonset_container,
    unit_entries,
    unit_values,
)
from .exporter import Exporter

UNIT_CAPABILITIES = capabilities(unit_entries(UNIT))
DROP_CAPABILITIES = {"CAP_SETPCAP", "CAP_SETGID", "CAP_SETUID"}
# The deployments' dedicated user is not on this host: tests run as nobody.
NOBODY = 65534


def as_root_with(caps: set[str], *command: str) -> list[str]:
    """`command` as uid 0 holding only `caps`, unable to gain more."""
    names = ",".join(f"+{cap.removeprefix('CAP_').lower()}" for cap in sorted(caps))
    bounding = f"-all,{names}" if names else "-all"
    return ["setpriv", "--no-new-privs", f"--bounding-set={bounding}", "--inh-caps=-all",
            "--", *command]


def run_python(caps: set[str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run(as_root_with(caps, sys.executable, "-c", code),
                          capture_output=True, text=True, timeout=120)


def _debian_tool(name: str, package: str) -> str:
    """The path of `name`, installing Debian's `package` if it is missing
    (`make setup-test` should have; the package lists may need an update)."""
    apt = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for update_first in (False, True):
        if shutil.which(name):
            break
        if update_first:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=600, env=apt)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
                       capture_output=True, timeout=600, env=apt)
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing and Debian's {package} did not install")
    return path


@pytest.fixture
def foreign_namespace():
    """A network namespace whose only process belongs to another user, as
    a pod's (its pause container runs as 65535). Yields its inode."""
    holder = subprocess.Popen(["unshare", "--net", "setpriv", f"--reuid={NOBODY}",
                               f"--regid={NOBODY}", "--clear-groups", "sleep", "300"])
    try:
        ours = os.stat("/proc/self/ns/net").st_ino
        deadline = time.monotonic() + 10
        while True:
            try:
                inode = os.stat(f"/proc/{holder.pid}/ns/net").st_ino
                uid = os.stat(f"/proc/{holder.pid}").st_uid
            except OSError:
                inode, uid = ours, 0
            if inode != ours and uid == NOBODY:
                break
            assert time.monotonic() < deadline, "the namespace holder did not start"
            time.sleep(0.05)
        yield inode
    finally:
        holder.kill()
        holder.wait()


# Enters every network namespace with setns and prints the inode of each
# one entered: how `ip netns` namespaces no process is in are read.
WALK = ("import os; from tracer import netns; print(' '.join(map(str, netns.in_every_namespace("
        "lambda: os.stat('/proc/thread-self/ns/net').st_ino))))")
# Reads every namespace as the TIME-WAIT gauge and the start-up count do,
# and prints the namespace_id of each one read.
EACH = ("from tracer import netns; print(' '.join(map(str, netns.each_namespace("
        "netns.namespace_id))))")


def test_without_any_capability_other_users_namespaces_are_read(foreign_namespace):
    """A pod's namespace (its only process another user's) is read through
    /proc/PID/net: neither CAP_SYS_PTRACE nor CAP_SYS_ADMIN is needed."""
    holder = next(pid for pid in filter(str.isdigit, os.listdir("/proc"))
                  if _ns_inode(pid) == foreign_namespace)
    wanted = os.stat(f"/proc/{holder}/net/sockstat").st_ino
    read = run_python(set(), EACH)
    assert read.returncode == 0, read.stderr
    assert str(wanted) in read.stdout.split()


def _ns_inode(pid: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def test_without_sys_ptrace_the_setns_walk_misses_other_users_namespaces(foreign_namespace):
    """Why CAP_SYS_PTRACE is gone with the setns walk: opening another
    user's /proc/PID/ns/net needs it."""
    walked = run_python(UNIT_CAPABILITIES, WALK)
    assert walked.returncode == 0, walked.stderr
    assert str(foreign_namespace) not in walked.stdout.split()
    walked = run_python(UNIT_CAPABILITIES | {"CAP_SYS_PTRACE"}, WALK)
    assert walked.returncode == 0, walked.stderr
    assert str(foreign_namespace) in walked.stdout.split()


def test_without_sys_admin_no_namespace_can_be_entered():
    walked = run_python(UNIT_CAPABILITIES - {"CAP_SYS_ADMIN"}, WALK)
    assert walked.returncode != 0
    assert "cannot enter the network namespace" in walked.stderr
    assert "Operation not permitted" in walked.stderr


@pytest.fixture
def unheld_namespace():
    """An `ip netns` namespace no process is in."""
    name = f"tcpst-{os.getpid()}-unheld"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_without_sys_admin_serve_exports_everything_and_says_what_it_misses(unheld_namespace):
    """Loading needs only CAP_BPF and CAP_PERFMON; every namespace a process
    is in is still counted, an `ip netns` one no process is in is left out,
    said once by the loader (start-up count) and once by the server
    (TIME-WAIT); no part fails scrape after scrape, no traceback."""
    exporter = Exporter()
    exporter.command = as_root_with(UNIT_CAPABILITIES - {"CAP_SYS_ADMIN"}, *exporter.command)
    with exporter:
        assert _scrape_success(exporter) == {"bpf": 1.0, "time_wait": 1.0}
        assert _scrape_success(exporter) == {"bpf": 1.0, "time_wait": 1.0}
    log = exporter.log()
    assert "Traceback" not in log and "failed" not in log
    assert log.count("cannot enter the network namespace") == 2, log
    assert "namespaces that no process is in are left out" in log


# Loads, attaches and reads the program, with no namespace walk.
LOAD_AND_READ = ("from tracer.probe import Probe; p = Probe(seed_live_sockets=False); "
                 "p.read(); print('prog', p.prog_stats()['prog_id']); p.close()")


def test_bpf_and_perfmon_are_what_loading_and_reading_need():
    loaded = run_python({"CAP_BPF", "CAP_PERFMON"}, LOAD_AND_READ)
    assert loaded.returncode == 0, loaded.stderr
    assert re.fullmatch(r"prog \d+\n", loaded.stdout)
    for alone in ("CAP_BPF", "CAP_PERFMON"):
        refused = run_python({alone}, LOAD_AND_READ)
        assert refused.returncode != 0, f"{alone} alone loaded the program"
        assert "prog" not in refused.stdout


def _scrape_success(exporter: Exporter) -> dict[str, float]:
    scrape = exporter.scrape()
    return {labels["collector"]: scrape.value(SCRAPE_SUCCESS, **labels)
            for labels in scrape.series(SCRAPE_SUCCESS)}


def test_serve_with_the_unit_capabilities_exports_everything():
    exporter = Exporter()
    exporter.command = as_root_with(UNIT_CAPABILITIES, *exporter.command)
    with exporter:
        success = _scrape_success(exporter)
    assert success and set(success.values()) == {1.0}, success
    assert "time_wait" in success


def test_serve_with_the_unit_capabilities_and_run_as_drops_everything_and_keeps_serving():
    exporter = Exporter(f"--run-as={NOBODY}")
    exporter.command = as_root_with(UNIT_CAPABILITIES, *exporter.command)
    with exporter:
        success = _scrape_success(exporter)
        with open(f"/proc/{exporter.process.pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status)
    assert fields["Uid"].split() == [str(NOBODY)] * 4
    assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 0
    assert success == {"bpf": 1.0, "time_wait": 1.0}  # read through /proc/PID/net


def test_run_as_needs_the_drop_capabilities():
    exporter = Exporter(f"--run-as={NOBODY}", "--dry-run")
    for missing in sorted(DROP_CAPABILITIES):
        result = subprocess.run(as_root_with(UNIT_CAPABILITIES - {missing}, *exporter.command),
                                capture_output=True, text=True, timeout=180)
        assert result.returncode == EXIT_PRIVILEGES, (missing, result.stderr)
        assert result.stderr.splitlines()[-1].startswith("tcpstate: --run-as: cannot "), \
            result.stderr


def _syscall_names(filter_value: str, systemd_analyze: str) -> set[str]:
    """A SystemCallFilter= allow list with its @groups expanded."""
    names: set[str] = set()
    pending = filter_value.split()
    while pending:
        item = pending.pop()
        if not item.startswith("@"):
            names.add(item)
            continue
        listing = subprocess.run([systemd_analyze, "syscall-filter", item], capture_output=True,
                                 text=True, check=True, timeout=30).stdout.splitlines()[1:]
        pending += [line.strip() for line in listing
                    if line.strip() and not line.strip().startswith("#")]
    return names


class TracedExporter(Exporter):
    """serve under `strace -f -o FILE`. That strace blocks SIGTERM, and the
    SIGKILL that followed detached serve and left it running with its
    program attached: the signal goes to serve, strace ends with it, and
    Exporter.stop() kills whatever is left of the group in any case."""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.process is not None and self.process.poll() is None:
            try:
                with open(f"/proc/{self.process.pid}/task/{self.process.pid}/children") as file:
                    traced = [int(pid) for pid in file.read().split()]
            except OSError:
                traced = []
            for pid in traced:
                os.kill(pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass  # Exporter.stop() kills it
        return super().stop(sig, timeout)


def test_every_system_call_is_in_the_unit_filter(tmp_path, unheld_namespace):
    """What serve and the run-as drop start, load, scrape and stop with; an
    `ip netns` namespace no process is in makes it call setns()."""
    strace = _debian_tool("strace", "strace")
    systemd_analyze = _debian_tool("systemd-analyze", "systemd")
    (allowed,) = unit_values(unit_entries(UNIT), "SystemCallFilter")
    allowed_names = _syscall_names(allowed, systemd_analyze)
    (families,) = unit_values(unit_entries(UNIT), "RestrictAddressFamilies")
    assert unit_values(unit_entries(UNIT), "RestrictNamespaces") == ["net"]
    used: set[str] = set()
    for args in ((), (f"--run-as={NOBODY}",)):
        trace = tmp_path / "strace.out"
        exporter = TracedExporter(*args)
        exporter.command = as_root_with(UNIT_CAPABILITIES, strace, "-f", "-qq", "-o", str(trace),
                                        *exporter.command)
        with exporter:
            exporter.scrape()
            exporter.scrape()
        # strace exits as its tracee did: serve stopped on SIGTERM, traced to the end
        assert exporter.process.returncode == 0, exporter.log()
        text = trace.read_text()
        used |= set(re.findall(r"^\d+ +([a-z0-9_]+)\(", text, re.MULTILINE))
        # RestrictNamespaces=net lets setns() through only for CLONE_NEWNET.
        # (a call another thread interrupts ends its line "<unfinished ...>")
        assert set(re.findall(r" setns\(\d+, ([A-Z_|]+)", text)) == {"CLONE_NEWNET"}
        assert set(re.findall(r" socket\((AF_[A-Z0-9]+)", text)) <= set(families.split())
        if args:
            # After the drop no bpf() call: the maps are read through memory
            # mapped before it, so --run-as needs no newer kernel than serve.
            after_drop = text[text.index(" setresuid("):]
            assert re.search(r"^\d+ +bpf\(", after_drop, re.MULTILINE) is None
    # perf_event_open too on the classic tracepoint; the raw one attaches by bpf()
    assert {"bpf", "setns", "setresuid", "capset"} <= used
    assert used - allowed_names == set()


def test_entrypoint_serves_in_a_stand_in_for_the_daemonset_pod(staged):
    """The pod has a read-only root, empty /lib/modules and /tmp, the host's
    tracefs read-only, no host /run/netns, and the listed capabilities. A
    private mount namespace stands in for it (bind remounts: read-only for
    this process only). It runs the staged copy: the checkout may be under
    the /tmp the pod replaces."""
    container = daemonset_container()
    assert daemonset_capabilities() == UNIT_CAPABILITIES - {"CAP_SYS_ADMIN"}
    # the image's user is not on this host
    args = [f"--run-as={NOBODY}" if word == f"--run-as={RUN_AS_USER}" else word
            for word in container["args"]]
    assert args != container["args"]
    pod = "; ".join([
        "set -e",
        "mount -t tmpfs -o size=1m modules /lib/modules",
        "mount -t tmpfs -o size=64m tmp /tmp",
        "mount -t tmpfs -o size=1m netns /run/netns",
        f"mount -o remount,bind,ro {DEFAULT_TRACEFS}",
        "mount -o remount,bind,ro /sys",
        "mount -o remount,bind,ro /",
        'exec "$@"',
    ])
    command = ["unshare", "--mount", "--propagation=private", "sh", "-c", pod, "pod",
               *as_root_with(daemonset_capabilities(), "env",
                             f"PATH={staged.tcpstate.parent}:/usr/bin:/bin",
                             str(staged.entrypoint), *args, "--dry-run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "using the image's headers linux-headers-" in result.stderr
    assert "dry run ok" in result.stdout
