"""tracer.features without the kernel: the instruction encoding, the test
override, and what a missing feature decides (exit 9, or the classic
tracepoint). The probes themselves run in tests/kernel/test_features.py."""

from __future__ import annotations

import logging

import pytest

from tracer import features as f
from tracer.btf import Btf
from tracer.errors import (EXIT_BPF, EXIT_KERNEL_VERSION, PrerequisiteError, TcpstateError,
                           UsageError)
from tracer.program import AUTO, RAW_TRACEPOINT, TRACEPOINT, choose_attachment

from .test_btf import socket_like


# Encodings as llvm-objdump prints them for the same instructions.
@pytest.mark.parametrize("encoded, expected", [
    (f.mov64_imm(f.R1, 1), "b7 01 00 00 01 00 00 00"),              # r1 = 1
    (f.mov64_imm(f.R0, -1), "b7 00 00 00 ff ff ff ff"),             # r0 = -1
    (f.store64(f.R10, -8, f.R1), "7b 1a f8 ff 00 00 00 00"),        # *(u64 *)(r10 - 8) = r1
    (f.cmpxchg64(f.R10, -8, f.R1), "db 1a f8 ff f1 00 00 00"),      # r0 = cmpxchg(r10 - 8, r0, r1)
    (f.exit_(), "95 00 00 00 00 00 00 00"),                         # exit
])
def test_instruction_encoding(encoded, expected):
    assert encoded.hex(" ") == expected


def test_programs_end_in_exit_with_r0_set():
    for program in (f.RETURN_ZERO, f.COMPARE_AND_SWAP):
        assert len(program) % 8 == 0
        assert program[-8:] == f.exit_() and program[-16:-8] == f.mov64_imm(f.R0, 0)
    assert f.cmpxchg64(f.R10, -8, f.R1) in f.COMPARE_AND_SWAP


@pytest.mark.parametrize("value, names", [
    ("", set()), ("cmpxchg", {"cmpxchg"}), ("ringbuf, btf", {"ringbuf", "btf"}),
    (" raw_tracepoint  mmapable ", {"raw_tracepoint", "mmapable"}),
])
def test_forced_missing_names(value, names):
    assert f.forced_missing({f.MISSING_OVERRIDE: value}) == names


def test_forced_missing_rejects_an_unknown_name():
    with pytest.raises(UsageError, match="unknown feature cmpxchng"):
        f.forced_missing({f.MISSING_OVERRIDE: "cmpxchng"})


def test_forced_features_are_missing_without_a_probe():
    every = " ".join(f.FEATURES)
    result = f.probe_kernel({f.MISSING_OVERRIDE: every})
    assert not any(result.has(name) for name in f.FEATURES)
    assert {probe.why_not for probe in result.probes.values()} == {f.FORCED}
    assert result.btf is None and all(p.seconds == 0 for p in result.probes.values())


def features(missing=(), btf=None) -> f.Features:
    probes = {name: f.Probe(name, name not in missing,
                            "BPF_PROG_LOAD: EINVAL (Invalid argument)" if name in missing else "")
              for name in f.FEATURES}
    return f.Features(probes, btf)


def test_summary_names_every_feature_and_why_one_is_missing():
    assert features().summary() == "kernel features: raw_tracepoint cmpxchg mmapable ringbuf btf"
    assert features({"ringbuf"}).summary() == (
        "kernel features: raw_tracepoint cmpxchg mmapable "
        "no ringbuf (BPF_PROG_LOAD: EINVAL (Invalid argument)) btf")


def test_require_names_the_first_missing_feature_with_exit_9():
    features({"ringbuf"}).require({f.CMPXCHG: "serve counts with it"})
    with pytest.raises(PrerequisiteError) as refused:
        features({"cmpxchg", "ringbuf"}).require(
            {f.CMPXCHG: "trace counts with it", f.RINGBUF: "trace sends its events through it"})
    assert refused.value.exit_code == EXIT_KERNEL_VERSION
    assert str(refused.value) == (
        "this kernel lacks BPF compare-and-swap, BPF_CMPXCHG (Linux 5.12), feature cmpxchg: "
        "trace counts with it (BPF_PROG_LOAD: EINVAL (Invalid argument))")
    assert "\n" not in str(refused.value)


def test_no_raw_tracepoint_falls_back_with_one_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="tracer.program"):
        chosen = choose_attachment(AUTO, features=features({"raw_tracepoint"}))
    assert chosen.kind == TRACEPOINT and chosen.reason.startswith("no raw tracepoint (")
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert "classic tracepoint" in caplog.records[0].getMessage()


def test_forced_raw_tracepoint_without_it_is_exit_9():
    with pytest.raises(PrerequisiteError, match="feature raw_tracepoint") as refused:
        choose_attachment(RAW_TRACEPOINT, features=features({"raw_tracepoint"}))
    assert refused.value.exit_code == EXIT_KERNEL_VERSION


def test_the_classic_tracepoint_asked_for_needs_no_feature(caplog):
    chosen = choose_attachment(TRACEPOINT, features=features(set(f.FEATURES)))
    assert chosen.kind == TRACEPOINT and chosen.reason == "" and not caplog.records


def test_missing_btf_falls_back_with_the_probes_reason():
    chosen = choose_attachment(AUTO, features=features({"btf"}))
    assert chosen.kind == TRACEPOINT
    assert chosen.reason == "BPF_PROG_LOAD: EINVAL (Invalid argument)"
    with pytest.raises(TcpstateError) as refused:
        choose_attachment(RAW_TRACEPOINT, features=features({"btf"}))
    assert refused.value.exit_code == EXIT_BPF


def test_the_probes_btf_is_the_one_used():
    """A small BTF without sock_common.skc_prot: the fallback says so (the
    blob's name, not the kernel's file), so the probe's BTF was used, not
    /sys/kernel/btf/vmlinux loaded again."""
    lacking = Btf.from_bytes(socket_like().encode())
    chosen = choose_attachment(AUTO, features=features(btf=lacking))
    assert chosen.kind == TRACEPOINT
    assert chosen.reason == (
        "BTF data: sock.__sk_common (struct sock_common) has no member 'skc_prot'")
