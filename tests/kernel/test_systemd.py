"""deploy/systemd/tcpstate.service, unmodified, run by a real systemd.

A container (systemd-nspawn) boots the host's own Debian through a
throw-away overlay into a target that wants only tcpstate.service; the unit
file and the sysusers file go into the overlay where
the README installs them, tcpstate's path /opt/tcpstate/bin/tcpstate is a
link to the session's staged copy (staging.py: this checkout may be where
the unit's ProtectHome= or PrivateTmp= hides it). The container shares the host's network, so the
test scrapes the service and inspects its process from outside: systemd
applied the unit's capabilities, no_new_privs, system call filter and
read-only file system, and tcpstate loaded, served and stopped on SIGTERM.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tracer.metrics import SCRAPE_SUCCESS
from tracer.prereq import CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN

from ..unit.deploy_files import RUN_AS_USER, SYSUSERS, UNIT
from ..hygiene import STAND_IN_PREFIX
from .exporter import Scrape, free_port, prog_ids_of
from .test_least_privilege import _debian_tool

CAP_SETGID, CAP_SETUID, CAP_SETPCAP = 6, 7, 8
UNIT_CAPABILITY_BITS = sum(1 << cap for cap in (CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN, CAP_SETGID,
                                                CAP_SETUID, CAP_SETPCAP))
BOOT_SECONDS = 120


def _boot_script(root: Path) -> str:
    """Runs in a private mount namespace: the overlay, then nspawn."""
    rw, merged = root / "rw", root / "merged"
    return "\n".join([
        "set -e",
        f"mount -t tmpfs tcpstate-test {rw}",
        f"mkdir -p {rw}/upper {rw}/work",
        f"mount -t overlay overlay -o lowerdir=/,upperdir={rw}/upper,workdir={rw}/work {merged}",
        f'cp -a {root}/install/. {merged}/',
        # Beyond nspawn's default capabilities the service needs CAP_BPF and
        # CAP_PERFMON, and systemd's sys-kernel-tracing.mount CAP_SYS_RAWIO;
        # nspawn's seccomp filter must let through what the unit's does.
        f"exec systemd-nspawn --quiet --register=no --keep-unit --machine={root.name}"
        f" -D {merged} --capability=CAP_BPF,CAP_PERFMON,CAP_SYS_RAWIO"
        ' --system-call-filter="bpf perf_event_open setns"'
        " -b -- systemd.unit=tcpstate-test.target",
    ])


def _install(install: Path, port: int, run_as: bool, tcpstate: Path) -> None:
    """The files, where the README's install steps put them; without
    `run_as`, the environment file turns the unit's default drop off."""
    system = install / "etc" / "systemd" / "system"
    (system / "tcpstate.service.d").mkdir(parents=True)
    shutil.copy(UNIT, system / "tcpstate.service")
    # The service's log on the container's console, for the test's output.
    (system / "tcpstate.service.d" / "console.conf").write_text(
        "[Service]\nStandardOutput=journal+console\nStandardError=journal+console\n")
    sysusers = install / "usr" / "lib" / "sysusers.d"
    sysusers.mkdir(parents=True)
    shutil.copy(SYSUSERS, sysusers / "tcpstate.conf")
    (system / "tcpstate-test.target").write_text(
        "[Unit]\nDescription=tcpstate under test\nRequires=tcpstate.service\n"
        "After=tcpstate.service\n")
    (install / "etc" / "default").mkdir(parents=True)
    (install / "etc" / "default" / "tcpstate").write_text(
        f'TCPSTATE_ARGS="--web.listen-address=127.0.0.1:{port}"\n'
        + ("" if run_as else "TCPSTATE_RUN_AS=\n"))
    (install / "opt" / "tcpstate" / "bin").mkdir(parents=True)
    (install / "opt" / "tcpstate" / "bin" / "tcpstate").symlink_to(tcpstate)


def _scrape(port: int) -> Scrape:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
        if response.status != 200:
            raise OSError(f"scrape answered {response.status}")
        return Scrape.parse(body)
    finally:
        connection.close()


