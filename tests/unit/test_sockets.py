"""`tcpstate sockets` without a kernel: durations, /proc's address fields,
and matching table entries to /proc sockets by state and 4-tuple hash."""

from __future__ import annotations

import numpy as np
import pytest

from tracer.socket_table import ENTRY_DTYPE
from tracer.sockets import (ProcSockets, address_text, format_duration, listed_of, match,
                            parse_duration)
from tracer.states import code_of

from .test_socket_table import reference_hash


@pytest.mark.parametrize("text, seconds", [
    ("90s", 90), ("10m", 600), ("1h", 3600), ("1h30m", 5400), ("500ms", 0.5), ("1.5s", 1.5),
    ("2d", 172800), ("0s", 0),
])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "10", "1x", "-5m", "m", "1h 30m", "1.s", "s10", "10mm"])
def test_bad_durations(text):
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_duration_display():
    assert [format_duration(s) for s in (None, 0.25, 0, 59, 61, 3600 + 62, 90000)] == [
        "?", "250ms", "0ms", "59s", "1m1s", "1h1m", "1d1h"]


HEADER = b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def tcp_line(sl, local, lport, remote, rport, state, inode):
    return (f"{sl:4d}: {local}:{lport:04X} {remote}:{rport:04X} {state:02X} 00000000:00000000 "
            f"00:00000000 00000000     0        0 {inode} 1 0000000000000000 100 0 0 10 0\n"
            ).encode()


LOOPBACK, PEER = "0100007F", "0200007F"  # 127.0.0.1, 127.0.0.2 as /proc prints them
MAPPED = "0000000000000000FFFF00000100007F"  # ::ffff:127.0.0.1


def proc(*rows, netns=1, v6=False):
    text = HEADER + b"".join(tcp_line(i, *row) for i, row in enumerate(rows))
    return ProcSockets.parse(text, netns, v6)


def test_proc_lines_become_columns_and_hashes():
    found = proc((LOOPBACK, 40000, PEER, 5432, code_of("close_wait"), 11),
                 ("00000000", 5432, "00000000", 0, code_of("listen"), 12))
    assert found.local_port.tolist() == [40000, 5432] and found.inode.tolist() == [11, 12]
    assert found.state.tolist() == [code_of("close_wait"), code_of("listen")]
    assert address_text(found.local[0], False) == "127.0.0.1"
    assert address_text(found.remote[0], False) == "127.0.0.2"
    assert int(found.hashes[0]) == reference_hash(40000, 5432, [0x0100007F, 0x0200007F])
    assert int(found.unported[1]) == reference_hash(0, 0, [0, 0])
    v6 = proc((MAPPED, 40000, "00000000000000000000000001000000", 80, 1, 13), v6=True)
    assert address_text(v6.local[0], True) == "127.0.0.1"  # v4-mapped shows as IPv4
    assert address_text(v6.remote[0], True) == "::1"
    assert int(v6.hashes[0]) == reference_hash(
        40000, 80, [0, 0, 0xFFFF0000, 0x0100007F, 0, 0, 0, 0x01000000])
    assert proc() is None




def entries(*rows):
    table = np.zeros(len(rows), ENTRY_DTYPE)
    for entry, (state, tuple_hash, entered, born) in zip(table, rows):
        entry["state"], entry["tuple_hash"] = code_of(state), tuple_hash
        entry["entered_ns"], entry["born_ns"] = entered, born
    return table


def test_entries_match_their_socket_by_state_and_tuple():
    found = proc((LOOPBACK, 40000, PEER, 5432, code_of("close_wait"), 11),
                 (LOOPBACK, 40000, PEER, 5432, code_of("established"), 12),
                 (LOOPBACK, 40001, PEER, 80, code_of("syn_sent"), 13),
                 (LOOPBACK, 40002, PEER, 5432, code_of("close_wait"), 0))
    now = 100 * 10**9
    table = entries(("close_wait", found.hashes[0], 40 * 10**9, 0),
                    ("syn_sent", found.unported[2], 99 * 10**9, 99 * 10**9),  # hashed before its port
                    ("close_wait", found.hashes[3], 90 * 10**9, 10 * 10**9),
                    ("close_wait", 12345, 95 * 10**9, 0))                     # no such socket now
    matched, ambiguous = match(table, found)
    assert matched.tolist() == [0, 2, 3, -1] and not ambiguous.any()
    first, second, third, fourth = listed_of(table, now, found, matched, ambiguous,
                                             {11: (7, "leaky"), 13: (8, "curl")})
    assert (first.pid, first.command, first.local_port, first.age_seconds) == (7, "leaky", 40000, 60)
    assert first.lifetime_seconds is None  # birth not seen
    assert (second.pid, second.state, second.local_port) == (8, "syn_sent", 40001)
    assert (third.pid, third.lifetime_seconds, third.local_port) == (None, 90, 40002)  # orphaned
    assert (fourth.local, fourth.pid, fourth.local_port) == ("?", None, None)


def test_the_same_tuple_in_two_namespaces_is_ambiguous():
    row = (LOOPBACK, 40000, PEER, 80, code_of("established"))
    found = ProcSockets.concatenate([proc((*row, 21), netns=1), proc((*row, 22), netns=2)])
    table = entries(("established", found.hashes[0], 1, 0), ("established", found.hashes[0], 2, 0))
    matched, ambiguous = match(table, found)
    assert matched.tolist() == [0, 1] and ambiguous.all()
    assert [item.netns for item in listed_of(table, 10, found, matched, ambiguous, {})] == [1, 2]


def test_nothing_in_proc_matches_nothing():
    matched, _ = match(entries(("established", 1, 1, 0)), ProcSockets.concatenate([]))
    assert matched.tolist() == [-1]
