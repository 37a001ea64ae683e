"""`tcpstate trace` output, from events built by hand: text columns, JSON
records, the exit summary, and the closed-pipe handling."""

from __future__ import annotations

import json
import os
import re
import socket
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tracer.probe import bpf_source
from tracer.ringbuf import record_dtype
from tracer.reasons import CODE, NO_REASON
from tracer.states import BY_NAME, NSTATES
from tracer.trace import Output
from tracer.trace_format import (
    EVENT, UNKNOWN_NS, JsonFormat, SocketIds, TextFormat, WallClock, _digits,
    _distinct_rows, comm_text, format_summary, transition_matrix,
)


def code(name: str) -> int:
    return BY_NAME[name].kernel_code


def mapped(ip: str) -> bytes:
    """The kernel's form of an IPv4 address: IPv4-mapped IPv6."""
    return b"\0" * 10 + b"\xff\xff" + socket.inet_pton(socket.AF_INET, ip)


def event(**fields) -> np.ndarray:
    one = np.zeros(1, EVENT)
    defaults = dict(timestamp_ns=time.monotonic_ns(), sk=0xFFFF888812345678,
                    duration_ns=UNKNOWN_NS, lifetime_ns=UNKNOWN_NS, family=0,
                    oldstate=code("close"), newstate=code("syn_sent"), reason=NO_REASON,
                    saddr=mapped("10.0.0.1"), daddr=mapped("10.0.0.2"))
    for name, value in {**defaults, **fields}.items():
        one[name] = value
    return one


def events(*each: np.ndarray) -> np.ndarray:
    return np.concatenate(each)


class FixedClock(WallClock):
    def __init__(self, offset_ns: int = 0):
        self.offset_ns = offset_ns


