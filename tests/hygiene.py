"""The test session leaves nothing of its own behind: no process, network
namespace, mount or BPF program. At its end whatever is left is listed,
removed, and the run fails.

Other sessions (other checkouts, other users) run their own tests on the
same host at the same time, and the host has BPF programs of its own, so
nothing here goes by name or command line alone. What is ours:
- processes: descendants of this pytest process. It is made a child
  subreaper (prctl), so a process whose parent died (strace killed, a shell
  gone, a double fork) is re-parented to it and stays a descendant;
- network namespaces: tests/kernel/netlab.py's `tcpst-<pid>-...` names made
  during the session by this process or a descendant of it;
- mounts (in this mount namespace): new ones under a path that carries this
  session's marks (its pid in netlab's or the stand-ins' names, its
  temporary directory);
- BPF programs: loaded during the session and held, then or at the end, by
  one of our processes (their /proc/PID/fdinfo; bpftool's pids as well).

Loaded as a plugin by tests/conftest.py (`-p tests.hygiene` for a session
outside tests/, as tests/kernel/test_hygiene.py runs one).
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .kernel.netlab import PREFIX as NETNS_PREFIX

NETNS_DIR = Path("/run/netns")
# Directories a session names after its pid (tests/kernel/staging.py's copy,
# tests/kernel/test_systemd.py's containers): mounts under them are its own.
STAND_IN_PREFIX = "tcpstate-test-"
PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HEADLINE = "the test session left these behind"


@dataclass
class Process:
    pid: int
    parent: int
    state: str
    started: int  # clock ticks since boot
    command: str


def processes() -> dict[int, Process]:
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue  # gone meanwhile
        # the command name may hold spaces and parentheses: fields follow the last ')'
        name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
        found[int(entry)] = Process(int(entry), int(fields[1]), fields[0], int(fields[19]),
                                    command or f"[{name}]")
    return found


def descendants(root: int, table: dict[int, Process]) -> dict[int, Process]:
    children: dict[int, list[int]] = {}
    for process in table.values():
        children.setdefault(process.parent, []).append(process.pid)
    found, pending = {}, list(children.get(root, ()))
    while pending:
        pid = pending.pop()
        found[pid] = table[pid]
        pending += children.get(pid, ())
    return found


def prog_ids_held_by(pid: int) -> set[int]:
    ids = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return ids
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                ids.update(int(line.split()[1]) for line in info if line.startswith("prog_id:"))
        except (OSError, ValueError, IndexError):
            continue  # closed meanwhile
    return ids


def loaded_programs() -> dict[int, dict] | None:
    """Every loaded BPF program by id (bpftool), None where it cannot tell."""
    bpftool = shutil.which("bpftool") or ("/usr/sbin/bpftool" if os.path.exists(
        "/usr/sbin/bpftool") else None)
    if os.geteuid() != 0 or bpftool is None:
        return None
    try:
        listing = subprocess.run([bpftool, "prog", "show", "--json"], capture_output=True,
                                 text=True, timeout=60, check=True).stdout
        return {program["id"]: program for program in json.loads(listing or "[]")}
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def mount_points() -> set[str]:
    with open("/proc/self/mountinfo") as mountinfo:
        # octal escapes (\040 for a space) stay as they are: compared, never opened
        return {line.split()[4] for line in mountinfo}


def namespaces() -> set[str]:
    try:
        return {name for name in os.listdir(NETNS_DIR) if name.startswith(NETNS_PREFIX)}
    except OSError:
        return set()


def _boot_ticks() -> int:
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)


@dataclass
class Hygiene:
    pid: int = field(default_factory=os.getpid)
    programs_at_start: set[int] = field(default_factory=set)
    namespaces_at_start: set[str] = field(default_factory=set)
    mounts_at_start: set[str] = field(default_factory=set)
    seen_pids: set[int] = field(default_factory=set)  # ours at some point
    seen_programs: dict[int, str] = field(default_factory=dict)  # id -> test that held it
    windows: list[tuple[int, int, str]] = field(default_factory=list)  # ticks, ticks, test
    marks: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)

    def start(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
        self.programs_at_start = set(loaded_programs() or ())
        self.namespaces_at_start = namespaces()
        self.mounts_at_start = mount_points()
        self.marks = [f"/{NETNS_PREFIX}{self.pid}-", f"/{STAND_IN_PREFIX}{self.pid}"]

    def add_mark(self, path: str) -> None:
        """A directory of this session's own (its tmp_path base): mounts under it are ours."""
        self.marks.append(path.rstrip("/") + "/")

    def ours(self) -> dict[int, Process]:
        return descendants(self.pid, processes())

    def sample(self, test: str, began: int) -> None:
        """After each test: whose processes and programs were ours, and when."""
        self.windows.append((began, _boot_ticks(), test))
        ours = self.ours()
        self.seen_pids.update(ours)
        for pid in (self.pid, *ours):
            for prog in prog_ids_held_by(pid):
                self.seen_programs.setdefault(prog, test)

    def _started_during(self, started: int) -> str:
        for began, ended, test in self.windows:
            if began - CLOCK_TICKS <= started <= ended + CLOCK_TICKS:
                return f" (started during {test})"
        return ""

    def finish(self) -> list[str]:
        """List what is left of ours, remove it, and say what could not be."""
        table = processes()
        ours = descendants(self.pid, table)
        live = {pid: p for pid, p in ours.items() if p.state not in "ZX"}
        self._reap(pid for pid, p in ours.items() if p.state == "Z")
        held_now = {prog: pid for pid in (self.pid, *live) for prog in prog_ids_held_by(pid)}
        programs = loaded_programs()
        if programs is not None:
            for prog, info in programs.items():
                holders = {entry["pid"] for entry in info.get("pids", ())}
                for pid in holders & set(live):
                    held_now.setdefault(prog, pid)
        # Held by one of ours now, or by one of ours during a test, and still
        # loaded; without bpftool's list only the first can be told.
        candidates = (set(held_now) | set(self.seen_programs)) - self.programs_at_start
        candidates &= set(programs) if programs is not None else set(held_now)
        # One whose holder has just exited is freed by the kernel a moment
        # later (a perf event's release is deferred): not a leak yet.
        deadline = time.monotonic() + 5
        while candidates - set(held_now) and time.monotonic() < deadline:
            time.sleep(0.1)
            loaded = loaded_programs()
            if loaded is None:
                break
            candidates = {prog for prog in candidates if prog in held_now or prog in loaded}
        leaked_programs = {
            prog: (f"held by process {held_now[prog]}" if prog in held_now
                   else f"held during {self.seen_programs[prog]}") for prog in candidates}
        names = programs or {}
        # Named after this process, one of ours, or one of ours that is gone
        # (a live one of that pid is another's: pids are reused).
        creators = {self.pid, *ours} | {pid for pid in self.seen_pids if pid not in table}
        leaked_namespaces = sorted(
            name for name in namespaces() - self.namespaces_at_start
            if name[len(NETNS_PREFIX):].split("-", 1)[0] in {str(pid) for pid in creators})
        leaked_mounts = sorted(
            (point for point in mount_points() - self.mounts_at_start
             if any(mark in point + "/" for mark in self.marks)
             or any(point == str(NETNS_DIR / name) for name in leaked_namespaces)),
            key=len, reverse=True)

        findings = [f"process {pid}{self._started_during(p.started)}: {p.command[:300]}"
                    for pid, p in sorted(live.items())]
        findings += [" ".join(filter(None, ("BPF program", str(prog),
                                            names.get(prog, {}).get("name"), where)))
                     for prog, where in sorted(leaked_programs.items())]
        findings += [f"network namespace {name}" for name in leaked_namespaces]
        findings += [f"mount {point}" for point in leaked_mounts]

        # Remove: processes first (they hold programs and namespaces).
        self._kill(live)
        for name in leaked_namespaces:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=60)
        for point in leaked_mounts:
            subprocess.run(["umount", "-l", point], capture_output=True, timeout=60)
        findings += self._what_remains(live, leaked_programs, leaked_namespaces, leaked_mounts)
        self.findings = findings
        return findings

    def _kill(self, live: dict[int, Process]) -> None:
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Until every one is reaped: a killed process whose parent died too is
        # re-parented to us, and a zombie thread-group leader cannot be reaped
        # until its other threads are gone (left, it would outlive us).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [pid for pid in self.ours() if pid in live]
            if not left:
                break
            self._reap(left)
            time.sleep(0.05)

    def _reap(self, pids) -> None:
        for pid in pids:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # not our child: its own parent (also ours) reaps it

    def _what_remains(self, live, programs, names, mounts) -> list[str]:
        deadline = time.monotonic() + 10  # programs are freed a moment after their holder
        while True:
            still = {pid for pid, p in self.ours().items() if pid in live and p.state != "Z"}
            loaded = loaded_programs()
            still_programs = set(programs) & set(loaded) if loaded is not None else set()
            still_names = set(names) & namespaces()
            still_mounts = set(mounts) & mount_points()
            if not (still or still_programs or still_names or still_mounts) or \
                    time.monotonic() > deadline:
                break
            time.sleep(0.1)
        return ([f"could not remove process {pid}" for pid in sorted(still)]
                + [f"could not remove BPF program {prog} (pinned or linked?)"
                   for prog in sorted(still_programs)]
                + [f"could not remove network namespace {name}" for name in sorted(still_names)]
                + [f"could not remove mount {point}" for point in sorted(still_mounts)])


