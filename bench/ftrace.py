"""The ground truth of the skips figure: an ftrace instance on
sock:inet_sock_set_state that records one port's births (listen ->
syn_recv) with the task each ran over. On this sandbox kernel BPF programs
are never run while a thread of PID 1 is the current task, softirqs that
interrupt one included, and the kernel counts no miss for them (issue 19,
tests/kernel/test_missing_births.py); ftrace records them. So the births
ftrace saw over a PID-1 thread are those no program could count: "hidden
by the kernel", told apart from the skips a scrape could cause.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from tracer import states

TRACEFS = Path("/sys/kernel/tracing")
INSTANCE_PREFIX = "tcpstate-bench-"
# "<comm>-<pid> [<cpu>] <flags> <seconds>: inet_sock_set_state: ..."
TRACE_LINE = re.compile(r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<flags>\S+)\s+")


def pid1_threads() -> set[int]:
    return {int(tid) for tid in os.listdir("/proc/1/task")}


def remove_stale_instances() -> None:
    """Instances a killed earlier run left behind (their pid is gone)."""
    for instance in (TRACEFS / "instances").glob(f"{INSTANCE_PREFIX}*"):
        pid = instance.name[len(INSTANCE_PREFIX):]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(OSError):
                (instance / "events/sock/inet_sock_set_state/enable").write_text("0")
                instance.rmdir()


@dataclass
class Births:
    recorded: int = 0       # every birth on the port ftrace recorded
    over_pid1: int = 0      # ... with a thread of PID 1 as the current task
    over_pid1_in_softirq: int = 0  # ... of which in a softirq
    overrun: bool = False   # ftrace lost events: the counts are not the truth


class BirthEvents:
    """A context manager: the instance, recording births on `port`."""

    def __init__(self, port: int):
        self.port = port
        self.instance = TRACEFS / "instances" / f"{INSTANCE_PREFIX}{os.getpid()}"
        self.event = self.instance / "events/sock/inet_sock_set_state"

    def __enter__(self) -> "BirthEvents":
        remove_stale_instances()
        self.instance.mkdir()
        try:
            (self.instance / "buffer_size_kb").write_text("16384")
            (self.event / "filter").write_text(
                f"oldstate == {states.code_of('listen')} && "
                f"newstate == {states.code_of('syn_recv')} && sport == {self.port}")
            (self.event / "enable").write_text("1")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):
            (self.event / "enable").write_text("0")
        with contextlib.suppress(OSError):
            self.instance.rmdir()

    def clear(self) -> None:
        (self.instance / "trace").write_text("")

    def take(self, pid1: set[int]) -> Births:
        """What was recorded since the last clear, which it clears."""
        found = Births()
        for line in (self.instance / "trace").read_text().splitlines():
            if "inet_sock_set_state:" not in line:
                continue
            match = TRACE_LINE.match(line)
            if not match:
                raise RuntimeError(f"bench: unparsed ftrace line {line!r}")
            found.recorded += 1
            over_pid1 = int(match["pid"]) in pid1
            found.over_pid1 += over_pid1
            found.over_pid1_in_softirq += over_pid1 and "s" in match["flags"]
        for stats in (self.instance / "per_cpu").glob("cpu*/stats"):
            found.overrun |= "\noverrun: 0\n" not in "\n" + stats.read_text()
        self.clear()
        return found