def test_event_layout_matches_the_c_struct():
    """EVENT spells struct trace_event of bpf/trace.bpf.c field by field:
    same names, order and C offsets."""
    source = bpf_source("trace").read_text()
    body = re.search(r"struct trace_event \{(.*?)\};", source, re.S).group(1)
    sizes = {"u64": 8, "u32": 4, "u16": 2, "u8": 1, "char": 1}
    offset, fields = 0, []
    for kind, name, count in re.findall(r"^\s*(\w+) (\w+)(?:\[(\w+)\])?;", body, re.M):
        size = sizes[kind] * (16 if count else 1)  # [16] and [TASK_COMM_LEN]
        offset = -(-offset // sizes[kind]) * sizes[kind]  # C alignment
        fields.append((name, offset, size))
        offset += size
    assert [(name, EVENT.fields[name][1], EVENT.fields[name][0].itemsize)
            for name in EVENT.names] == fields
    assert EVENT.itemsize == -(-offset // 8) * 8 == 96
    assert record_dtype(EVENT).itemsize == 104  # 8-byte header, 8-byte aligned


@settings(max_examples=300)
@given(st.lists(st.integers(0, 2**64 - 2), min_size=1, max_size=50),
       st.integers(1, 12))
def test_digits_are_right_aligned_and_capped(values, width):
    cells = _digits(np.array(values, np.uint64), width)
    cap = 10**width - 1
    assert [bytes(row).decode() for row in cells] == [f"{min(v, cap):>{width}}" for v in values]


def text_of(formatter: TextFormat, batch: np.ndarray) -> list[str]:
    return formatter.lines(batch).decode().splitlines()


def test_text_line_every_column():
    clock = FixedClock(offset_ns=1_700_000_000 * 10**9)
    fmt = TextFormat(clock)
    mono = 12_345_678_901
    line, = text_of(fmt, event(
        timestamp_ns=mono, owner_pid=4321, owner_comm=b"curl",
        sport=41234, dport=443, oldstate=code("established"), newstate=code("fin_wait1"),
        duration_ns=1_234_567_890, lifetime_ns=2 * 10**9))
    wall_ms = (mono + clock.offset_ns) // 10**6
    local = time.localtime(wall_ms // 1000)
    expected = (f"{time.strftime('%H:%M:%S', local)}.{wall_ms % 1000:03d}    4321 curl"
                f"{'':12}10.0.0.1{'':32}41234 10.0.0.2{'':32}  443 established  -> fin_wait1"
                f"{'':4}-{'':19}1234.567")
    assert line == expected
    assert len(line) + 1 == fmt.line_length == len(fmt.header())


def test_text_reason_column_of_closes():
    fmt = TextFormat(FixedClock())
    header = fmt.header().decode()
    lines = text_of(fmt, events(
        event(oldstate=code("syn_sent"), newstate=code("close"), reason=CODE["no_local_port"]),
        event(oldstate=code("established"), newstate=code("close"), reason=CODE["normal"]),
        event(oldstate=code("close"), newstate=code("syn_sent"))))
    column = header.index("REASON")
    assert [line[column:].split()[0] for line in lines] == ["no_local_port", "normal", "-"]


def test_json_reason_of_a_close_and_null_otherwise():
    fmt = JsonFormat(FixedClock())
    records = [json.loads(line) for line in fmt.lines(events(
        event(oldstate=code("syn_sent"), newstate=code("close"), reason=CODE["timeout"]),
        event())).splitlines()]
    assert [record["reason"] for record in records] == ["timeout", None]


def test_text_unknowns_and_ipv6_share_the_columns():
    fmt = TextFormat(FixedClock())
    v6 = socket.inet_pton(socket.AF_INET6, "2001:db8:1234:5678:9abc:def0:1234:5678")
    lines = text_of(fmt, events(
        event(family=1, saddr=v6, daddr=socket.inet_pton(socket.AF_INET6, "::1"),
              sport=1, dport=65535),
        event(sport=0, dport=0, duration_ns=0, owner_pid=7, owner_comm=b"a" * 16)))
    header = fmt.header().decode()
    assert {len(line) for line in lines} == {len(header) - 1}
    first, second = (line.split() for line in lines)
    assert first[1:7] == ["-", "-", "2001:db8:1234:5678:9abc:def0:1234:5678", "1", "::1",
                          "65535"]
    assert first[-1] == "-"
    assert second[1:3] == ["7", "a" * 15]  # COMM is 15 characters at most
    assert second[-1] == "0.000"
    for title in ("LADDR", "RADDR", "OLDSTATE"):
        assert all(line[header.index(title)] != " " for line in lines)


def test_ipv4_only_columns_are_narrow():
    wide, narrow = TextFormat(FixedClock()), TextFormat(FixedClock(), ipv4_only=True)
    assert wide.line_length - narrow.line_length == 2 * (39 - 15)
    line, = text_of(narrow, event(saddr=mapped("255.255.255.255"), sport=65535))
    assert "255.255.255.255 65535" in line


def test_an_ipv4_mapped_address_of_an_ipv6_socket_stays_ipv6():
    fmt = TextFormat(FixedClock())
    v4, v6 = text_of(fmt, events(event(family=0), event(family=1)))
    assert v4.split()[3] == "10.0.0.1" and v6.split()[3] == "::ffff:10.0.0.1"


def test_process_names_cannot_inject_escapes():
    assert comm_text(b"evil\x1b[31m\n\0garbage") == "evil?[31m?"
    assert comm_text(b"caf\xc3\xa9") == "caf??"
    assert comm_text(b"") == "-"
    fmt = TextFormat(FixedClock())
    line, = text_of(fmt, event(owner_pid=1, owner_comm=b"x\x1b\x07y"))
    assert "\x1b" not in line and "x??y" in line


def test_durations_in_milliseconds():
    fmt = TextFormat(FixedClock())
    durations = [0, 999, 1_000, 1_500_000, 59_999_999_999, 10**22 // 10**4, UNKNOWN_NS]
    batch = events(*(event(duration_ns=d) for d in durations))
    assert [line.split()[-1] for line in text_of(fmt, batch)] == [
        "0.000", "0.000", "0.001", "1.500", "59999.999", "9999999999.999", "-"]


def test_distinct_rows_survive_a_hash_collision():
    k = 0x9E3779B97F4A7C15
    # (1, 0) and (2, k ^ 2k) hash alike: key = w0 * k ^ w1
    colliding = np.array([[1, 0], [2, (k ^ (2 * k)) % 2**64], [1, 0]], np.uint64)
    first, inverse = _distinct_rows(colliding)
    assert len(first) == 2
    assert (colliding[first][inverse] == colliding).all()


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2**64 - 1)),
                min_size=1, max_size=40))
def test_distinct_rows_are_exact(rows):
    words = np.array(rows, np.uint64)
    first, inverse = _distinct_rows(words)
    assert len(first) == len(set(rows))
    if inverse is None:  # every row the same: the one value stands for all
        assert len(first) == 1 and (words == words[first[0]]).all()
    else:
        assert (words[first][inverse] == words).all()


@pytest.mark.parametrize("ipv4_only", [False, True])
def test_a_batch_renders_each_event_as_it_would_alone(ipv4_only):
    """Columns whose rows are all alike take a shortcut; a batch must still
    print every line as that event alone prints it."""
    fmt = TextFormat(FixedClock(), ipv4_only=ipv4_only)
    same = [event(duration_ns=d, owner_pid=p, owner_comm=b"svc" if p else b"")
            for d, p in ((5, 0), (2**63, 7), (2**63 - 1, 0), (UNKNOWN_NS, 7))]
    mixed = same + [event(daddr=mapped("10.0.0.9")), event(saddr=mapped("10.9.0.1"))]
    for batch in (same, mixed):
        alone = b"".join(fmt.lines(one) for one in batch)
        assert fmt.lines(events(*batch)) == alone


