"""The number of series one exporter can ever expose is bounded, and the
bound is computed from the state table and MAX_SERVICE_PORTS: checked by
filling every cell the kernel could fill and counting the exposition."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tracer.collector import TcpstateCollector
from tracer.metrics import MAX_SERVICE_PORTS, NBUCKETS
from tracer.reasons import NREASONS, possible_reasons
from tracer.states import (FAMILIES, GAUGE_STATES, KNOWN_TRANSITIONS, NSTATES, SIDES, STATES,
                           TABLE_STATES, name_of)

from .fake_reader import FakeReader

HISTOGRAM_SAMPLES = NBUCKETS + 2  # a bucket per slot (the last is +Inf), _sum, _count
# ages in state: a gauge histogram (_gsum, _gcount) and the unknown count,
# per state a table socket can hold
AGE_SAMPLES = HISTOGRAM_SAMPLES + 1
# state_info per state, build_info, table entries and capacity, evictions,
# duration_unknown, other_protocol, stale entries, unseen sockets, contended
# updates, missed events, success and duration of 2 parts
FIXED = len(STATES) + 1 + 9 + 2 * 2
BIRTHS = {("close", "listen"), ("close", "syn_sent"), ("listen", "syn_recv")}


def port_slots(ports: int) -> int:
    return ports + 1 if ports else 1


def hard_cap(ports: int) -> int:
    """Whatever the kernel reports: every (old, new) pair of the 13 codes
    (unknown ones as unknown_N), every side."""
    p, f = port_slots(ports), len(FAMILIES)
    pairs = NSTATES * NSTATES
    return (p * f * pairs                                      # transitions
            + p * f * NSTATES * NREASONS                       # closes by reason
            + p * f * pairs * HISTOGRAM_SAMPLES                # state durations
            + p * f * len(SIDES) * HISTOGRAM_SAMPLES           # connection durations
            + p * f * (len(GAUGE_STATES) - 1) + 1              # sockets (+ TIME-WAIT)
            + p * f * len(TABLE_STATES) * AGE_SAMPLES          # ages in state
            + FIXED)


def real_bound(ports: int) -> int:
    """What the kernel's transitions (KNOWN_TRANSITIONS) can produce: a
    duration for each but the births, connection lives by client/server,
    the closes of each state by the reasons the table gives for it."""
    p, f = port_slots(ports), len(FAMILIES)
    timed = len(set(KNOWN_TRANSITIONS) - BIRTHS)
    return (p * f * len(KNOWN_TRANSITIONS)
            + p * f * len(possible_reasons())                  # closes by reason
            + p * f * timed * HISTOGRAM_SAMPLES
            + p * f * 2 * HISTOGRAM_SAMPLES
            + p * f * (len(GAUGE_STATES) - 1) + 1
            + p * f * len(TABLE_STATES) * AGE_SAMPLES
            + FIXED)


def series_of(reader: FakeReader) -> int:
    registry = CollectorRegistry()
    registry.register(TcpstateCollector(reader, bcc_version="0.26.0", kernel="6.18.0"))
    return sum(1 for line in generate_latest(registry).decode().splitlines()
               if line and not line.startswith("#"))


@pytest.mark.parametrize("ports", [0, MAX_SERVICE_PORTS])
def test_every_cell_filled_gives_exactly_the_hard_cap(ports):
    reader = FakeReader(ports=tuple(range(1000, 1000 + ports)), time_wait=3)
    snap = reader.snapshot
    for array in (snap.transitions, snap.duration_buckets, snap.duration_sum_ns,
                  snap.connection_buckets, snap.connection_sum_ns, snap.live,
                  snap.age_buckets, snap.age_sum_ns, snap.age_unknown, snap.closes):
        array[...] = 1
    assert series_of(reader) == hard_cap(ports)


@pytest.mark.parametrize("ports", [0, MAX_SERVICE_PORTS])
def test_every_real_transition_gives_exactly_the_real_bound(ports):
    reader = FakeReader(ports=tuple(range(1000, 1000 + ports)), time_wait=3)
    labels = reader.port_labels or (None,)
    for port in labels:
        for family in FAMILIES:
            for old, new in KNOWN_TRANSITIONS:
                reader.transition(family, old, new, 1, port=port)
                if (old, new) not in BIRTHS:
                    reader.duration(family, old, new, slot=3, count=1, sum_ns=5, port=port)
            for old, reason in possible_reasons():
                reader.close(family, name_of(old), reason, 1, port=port)
            for side in ("client", "server"):
                reader.lifetime(family, side, slot=3, count=1, sum_ns=5, port=port)
            for state in GAUGE_STATES:
                reader.live(family, state, 1, port=port)
            for state in TABLE_STATES:
                reader.age(family, state, slot=3, count=1, sum_ns=5, port=port)
    assert series_of(reader) == real_bound(ports)


def test_the_stated_numbers():
    """The figures in the README's "Limits and guarantees"."""
    assert (real_bound(0), real_bound(MAX_SERVICE_PORTS)) == (2_301, 75_069)
    assert (hard_cap(0), hard_cap(MAX_SERVICE_PORTS)) == (13_667, 450_147)