KEY = pytest.StashKey[Hygiene]()


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"{signal.Signals(signum).name}")


def pytest_sessionstart(session: pytest.Session) -> None:
    hygiene = Hygiene()
    hygiene.start()
    session.config.stash[KEY] = hygiene
    # A SIGTERM (a timeout, `kill`) ends the session as Ctrl-C does: fixtures
    # tear down and this check still lists and removes what is left.
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem):
    began = _boot_ticks()
    try:
        return (yield)
    finally:
        hygiene = item.config.stash.get(KEY, None)
        if hygiene is not None:
            hygiene.sample(item.nodeid, began)


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    hygiene = session.config.stash.get(KEY, None)
    if hygiene is None:
        return
    factory = getattr(session.config, "_tmp_path_factory", None)
    if factory is not None and getattr(factory, "_basetemp", None) is not None:
        hygiene.add_mark(str(factory._basetemp))
    if hygiene.finish() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    hygiene = config.stash.get(KEY, None)
    if hygiene is None or not hygiene.findings:
        return
    terminalreporter.section("left behind", sep="=", red=True, bold=True)
    terminalreporter.line(f"{HEADLINE} (now removed); the run fails:", red=True)
    for finding in hygiene.findings:
        terminalreporter.line(f"  {finding}")
    # counted in the closing line too: "N passed, M left behind"
    terminalreporter.stats.setdefault("left behind", []).extend(
        LeftBehind(finding) for finding in hygiene.findings)


@dataclass
class LeftBehind:
    """A terminal reporter's stats entry (other plugins read their attributes)."""
    finding: str
