"""The Prometheus collector: turns the kernel's totals into metric families
at scrape time. It is handed a reader (tracer.probe.Probe, or a fake in the
unit tests) and never touches bcc itself.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Callable, Iterable, Iterator, Protocol

import numpy as np
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from . import __version__, metrics as m
from .reasons import CODE as REASON_CODE, REASONS, possible_reasons
from .serve_maps import Snapshot
from .states import (FAMILIES, GAUGE_STATES, KNOWN_TRANSITIONS, SIDES, STATES, TABLE_STATES,
                     code_of, name_of)

log = logging.getLogger(__name__)

BUCKET_LABELS = tuple(floatToGoString(bound) for bound in m.BUCKET_BOUNDS_SECONDS)
NS_PER_SECOND = 1e9


class Reader(Protocol):
    port_labels: tuple[str, ...]  # by port slot; () when ports are not labelled

    # None when the TIME-WAIT count is off (--run-as): then it is neither
    # exported nor reported as a failing part, which would alert forever.
    time_wait: Callable[[], int] | None

    def read(self) -> Snapshot: ...


class TcpstateCollector(Collector):
    """Reads the maps once per scrape. A part that fails drops its own
    families and reports tcpstate_scrape_collector_success{collector} 0."""

    def __init__(self, reader: Reader, bcc_version: str = "", kernel: str = "",
                 attach: str = ""):
        self.reader = reader
        self.bcc_version = bcc_version
        self.attach = attach
        self.kernel = kernel or os.uname().release

    def describe(self) -> Iterable[Metric]:
        # Registering must not read the maps: describe from empty families.
        return list(self._families(None, None))

    def collect(self) -> Iterator[Metric]:
        success = GaugeMetricFamily(
            m.SCRAPE_SUCCESS, "Whether a part of the collector succeeded (1) or failed (0).",
            labels=["collector"],
        )
        duration = GaugeMetricFamily(
            m.SCRAPE_DURATION, "How long a part of the collector took.", labels=["collector"]
        )
        snapshot = self._timed("bpf", self.reader.read, success, duration)
        time_wait = (None if self.reader.time_wait is None
                     else self._timed("time_wait", self.reader.time_wait, success, duration))
        yield from self._families(snapshot, time_wait)
        yield success
        yield duration

    @staticmethod
    def _timed(name: str, read: Callable, success: GaugeMetricFamily,
               duration: GaugeMetricFamily):
        started = time.perf_counter()
        try:
            value = read()
            success.add_metric([name], 1)
        except Exception as exc:  # one failed part must not fail the scrape
            log.error("collector %s failed: %s", name, exc)
            value = None
            success.add_metric([name], 0)
        duration.add_metric([name], time.perf_counter() - started)
        return value

    # ---- families ------------------------------------------------------
    def _families(self, snap: Snapshot | None, time_wait: int | None) -> Iterator[Metric]:
        ports = self.reader.port_labels
        port_label = [m.PORT_LABEL] if ports else []

        def slots() -> Iterator[tuple[int, list[str]]]:
            if ports:
                for slot, label in enumerate(ports):
                    yield slot, [label]
            else:
                yield 0, []

        transitions = CounterMetricFamily(
            m.family_name(m.TRANSITIONS),
            "TCP state transitions, by the state left and the state entered.",
            labels=[*m.TRANSITION_LABELS, *port_label],
        )
        durations = HistogramMetricFamily(
            m.STATE_DURATION,
            "Time a socket spent in old_state before it moved to new_state.",
            labels=[*m.TRANSITION_LABELS, *port_label],
        )
        connections = HistogramMetricFamily(
            m.CONNECTION_DURATION,
            "Whole life of a connection, from its first state after CLOSE or LISTEN to CLOSE.",
            labels=[*m.CONNECTION_LABELS, *port_label],
        )
        sockets = GaugeMetricFamily(
            m.SOCKETS,
            "TCP sockets in each state now, in every network namespace. TIME-WAIT "
            "(with orphaned FIN-WAIT-2 mini-sockets) is the kernel's own count, "
            "which knows no family or port.",
            labels=[*m.SOCKETS_LABELS, *port_label],
        )
        if snap is not None:
            known = {(code_of(a), code_of(b)) for a, b in KNOWN_TRANSITIONS}
            counts = snap.transitions
            for slot, port in slots():
                for fam, family in enumerate(FAMILIES):
                    seen = {tuple(ix) for ix in np.argwhere(counts[slot, fam])}
                    for old, new in sorted(known | seen):
                        transitions.add_metric(
                            [family, name_of(old), name_of(new), *port],
                            int(counts[slot, fam, old, new]),
                        )
                    self._add_histograms(
                        durations, snap.duration_buckets[slot, fam],
                        snap.duration_sum_ns[slot, fam],
                        lambda ix: [family, name_of(ix[0]), name_of(ix[1]), *port],
                    )
                    self._add_histograms(
                        connections, snap.connection_buckets[slot, fam],
                        snap.connection_sum_ns[slot, fam],
                        lambda ix: [family, SIDES[ix[0]], *port],
                    )
                    for state in GAUGE_STATES:
                        if state != "time_wait":
                            sockets.add_metric(
                                [family, state, *port],
                                int(snap.live[slot, fam, code_of(state)]),
                            )
        if time_wait is not None:
            sockets.add_metric(["", "time_wait", *([""] if ports else [])], time_wait)
        yield transitions
        if snap is None or snap.closes is not None:
            yield self._closes(snap, slots, port_label)
        yield durations
        yield connections
        yield sockets
        yield from self._age_families(snap, port_label, slots)
        yield from self._self_families(snap)

    @staticmethod
    def _age_families(snap: Snapshot | None, port_label: list[str],
                      slots: Callable) -> Iterator[Metric]:
        ages = GaugeHistogramMetricFamily(
            m.SOCKET_STATE_AGE,
            "How long the sockets now in each state have been in it (those whose "
            "entry into it was seen; the others are in " + m.SOCKET_STATE_AGE_UNKNOWN + ").",
            labels=[*m.SOCKET_STATE_AGE_LABELS, *port_label],
        )
        unknown = GaugeMetricFamily(
            m.SOCKET_STATE_AGE_UNKNOWN,
            "Sockets now in each state whose entry into it was not seen (they predate "
            "the exporter, or their table entry was evicted): no age, never 0 seconds.",
            labels=[*m.SOCKET_STATE_AGE_LABELS, *port_label],
        )
        if snap is not None and snap.age_buckets is not None:
            for slot, port in slots():
                for fam, family in enumerate(FAMILIES):
                    for state in TABLE_STATES:
                        code = code_of(state)
                        counts = snap.age_buckets[slot, fam, code]
                        if counts.any():
                            ages.add_metric(
                                [family, state, *port],
                                buckets=list(zip(BUCKET_LABELS,
                                                 (int(c) for c in np.cumsum(counts)))),
                                gsum_value=float(snap.age_sum_ns[slot, fam, code]) / NS_PER_SECOND,
                            )
                        unknown.add_metric([family, state, *port],
                                           int(snap.age_unknown[slot, fam, code]))
        yield ages
        yield unknown

    @staticmethod
    def _closes(snap: Snapshot | None, slots: Callable, port_label: list[str]) -> Metric:
        """Transitions into CLOSE by reason (tracer/reasons.py): the pairs the
        table can give from start at 0, any other cell once it counts."""
        closes = CounterMetricFamily(
            m.family_name(m.CLOSES),
            "Transitions into CLOSE, by the state left and why (tracer/reasons.py; "
            "the README's close reasons table). Needs the raw tracepoint and BTF.",
            labels=[*m.CLOSE_LABELS, *port_label],
        )
        if snap is None:
            return closes
        possible = {(old, REASON_CODE[reason]) for old, reason in possible_reasons()}
        for slot, port in slots():
            for fam, family in enumerate(FAMILIES):
                counts = snap.closes[slot, fam]
                seen = {tuple(int(i) for i in ix) for ix in np.argwhere(counts)}
                for old, reason in sorted(possible | seen):
                    closes.add_metric([family, name_of(old), REASONS[reason], *port],
                                      int(counts[old, reason]))
        return closes

    @staticmethod
    def _add_histograms(family: HistogramMetricFamily, buckets: np.ndarray,
                        sums_ns: np.ndarray, labels: Callable) -> None:
        """One histogram per index with observations: the kernel's slots
        are per bucket, Prometheus' are cumulative."""
        totals = buckets.sum(axis=-1)
        for ix in np.argwhere(totals):
            cumulative = np.cumsum(buckets[tuple(ix)])
            family.add_metric(
                labels(tuple(int(i) for i in ix)),
                buckets=list(zip(BUCKET_LABELS, (int(c) for c in cumulative))),
                sum_value=float(sums_ns[tuple(ix)]) / NS_PER_SECOND,
            )

    def _self_families(self, snap: Snapshot | None) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            m.STATE_INFO, "The TCP state table: kernel and TCP-MIB codes, RFC 793 names.",
            labels=list(m.STATE_INFO_LABELS),
        )
        for state in STATES:
            info.add_metric(
                [state.name, str(state.kernel_code),
                 "" if state.mib_code is None else str(state.mib_code), state.rfc793_name],
                1,
            )
        yield info
        build = GaugeMetricFamily(
            m.BUILD_INFO, "tcpstate's version, the bcc it runs on, the kernel, and how the "
            "program attaches (raw_tracepoint, or the classic tracepoint without BTF).",
            labels=list(m.BUILD_INFO_LABELS),
        )
        build.add_metric([__version__, self.bcc_version, self.kernel, self.attach], 1)
        yield build
        if snap is None:
            return
        counters = snap.counters
        yield GaugeMetricFamily(
            m.SOCKET_TABLE_ENTRIES, "Sockets in the per-socket table now.",
            value=snap.table_entries,
        )
        yield GaugeMetricFamily(
            m.SOCKET_TABLE_CAPACITY, "Sockets the per-socket table can hold (--socket-table-size).",
            value=snap.table_capacity,
        )
        for name, key, text in (
            (m.SOCKET_TABLE_EVICTIONS, "evictions",
             "Sockets whose entry time was lost because their table row was full."),
            (m.DURATION_UNKNOWN, "duration_unknown",
             "Transitions of sockets with no recorded entry time (older than the "
             "exporter, or evicted): counted, never observed as a duration."),
            (m.OTHER_PROTOCOL, "other_protocol",
             "State changes of non-TCP sockets (SCTP, MPTCP) seen and skipped."),
            (m.STALE_ENTRIES, "stale_entries",
             "Transitions of a socket whose table entry held another state than the "
             "one it left: a transition of it was not seen. The entry's count left "
             "its state; the transition's duration is unknown."),
            (m.UNSEEN_SOCKETS, "unseen_sockets",
             "Sockets first seen mid-life that were counted nowhere (not seeded at start, "
             "not evicted): no program ran for their birth. Not in "
             "tcpstate_bpf_missed_events_total: the kernel did not report it."),
            (m.CONTENDED, "contended",
             "Decrements of a shared count (untracked sockets, listeners per port) that "
             "gave up after 64 compare-and-swaps lost to other CPUs: each may leave that "
             "count one too high."),
        ):
            yield CounterMetricFamily(m.family_name(name), text, value=counters[key])
        yield CounterMetricFamily(
            m.family_name(m.MISSED_EVENTS),
            "Events the kernel did not run the program for (recursion_misses): on the "
            "raw tracepoint, its own nested runs; on the classic tracepoint, also "
            "those skipped while another BPF program or a map read ran on that CPU "
            "(counted since Linux 6.7).",
            value=snap.missed_events,
        )

