"""The close-reason table (tracer/reasons.py): each row of the README's
table, the kernel facts it rests on, and the map the program reads."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from tracer.program import RAW_TRACEPOINT, TRACEPOINT, Attachment, cflags
from tracer.reasons import (CODE, MAX_ERRNO, NERRNO_SLOTS, NREASONS, REASONS, TABLE_CELLS,
                            classify, close_reason_table, errno_slot, evidence_key,
                            parse_reasons, possible_reasons)
from tracer.states import NSTATES, code_of

README = Path(__file__).resolve().parents[2] / "README.md"


def reason(old: str, sk_err: int = 0, owner: bool = False, port_zero: bool = False) -> str:
    return classify(code_of(old), sk_err, owner, port_zero)


@pytest.mark.parametrize("owner", [False, True])
def test_errors_decide_whatever_the_context(owner):
    """The kernel writes sk_err before tcp_done(): a RST processed from the
    backlog inside the owner's call is still the peer's."""
    assert reason("syn_sent", errno.ECONNREFUSED, owner) == "refused"
    assert reason("syn_sent", errno.ETIMEDOUT, owner) == "timeout"
    assert reason("established", errno.ETIMEDOUT, owner) == "timeout"
    for unreachable in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES):
        assert reason("syn_sent", unreachable, owner) == "unreachable"
    assert reason("established", errno.ECONNRESET, owner) == "reset_by_peer"
    assert reason("close_wait", errno.EPIPE, owner) == "reset_by_peer"
    assert reason("established", errno.ECONNABORTED, owner) == "reset_local"
    assert reason("syn_sent", errno.ECONNABORTED, owner) == "cancelled"
    assert reason("established", errno.EPROTO, owner) == "other"


def test_icmp_port_unreachable_is_refused_and_ipv6_prohibited_unreachable():
    """icmp_err_convert: port unreachable -> ECONNREFUSED; IPv4 prohibited
    -> EHOSTUNREACH, IPv6 prohibited -> EACCES."""
    assert reason("syn_sent", errno.ECONNREFUSED) == "refused"
    assert reason("syn_sent", errno.EACCES) == reason("syn_sent", errno.EHOSTUNREACH)


def test_a_soft_error_reported_at_timeout_is_what_counts():
    """tcp_write_err() reports sk_err_soft (an ICMP error seen meanwhile)
    instead of ETIMEDOUT: such a timeout counts as unreachable."""
    assert reason("syn_sent", errno.EHOSTUNREACH) == "unreachable"


def test_connects_that_end_without_an_error():
    assert reason("syn_sent", 0, owner=True, port_zero=True) == "no_local_port"
    assert reason("syn_sent", 0, owner=True) == "cancelled"
    assert reason("syn_sent", 0, owner=False) == "other"


@pytest.mark.parametrize("owner", [False, True])
def test_local_resets_show_no_error(owner):
    """tcp_disconnect() writes ECONNRESET only after the transition; a close
    with unread data writes none."""
    for old in ("established", "close_wait", "syn_recv"):
        assert reason(old, 0, owner) == "reset_local"


def test_normal_ends():
    for old in ("fin_wait2", "closing", "last_ack", "listen"):
        for owner in (False, True):
            assert reason(old, 0, owner) == "normal"
    assert reason("fin_wait1", 0, owner=False) == "normal"
    assert reason("fin_wait1", 0, owner=True) == "reset_local"
    assert reason("listen", errno.ECONNABORTED, True) == "normal"


def test_unknown_state_codes_are_other():
    assert classify(0, 0, False, False) == "other"
    assert classify(code_of("new_syn_recv"), 0, True, False) == "other"


def test_errno_slots_cap_large_values():
    assert errno_slot(MAX_ERRNO) == MAX_ERRNO
    assert errno_slot(MAX_ERRNO + 1) == errno_slot(10**6) == errno_slot(-1) == NERRNO_SLOTS - 1


def test_the_table_holds_every_evidence_once():
    table = close_reason_table()
    assert len(table) == TABLE_CELLS == NSTATES * NERRNO_SLOTS * 4
    keys = {evidence_key(old, err, owner, zero) for old in range(NSTATES)
            for err in range(NERRNO_SLOTS) for owner in (False, True) for zero in (False, True)}
    assert keys == set(range(TABLE_CELLS))
    key = evidence_key(code_of("syn_sent"), errno.ECONNREFUSED, False, False)
    assert table[key] == CODE["refused"]
    key = evidence_key(code_of("syn_sent"), 0, True, True)
    assert table[key] == CODE["no_local_port"]
    assert max(table) < NREASONS


def test_possible_reasons_are_what_the_table_gives_for_closing_states():
    pairs = possible_reasons()
    assert len(pairs) == len(set(pairs)) == 54
    syn_sent = {r for old, r in pairs if old == code_of("syn_sent")}
    assert syn_sent == {"refused", "timeout", "unreachable", "reset_by_peer", "cancelled",
                        "no_local_port", "other"}
    assert {r for old, r in pairs if old == code_of("listen")} == {"normal"}


def test_parse_reasons():
    assert parse_reasons("refused, Timeout") == ["refused", "timeout"]
    with pytest.raises(ValueError, match="valid reasons: normal, refused"):
        parse_reasons("refused,nope")


def test_the_c_gets_the_geometry_only_with_btf_offsets():
    offsets = {"SK_CLOSE": 284, "SK_CLOSE_LEN": 44, "SK_ERR": 284, "SK_OWNED": 324}
    with_reasons = cflags(Attachment(RAW_TRACEPOINT, offsets), 1, 16, 2, release="6.18.0")
    assert "-DCLOSE_REASONS" in with_reasons
    assert f"-DNREASONS={NREASONS}" in with_reasons
    assert f"-DNERRNO_SLOTS={NERRNO_SLOTS}" in with_reasons
    assert f"-DREASON_OTHER={CODE['other']}" in with_reasons
    assert not any("CLOSE_REASONS" in flag
                   for flag in cflags(Attachment(TRACEPOINT, {}), 1, 16, 2))
    assert not Attachment(RAW_TRACEPOINT, {}).close_reasons


def test_readme_table_names_every_reason():
    """The README's close reasons table has a row per reason, in order."""
    text = README.read_text()
    section = text[text.index("### Close reasons"):]
    rows = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert rows[:len(REASONS)] == list(REASONS)


def test_one_line_says_reasons_are_off(caplog):
    """Forced classic tracepoint: one line; a fallback's own line says it
    (one line in all); the raw tracepoint with the offsets: none."""
    import logging

    from tracer.program import _fallback, warn_if_reasons_off

    with caplog.at_level(logging.WARNING, logger="tracer.program"):
        warn_if_reasons_off(Attachment(TRACEPOINT, {}))
        assert [r.getMessage() for r in caplog.records] == [
            "close reasons are off: they need the raw tracepoint and the kernel's BTF "
            "(/sys/kernel/btf/vmlinux); attaching to the tracepoint sock:inet_sock_set_state"]
        caplog.clear()
        warn_if_reasons_off(_fallback("no BTF"))
        assert len(caplog.records) == 1 and "close reasons are off" in caplog.records[0].getMessage()
        caplog.clear()
        warn_if_reasons_off(Attachment(RAW_TRACEPOINT, {"SK_CLOSE": 284}))
        assert caplog.records == []