def test_json_record_every_field():
    clock = FixedClock(offset_ns=10**18)
    fmt = JsonFormat(clock, SocketIds(key=b"k" * 16))
    mono = 5 * 10**9
    record = json.loads(fmt.lines(event(
        timestamp_ns=mono, owner_pid=99, owner_comm=b"nginx", sport=80, dport=50000,
        oldstate=code("syn_recv"), newstate=code("established"), side=2,
        duration_ns=1500, lifetime_ns=2500)))
    assert record == {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime((mono + 10**18) // 10**9))
        + ".000Z",
        "timestamp_ns": mono + 10**18, "monotonic_ns": mono,
        "pid": 99, "comm": "nginx", "family": "ipv4",
        "local_address": "10.0.0.1", "local_port": 80,
        "remote_address": "10.0.0.2", "remote_port": 50000,
        "old_state": "syn_recv", "old_state_code": 3, "old_state_mib": 4,
        "new_state": "established", "new_state_code": 1, "new_state_mib": 5,
        "duration_ns": 1500, "lifetime_ns": 2500, "side": "server", "reason": None,
        "socket_id": SocketIds(key=b"k" * 16)(0xFFFF888812345678, mono - 2500),
    }


def test_json_unknowns_are_null():
    fmt = JsonFormat(FixedClock())
    record = json.loads(fmt.lines(event(family=1, oldstate=code("new_syn_recv"), newstate=0,
                                        saddr=socket.inet_pton(socket.AF_INET6, "::1"))))
    assert record["pid"] is None and record["comm"] is None
    assert record["duration_ns"] is None and record["lifetime_ns"] is None
    assert record["side"] is None and record["family"] == "ipv6"
    assert record["old_state_mib"] is None and record["new_state"] == "unknown_0"
    assert record["local_address"] == "::1"


def test_socket_ids_are_keyed_stable_and_hide_the_address():
    sk = 0xFFFF888812345678
    ids = SocketIds()
    assert ids(sk, 100) == ids(sk, 100)
    assert ids(sk, 100) != ids(sk, 200)  # the same memory, a later socket
    assert ids(sk, 100) != SocketIds()(sk, 100)  # another run, another key
    assert "12345678" not in ids(sk, 0) and len(ids(sk, 0)) == 16


def test_summary_matrix_rows_columns_and_totals():
    batch = events(event(oldstate=code("close"), newstate=code("syn_sent")),
                   event(oldstate=code("close"), newstate=code("syn_sent")),
                   event(oldstate=code("syn_sent"), newstate=code("close")))
    matrix = transition_matrix(batch)
    assert matrix.shape == (NSTATES, NSTATES) and matrix.sum() == 3
    text = format_summary(matrix, printed=3, lost=4, missed=5).splitlines()
    assert text[0].startswith("tcpstate trace: 3 events printed, 4 lost (ring buffer full), "
                              "5 missed")
    assert text[1].split() == ["old", "\\", "new", "close", "syn_sent", "total"]
    assert text[2].split() == ["close", "0", "2", "2"]
    assert text[3].split() == ["syn_sent", "1", "0", "1"]
    assert text[4].split() == ["total", "1", "2", "3"]


def test_summary_of_nothing():
    empty = transition_matrix(np.zeros(0, EVENT))
    assert format_summary(empty, 0, 0, 0).splitlines() == [
        "tcpstate trace: 0 events printed, 0 lost (ring buffer full), "
        "0 missed (the kernel skipped the program: a nested run on a CPU)"]


def test_a_closed_pipe_is_noticed_without_writing():
    read, write = os.pipe()
    try:
        output = Output(write)
        output.wait(0)
        assert not output.closed
        os.close(read)
        output.wait(1)
        assert output.closed
        output.write(b"more\n")  # now goes to /dev/null, silently
    finally:
        os.close(write)


def test_a_write_to_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    try:
        output = Output(write)
        os.close(read)
        output.write(b"line\n")
        assert output.closed
    finally:
        os.close(write)


def test_regular_files_are_never_polled(tmp_path):
    with open(tmp_path / "out", "wb") as sink:
        output = Output(sink.fileno())
        started = time.monotonic()
        output.wait(0.01)
        assert not output.closed and time.monotonic() - started >= 0.01
        output.write(b"x" * 100_000)
    assert (tmp_path / "out").stat().st_size == 100_000


@pytest.mark.parametrize("name", ["close", "listen", "time_wait", "new_syn_recv"])
def test_state_pairs_are_spelled_from_the_state_table(name):
    fmt = TextFormat(FixedClock())
    line, = text_of(fmt, event(oldstate=code(name), newstate=code("close")))
    assert f"{name:<12} -> close" in line
