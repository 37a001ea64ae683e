"""Kernel tests: root, a real BPF program, real sockets in private namespaces.

Where they cannot run they skip, except under CI=true, where they fail: CI
must prove the kernel parts, not skip them.
"""

from __future__ import annotations

import os

import pytest

from . import staging
from .exporter import Exporter
from .netlab import Lab, remove_stale_namespaces

# Service ports the session's exporter labels; each test takes its own.
SERVICE_PORTS = tuple(range(47001, 47033))


def _kernel_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "kernel tests need root"
    try:
        import bcc  # noqa: F401
    except ImportError:
        return "bcc (Debian python3-bpfcc) is not importable"
    from tracer.errors import TcpstateError
    from tracer.prereq import check_all

    try:
        check_all()
    except TcpstateError as exc:
        return str(exc)
    return None


def _cannot_run(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and a kernel test cannot run: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session", autouse=True)
def kernel_available() -> None:
    reason = _kernel_unavailable()
    if reason:
        _cannot_run(reason)
    remove_stale_namespaces()


@pytest.fixture(scope="session")
def staged():
    """tcpstate copied where another user, the pod stand-in and systemd's
    sandbox can run it, whatever the checkout's place (staging.py)."""
    with staging.staged() as copy:
        yield copy


@pytest.fixture(scope="session")
def exporters():
    """Two `tcpstate serve` for the session, labelling SERVICE_PORTS, one on
    each attach path: {"raw_tracepoint": ..., "tracepoint": ...}."""
    with Exporter("--attach", "raw_tracepoint", service_ports=SERVICE_PORTS) as raw, \
            Exporter("--attach", "tracepoint", service_ports=SERVICE_PORTS) as classic:
        yield {"raw_tracepoint": raw, "tracepoint": classic}


@pytest.fixture(scope="session")
def exporter(exporters):
    """The session's `tcpstate serve` on the default path (the raw tracepoint)."""
    return exporters["raw_tracepoint"]


@pytest.fixture
def lab():
    with Lab() as created:
        yield created
