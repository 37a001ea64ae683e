"""`tcpstate sockets` without a kernel: durations, /proc's address fields,
and matching table entries to /proc sockets by state and 4-tuple hash."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from tracer.socket_table import ENTRY_DTYPE, tuple_hashes
from tracer.sockets import ProcSocket, _address, format_duration, match, parse_duration
from tracer.states import code_of


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


def test_proc_addresses():
    assert _address("0100007F") == ([0x0100007F], "127.0.0.1")
    words, text = _address("0000000000000000FFFF00000100007F")
    assert text == "127.0.0.1" and len(words) == 4  # v4-mapped: hashed as 4 words
    assert _address("00000000000000000000000001000000")[1] == "::1"


def proc(state: str, local_port: int, remote_port: int, inode: int, netns: int = 1):
    return ProcSocket(netns, "ipv4", "127.0.0.1", local_port, "127.0.0.2", remote_port,
                      code_of(state), inode)


def hashes_of(sockets, zero_local=False):
    return tuple_hashes(np.array([0 if zero_local else s.local_port for s in sockets]),
                        np.array([s.remote_port for s in sockets]),
                        np.array([[0x0100007F]] * len(sockets)),
                        np.array([[0x0200007F]] * len(sockets)))


def entries(*rows):
    table = np.zeros(len(rows), ENTRY_DTYPE)
    for entry, (state, tuple_hash, entered, born) in zip(table, rows):
        entry["state"], entry["tuple_hash"] = code_of(state), tuple_hash
        entry["entered_ns"], entry["born_ns"] = entered, born
    return table


def test_entries_match_their_socket_by_state_and_tuple():
    sockets = [proc("close_wait", 40000, 5432, 11), proc("established", 40000, 5432, 12),
               proc("syn_sent", 40001, 80, 13), proc("close_wait", 40002, 5432, 0)]
    full, unported = hashes_of(sockets), hashes_of(sockets, zero_local=True)
    now = 100 * 10**9
    table = entries(("close_wait", full[0], 40 * 10**9, 0),
                    ("syn_sent", unported[2], 99 * 10**9, 99 * 10**9),  # hashed before its port
                    ("close_wait", full[3], 90 * 10**9, 10 * 10**9),
                    ("close_wait", 12345, 95 * 10**9, 0))                # no such socket now
    listed = match(table, now, sockets, full, unported, {11: (7, "leaky"), 13: (8, "curl")})
    first, second, third, fourth = listed
    assert (first.pid, first.command, first.local_port, first.age_seconds) == (7, "leaky", 40000, 60)
    assert first.lifetime_seconds is None  # birth not seen
    assert (second.pid, second.state, second.local_port) == (8, "syn_sent", 40001)
    assert (third.pid, third.lifetime_seconds, third.local_port) == (None, 90, 40002)  # orphaned
    assert (fourth.local, fourth.pid) == ("?", None)
    assert not any(item.ambiguous for item in listed)


def test_the_same_tuple_in_two_namespaces_is_ambiguous():
    sockets = [proc("established", 40000, 80, 21, netns=1),
               proc("established", 40000, 80, 22, netns=2)]
    full = hashes_of(sockets)
    table = entries(("established", full[0], 1, 0), ("established", full[0], 2, 0))
    listed = match(table, 10, sockets, full, full, {})
    assert [item.netns for item in listed] == [1, 2]
    assert all(item.ambiguous for item in listed)
