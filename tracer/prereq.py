"""Checks of what the kernel and the host must offer before BPF is loaded.

Each failed check raises PrerequisiteError with its own exit code and a line
that says how to fix it. The paths can be pointed elsewhere through
environment variables, which is how the tests reach every failure:
TCPSTATE_TRACEFS, TCPSTATE_TRACEPOINT (category:name), TCPSTATE_KERNEL_HEADERS,
TCPSTATE_KERNEL_RELEASE (as `uname -r` prints it). The BPF features the
programs use are probed, not inferred from the version (tracer/features.py;
TCPSTATE_MISSING_FEATURES makes some count as missing).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import (
    EXIT_HEADERS,
    EXIT_PRIVILEGES,
    EXIT_TRACEFS,
    EXIT_KERNEL_VERSION,
    EXIT_TRACEPOINT,
    PrerequisiteError,
)
from .features import CMPXCHG, MMAPABLE, RINGBUF, Features, probe_kernel

TRACEPOINT = "sock:inet_sock_set_state"
DEFAULT_TRACEFS = "/sys/kernel/tracing"

CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39


# The BPF features each command's program uses, and what for: probed before
# compiling, so a kernel without one gets one line (exit 9) instead of a
# verifier or bpf(2) error.
SERVE_NEEDS = {CMPXCHG: "serve counts with it", MMAPABLE: "serve reads its maps through it"}
TRACE_NEEDS = {CMPXCHG: "trace counts with it", RINGBUF: "trace sends its events through it"}
# --run-as needs nothing more: after the drop the server reads the maps by
# mmap and the program's statistics from /proc/self/fdinfo, never bpf(2).


@dataclass(frozen=True)
class Prerequisites:
    tracefs: Path
    tracepoint: str
    headers: Path


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    with open(status_path) as status:
        for line in status:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    caps = effective_capabilities()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    raise PrerequisiteError(
        "needs root (or CAP_BPF and CAP_PERFMON) to load BPF programs: "
        "run it as root, e.g. `su -c 'tcpstate serve'` or from a root shell",
        EXIT_PRIVILEGES,
    )


def _is(test: Callable[[], bool]) -> bool:
    """A path test that treats a path we may not read as absent."""
    try:
        return test()
    except OSError:
        return False


def check_tracefs(path: Path, mount: bool = True) -> Path:
    """tracefs must be mounted: mount it when it is not and we may."""
    if _is((path / "events").is_dir):
        return path
    if mount and _is(path.is_dir):
        result = subprocess.run(
            ["mount", "-t", "tracefs", "tracefs", str(path)],
            capture_output=True, text=True,
        )
        if result.returncode == 0 and _is((path / "events").is_dir):
            return path
    raise PrerequisiteError(
        f"tracefs is not mounted at {path} and could not be mounted: "
        f"run `mount -t tracefs tracefs {path}` as root",
        EXIT_TRACEFS,
    )


def check_tracepoint(tracefs: Path, tracepoint: str) -> str:
    category, _, name = tracepoint.partition(":")
    if not _is((tracefs / "events" / category / name / "format").is_file):
        raise PrerequisiteError(
            f"tracepoint {tracepoint} not found under {tracefs}/events: this kernel "
            "does not provide it (Linux 4.16 and newer do, if built with tracepoints)",
            EXIT_TRACEPOINT,
        )
    return tracepoint


def kernel_release() -> str:
    return os.environ.get("TCPSTATE_KERNEL_RELEASE") or os.uname().release


def parse_release(release: str) -> tuple[int, int] | None:
    """(major, minor) of a release such as 6.18.0-rc1-amd64; None if unreadable."""
    numbers = re.match(r"(\d+)\.(\d+)", release)
    return (int(numbers[1]), int(numbers[2])) if numbers else None


def check_kernel(release: str, *needs: tuple[tuple[int, int], str]) -> None:
    have = parse_release(release)
    for minimum, reason in needs:
        if have is not None and have < minimum:  # unreadable: let loading decide
            raise PrerequisiteError(
                f"Linux {release} is too old: {reason}, which needs "
                f"Linux {minimum[0]}.{minimum[1]} or newer",
                EXIT_KERNEL_VERSION,
            )


def check_headers(modules_dir: Path, allow_kheaders: bool = True) -> Path:
    """bcc compiles against the running kernel's headers: a `build` and a
    `source` tree under /lib/modules/RELEASE (or the kheaders module)."""
    if _is((modules_dir / "build" / "include" / "generated").is_dir) and _is(
        (modules_dir / "source" / "include" / "linux" / "kconfig.h").is_file
    ):
        return modules_dir
    if allow_kheaders and _is(Path("/sys/kernel/kheaders.tar.xz").exists):
        return modules_dir
    raise PrerequisiteError(
        f"no kernel headers in {modules_dir}/build and source: install "
        "linux-headers-$(uname -r), or run `make setup`, which links the "
        "nearest Debian headers",
        EXIT_HEADERS,
    )


def kernel_features() -> Features:
    """The probes need the privileges to load BPF: without them every
    feature would look missing."""
    check_privileges()
    return probe_kernel()


def check_all(*versions: tuple[tuple[int, int], str], needs: dict[str, str] | None = None,
              features: Features | None = None,
              mount_tracefs: bool = True, attach: str = "tracepoint") -> Prerequisites:
    """All checks, cheapest first; raises on the first failure. `versions`:
    (minimum, reason) pairs where no probe can tell (none today); `needs`: the probed
    features the command needs (SERVE_NEEDS, ...; probed here unless
    `features` already has them). `attach`: the path tracer/program.py
    chose; the raw tracepoint needs no tracefs (exit 4) and no tracepoint
    format file (exit 6)."""
    check_privileges()
    if needs:
        (features or probe_kernel()).require(needs)
    check_kernel(kernel_release(), *versions)
    tracefs = Path(os.environ.get("TCPSTATE_TRACEFS", DEFAULT_TRACEFS))
    tracepoint = os.environ.get("TCPSTATE_TRACEPOINT", TRACEPOINT)
    if attach != "raw_tracepoint":
        tracefs = check_tracefs(tracefs, mount_tracefs)
        tracepoint = check_tracepoint(tracefs, tracepoint)
    override = os.environ.get("TCPSTATE_KERNEL_HEADERS")
    headers = check_headers(
        Path(override or f"/lib/modules/{os.uname().release}"),
        allow_kheaders=override is None,
    )
    return Prerequisites(tracefs=tracefs, tracepoint=tracepoint, headers=headers)
