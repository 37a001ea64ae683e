"""What the benchmark reads from the kernel about programs and processes:
BPF run-time statistics, CPU time, resident memory, BPF map memory."""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import subprocess
from typing import Iterator, Sequence

from tracer.program import FUNCTION

BPF_STATS = "/proc/sys/kernel/bpf_stats_enabled"
# Program names on inet_sock_set_state: tcpstate's (and bench/'s) handler,
# and bcc's auto-attached name (tcpstates, older tcpstate builds).
PROGRAM_NAMES = (FUNCTION, "tracepoint__sock__inet_sock_set_state")
TICKS = os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def bpf_stats_enabled(enabled: bool = True) -> Iterator[None]:
    """kernel.bpf_stats_enabled=1 (or 0) for the block; it costs every
    program two clock reads per run, so it is put back as it was."""
    with open(BPF_STATS) as current:
        before = current.read().strip()
    with open(BPF_STATS, "w") as sysctl:
        sysctl.write("1" if enabled else "0")
    try:
        yield
    finally:
        with open(BPF_STATS, "w") as sysctl:
            sysctl.write(before)


def _fdinfo(path: str) -> dict[str, int]:
    stats = {}
    with open(path) as info:
        for line in info:
            key, _, value = line.partition(":")
            if key in ("prog_id", "run_time_ns", "run_cnt", "recursion_misses"):
                stats[key] = int(value)
    return stats


def prog_stats_of_fd(fd: int, pid: str | int = "self") -> dict[str, int]:
    return _fdinfo(f"/proc/{pid}/fdinfo/{fd}")


def programs_of(pid: int) -> dict[int, dict[str, int]]:
    """{prog id: stats} of the BPF programs a process holds open."""
    found = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-prog":
                continue
            stats = _fdinfo(f"/proc/{pid}/fdinfo/{fd}")
        except OSError:
            continue
        found[stats["prog_id"]] = stats
    return found


def tracepoint_programs() -> list[int]:
    """Ids of every program loaded for inet_sock_set_state, raw or classic
    (ours, the peers', and other engineers' tests on a shared machine)."""
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], check=True,
                                      capture_output=True, text=True).stdout)
    return [prog["id"] for prog in shown if prog.get("name") in PROGRAM_NAMES]


def map_memory(prog_id: int) -> dict[str, int]:
    """{map name: bytes_memlock} of the maps one program uses (bpftool)."""
    def show(*what: str):
        return json.loads(subprocess.run(["bpftool", *what, "-j"], check=True,
                                         capture_output=True, text=True).stdout)
    maps = {}
    for map_id in show("prog", "show", "id", str(prog_id)).get("map_ids", []):
        info = show("map", "show", "id", str(map_id))
        maps[info.get("name", str(map_id))] = info.get("bytes_memlock", 0)
    return maps


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def load_average() -> str:
    with open("/proc/loadavg") as loadavg:
        return " ".join(loadavg.read().split()[:3])


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest-rank method."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]
