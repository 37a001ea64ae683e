"""The feature probes on the real kernel: each says yes here, a variant the
kernel cannot accept is refused with its errno, and the commands report the
answers and act on a missing one."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from tracer import features as f

from .exporter import TCPSTATE


@pytest.mark.parametrize("name", f.FEATURES)
def test_each_probe_says_yes_on_this_kernel(name):
    result, btf = f.probe(name)
    assert result.ok, result.why_not
    assert (btf is not None) == (name == f.BTF)


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_probing_leaves_no_descriptor_open():
    before = open_descriptors()
    assert f.probe_kernel({}).summary() == (
        "kernel features: raw_tracepoint cmpxchg mmapable ringbuf btf")
    assert open_descriptors() == before


def test_an_atomic_the_kernel_does_not_know_is_refused_with_its_errno():
    """The compare-and-swap program with an atomic operation no kernel has:
    the verifier refuses it as a kernel before 5.12 refuses BPF_CMPXCHG, so
    the probe can say no."""
    unknown_atomic = f.instruction(f.BPF_STX | f.BPF_DW | f.BPF_ATOMIC, f.R10, f.R1, -8,
                                   f.BPF_CMPXCHG | 0x02)
    program = f.COMPARE_AND_SWAP.replace(f.cmpxchg64(f.R10, -8, f.R1), unknown_atomic)
    assert program != f.COMPARE_AND_SWAP
    with pytest.raises(f.BpfRefused) as refused:
        os.close(f.load_program(f.BPF_PROG_TYPE_SOCKET_FILTER, program))
    assert (refused.value.call, refused.value.errno) == ("BPF_PROG_LOAD", errno.EINVAL)


def test_a_map_type_the_kernel_does_not_know_is_refused_with_its_errno():
    with pytest.raises(f.BpfRefused) as refused:
        os.close(f.create_map(4096, 4, 8, 1))
    assert (refused.value.call, refused.value.errno) == ("BPF_MAP_CREATE", errno.EINVAL)


def run(*command: str, missing: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([TCPSTATE, *command], capture_output=True, text=True, timeout=120,
                          env={**os.environ, f.MISSING_OVERRIDE: missing})


def test_dry_run_reports_the_kernel_features():
    result = run("serve", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        "tcpstate: kernel features: raw_tracepoint cmpxchg mmapable ringbuf btf")
    assert "attached to the raw tracepoint" in result.stdout


def test_without_the_raw_tracepoint_serve_takes_the_classic_one_with_one_warning():
    result = run("serve", "--dry-run", missing="raw_tracepoint")
    assert result.returncode == 0, result.stderr
    assert "no raw_tracepoint (forced missing by TCPSTATE_MISSING_FEATURES)" in result.stdout
    assert "attached to the tracepoint sock:inet_sock_set_state" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "level=WARNING" in line]
    assert len(warnings) == 1 and "attaching to the classic tracepoint" in warnings[0]


def test_without_the_raw_tracepoint_trace_takes_the_classic_one():
    result = run("trace", "--duration", "1", missing="raw_tracepoint")
    assert result.returncode == 0, result.stderr
    assert "tracing the tracepoint sock:inet_sock_set_state" in result.stderr
    warnings = [line for line in result.stderr.splitlines() if "level=WARNING" in line]
    assert len(warnings) == 1 and "attaching to the classic tracepoint" in warnings[0]
