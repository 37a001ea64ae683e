"""A dict-backed stand-in for tracer.probe.Probe: the collector's tests give
it the totals the kernel would hold, keyed by label names."""

from __future__ import annotations

import numpy as np

from tracer.metrics import NBUCKETS
from tracer.program import COUNTERS
from tracer.reasons import CODE as REASON_CODE, NREASONS
from tracer.serve_maps import Snapshot
from tracer.states import FAMILIES, NSTATES, SIDES, code_of


class FakeReader:
    def __init__(self, ports: tuple[int, ...] = (), time_wait: int = 0):
        self.port_labels = ("other", *map(str, ports)) if ports else ()
        slots = max(1, len(self.port_labels))
        f, s, b = len(FAMILIES), NSTATES, NBUCKETS
        self.snapshot = Snapshot(
            transitions=np.zeros((slots, f, s, s), np.uint64),
            duration_buckets=np.zeros((slots, f, s, s, b), np.uint64),
            duration_sum_ns=np.zeros((slots, f, s, s), np.uint64),
            connection_buckets=np.zeros((slots, f, len(SIDES), b), np.uint64),
            connection_sum_ns=np.zeros((slots, f, len(SIDES)), np.uint64),
            live=np.zeros((slots, f, s), np.int64),
            counters={name: 0 for name in COUNTERS},
            closes=np.zeros((slots, f, s, NREASONS), np.uint64),
            table_capacity=1024,
            age_buckets=np.zeros((slots, f, s, b), np.uint64),
            age_sum_ns=np.zeros((slots, f, s), np.float64),
            age_unknown=np.zeros((slots, f, s), np.int64),
        )
        self._time_wait = time_wait
        self.fail = set()  # parts that raise: "bpf", "time_wait"

    def _slot(self, port: str | None) -> int:
        return self.port_labels.index(port) if port else 0

    def transition(self, family: str, old: str, new: str, count: int, port: str | None = None):
        self.snapshot.transitions[self._slot(port), FAMILIES.index(family),
                                  code_of(old), code_of(new)] += count

    def duration(self, family: str, old: str, new: str, slot: int, count: int,
                 sum_ns: int, port: str | None = None):
        index = (self._slot(port), FAMILIES.index(family), code_of(old), code_of(new))
        self.snapshot.duration_buckets[index + (slot,)] += count
        self.snapshot.duration_sum_ns[index] += sum_ns

    def lifetime(self, family: str, side: str, slot: int, count: int, sum_ns: int,
                 port: str | None = None):
        index = (self._slot(port), FAMILIES.index(family), SIDES.index(side))
        self.snapshot.connection_buckets[index + (slot,)] += count
        self.snapshot.connection_sum_ns[index] += sum_ns

    def close(self, family: str, old: str, reason: str, count: int, port: str | None = None):
        self.snapshot.closes[self._slot(port), FAMILIES.index(family), code_of(old),
                             REASON_CODE[reason]] += count

    def live(self, family: str, state: str, count: int, port: str | None = None):
        self.snapshot.live[self._slot(port), FAMILIES.index(family), code_of(state)] = count

    def age(self, family: str, state: str, slot: int, count: int, sum_ns: float,
            port: str | None = None):
        index = (self._slot(port), FAMILIES.index(family), code_of(state))
        self.snapshot.age_buckets[index + (slot,)] += count
        self.snapshot.age_sum_ns[index] += sum_ns

    def age_unknown(self, family: str, state: str, count: int, port: str | None = None):
        self.snapshot.age_unknown[self._slot(port), FAMILIES.index(family), code_of(state)] = count

    def read(self) -> Snapshot:
        if "bpf" in self.fail:
            raise OSError("map read failed")
        return self.snapshot

    def time_wait(self) -> int:
        if "time_wait" in self.fail:
            raise OSError("namespace walk failed")
        return self._time_wait
