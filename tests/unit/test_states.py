"""The state table and the histogram buckets: the facts everything else imports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tracer import metrics as m
from tracer.program import COUNTERS, SOCKET_MEMBERS, bpf_dir
from tracer.states import (
    BY_CODE, BY_NAME, GAUGE_STATES, KNOWN_TRANSITIONS, NSTATES, STATES, TIME_WAIT_HANDOFFS,
    code_of, name_of,
)


def test_kernel_codes_are_those_of_tcp_states_h():
    # include/net/tcp_states.h, in the kernel's order
    kernel = ["established", "syn_sent", "syn_recv", "fin_wait1", "fin_wait2", "time_wait",
              "close", "close_wait", "last_ack", "listen", "closing", "new_syn_recv"]
    assert [BY_CODE[code].name for code in range(1, 13)] == kernel
    assert NSTATES == 13


def test_mib_codes_follow_rfc_4022_tcpConnState():
    mib = {s.rfc793_name: s.mib_code for s in STATES if s.mib_code is not None}
    assert mib == {"CLOSED": 1, "LISTEN": 2, "SYN-SENT": 3, "SYN-RECEIVED": 4,
                   "ESTABLISHED": 5, "FIN-WAIT-1": 6, "FIN-WAIT-2": 7, "CLOSE-WAIT": 8,
                   "LAST-ACK": 9, "CLOSING": 10, "TIME-WAIT": 11}
    assert BY_NAME["new_syn_recv"].mib_code is None


def test_names_and_codes_round_trip():
    for state in STATES:
        assert name_of(state.kernel_code) == state.name
        assert code_of(state.name) == state.kernel_code
    assert name_of(0) == "unknown_0"
    with pytest.raises(ValueError, match="valid states: close, listen"):
        code_of("estab")


def test_known_transitions_are_real_state_changes():
    assert len(set(KNOWN_TRANSITIONS)) == len(KNOWN_TRANSITIONS)
    for old, new in KNOWN_TRANSITIONS + TIME_WAIT_HANDOFFS:
        assert old != new and old in BY_NAME and new in BY_NAME
        # full sockets never enter TIME-WAIT: a mini-socket takes over
        assert "time_wait" not in (old, new)
    assert set(TIME_WAIT_HANDOFFS) <= set(KNOWN_TRANSITIONS)
    assert "close" not in GAUGE_STATES and "new_syn_recv" not in GAUGE_STATES


@pytest.mark.parametrize("ns, slot", [
    (0, 0), (1, 0), (1024, 0), (1025, 1), (2048, 1), (2049, 2),
    (2**30, 20), (2**42, 32), (2**42 + 1, 33), (10**15, 33),
])
def test_slot_of_ns_is_the_smallest_bound_not_below(ns, slot):
    assert m.slot_of_ns(ns) == slot


def test_bucket_bounds_are_exact_powers_of_two_in_seconds():
    bounds = m.BUCKET_BOUNDS_SECONDS
    assert len(bounds) == m.NBUCKETS == 34
    assert bounds[0] == 1024e-9 and bounds[-1] == float("inf")
    assert bounds[-2] == 2**42 / 1e9 > 3600  # finite bounds reach past an hour
    for slot, bound in enumerate(bounds[:-1]):
        assert bound == 2 ** (m.BUCKET_MIN_LOG2 + slot) / 1e9
        ns = 2 ** (m.BUCKET_MIN_LOG2 + slot)
        assert m.slot_of_ns(ns) == slot and m.slot_of_ns(ns + 1) == slot + 1
    with pytest.raises(ValueError):
        m.slot_upper_bound_seconds(m.NBUCKETS)


def test_counter_names_match_the_c_enum():
    source = (bpf_dir() / "tcpstate.h").read_text()
    enum = re.search(r"enum counter \{(.*?)\};", source, re.S).group(1)
    names = re.findall(r"^\s*C_([A-Z_]+)", enum, re.M)
    assert [n.lower() for n in names] == list(COUNTERS)


def test_the_c_file_takes_its_geometry_from_cflags():
    """One home per fact: the C files must not define what Python passes."""
    sources = sorted(bpf_dir().glob("*.bpf.c")) + [bpf_dir() / "tcpstate.h"]
    assert [path.name for path in sources] == ["serve.bpf.c", "trace.bpf.c", "tcpstate.h"]
    for path in sources:
        source = path.read_text()
        for name in ("NSTATES", "NBUCKETS", "BUCKET_MIN_LOG2", "NPORT_SLOTS", "TABLE_BUCKETS",
                     "TABLE_WAYS", "NCPUS", *SOCKET_MEMBERS):
            assert not re.search(rf"#define\s+{name}\b", source), (path.name, name)