def _listener_pid(port: int) -> int:
    listing = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True,
                             text=True, check=True, timeout=30).stdout
    return int(listing.split("pid=", 1)[1].split(",", 1)[0])


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return {key: value.strip() for key, _, value in
                (line.partition(":") for line in status)}


def _mount_options(pid: int) -> dict[str, str]:
    """Mount point -> per-mount options, as the process sees them."""
    with open(f"/proc/{pid}/mountinfo") as mountinfo:
        return {fields[4]: fields[5] for fields in map(str.split, mountinfo)}


class Container:
    """A booted container whose tcpstate.service serves on `port`."""

    def __init__(self, root: Path, run_as: bool, tcpstate: Path):
        for name in ("rw", "merged", "install"):
            (root / name).mkdir(parents=True)
        self.root, self.port, self.console = root, free_port(), root / "console.log"
        _install(root / "install", self.port, run_as, tcpstate)
        with open(self.console, "w") as log:
            self.process = subprocess.Popen(
                ["unshare", "--mount", "--propagation=private", "sh", "-c", _boot_script(root)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + BOOT_SECONDS
        while True:
            try:
                _scrape(self.port)
                return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.poweroff()
                pytest.fail(f"tcpstate.service did not serve:\n{self.log()[-4000:]}")
            time.sleep(0.5)

    def log(self) -> str:
        return self.console.read_text(errors="replace")

    def poweroff(self) -> str:
        """nspawn turns SIGTERM into a clean shutdown of the container."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{self.root.name}", ignore_errors=True)
        return self.log()


@pytest.fixture
def boot(tmp_path, staged):
    _debian_tool("systemd-nspawn", "systemd-container")
    containers: list[Container] = []

    def booted(run_as: bool) -> Container:
        containers.append(Container(tmp_path / f"{STAND_IN_PREFIX}{os.getpid()}", run_as,
                                    staged.tcpstate))
        return containers[-1]

    yield booted
    for container in containers:
        container.poweroff()


def _collector_success(port: int) -> dict[str, float]:
    scrape = _scrape(port)
    return {labels["collector"]: scrape.value(SCRAPE_SUCCESS, **labels)
            for labels in scrape.series(SCRAPE_SUCCESS)}


def test_unit_kept_at_root_runs_with_only_its_capabilities_under_systemd(boot):
    container = boot(run_as=False)
    pid = _listener_pid(container.port)
    status = _status(pid)
    assert status["Uid"].split() == ["0"] * 4
    assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == UNIT_CAPABILITY_BITS
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    mounts = _mount_options(pid)
    assert mounts["/"].split(",")[0] == "ro"  # ProtectSystem=strict
    assert mounts["/tmp"].split(",")[0] == "rw"  # PrivateTmp=yes
    assert prog_ids_of(pid), "the service holds no BPF program"
    assert _collector_success(container.port) == {"bpf": 1.0, "time_wait": 1.0}
    log = container.poweroff()
    assert "received SIGTERM, stopping" in log
    assert not os.path.exists(f"/proc/{pid}")
    assert "internal error" not in log and "Traceback" not in log


def test_unit_by_default_becomes_the_sysusers_user_under_systemd(boot):
    container = boot(run_as=True)
    pid = _listener_pid(container.port)
    status = _status(pid)
    uid = status["Uid"].split()[0]
    assert uid != "0" and status["Uid"].split() == [uid] * 4
    with open(f"/proc/{pid}/root/etc/passwd") as passwd:  # the container's
        assert f"{RUN_AS_USER}:x:{uid}:" in passwd.read()
    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert prog_ids_of(pid), "the service holds no BPF program"
    # No capabilities, and still every namespace a process is in
    assert _collector_success(container.port) == {"bpf": 1.0, "time_wait": 1.0}
    log = container.poweroff()
    assert f"running as {RUN_AS_USER} with no capabilities" in log
    assert "received SIGTERM, stopping" in log
