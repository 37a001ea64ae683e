"""Metric names, label sets and histogram buckets: the one home of each.

The collector, the dashboards generator, the rules' checks and the tests all
import from here, so a name is spelled once.
"""

from __future__ import annotations

PREFIX = "tcpstate"

TRANSITIONS = f"{PREFIX}_transitions_total"
CLOSES = f"{PREFIX}_closes_total"
STATE_DURATION = f"{PREFIX}_state_duration_seconds"
CONNECTION_DURATION = f"{PREFIX}_connection_duration_seconds"
SOCKETS = f"{PREFIX}_sockets"
SOCKET_STATE_AGE = f"{PREFIX}_socket_state_age_seconds"
SOCKET_STATE_AGE_UNKNOWN = f"{PREFIX}_socket_state_age_unknown"
STATE_INFO = f"{PREFIX}_state_info"
SOCKET_TABLE_ENTRIES = f"{PREFIX}_socket_table_entries"
SOCKET_TABLE_CAPACITY = f"{PREFIX}_socket_table_capacity"
SOCKET_TABLE_EVICTIONS = f"{PREFIX}_socket_table_evictions_total"
DURATION_UNKNOWN = f"{PREFIX}_duration_unknown_total"
MISSED_EVENTS = f"{PREFIX}_bpf_missed_events_total"
OTHER_PROTOCOL = f"{PREFIX}_other_protocol_events_total"
STALE_ENTRIES = f"{PREFIX}_socket_table_stale_entries_total"
UNSEEN_SOCKETS = f"{PREFIX}_unseen_sockets_total"
CONTENDED = f"{PREFIX}_contended_updates_total"
BUILD_INFO = f"{PREFIX}_build_info"
HTTP_CONNECTIONS_REFUSED = f"{PREFIX}_http_connections_refused_total"
HTTP_CONNECTIONS_SHED = f"{PREFIX}_http_connections_shed_total"
HTTP_SCRAPES_REFUSED = f"{PREFIX}_http_scrapes_refused_total"
HTTP_ACCEPT_FAILURES = f"{PREFIX}_http_accept_failures_total"
SCRAPE_SUCCESS = f"{PREFIX}_scrape_collector_success"
SCRAPE_DURATION = f"{PREFIX}_scrape_collector_duration_seconds"

# The names without the suffixes prometheus_client adds or strips.
def family_name(metric: str) -> str:
    """The name prometheus_client wants for a family (no `_total`/`_info`)."""
    return metric[: -len("_total")] if metric.endswith("_total") else metric


# ---- histogram buckets -------------------------------------------------
# The kernel files a duration of `ns` nanoseconds in log2 slot b, the
# smallest b with ns <= 2**b (bpf/tcpstate.h, duration_slot). Slot 0
# holds everything up to 2**BUCKET_MIN_LOG2 ns (~1 us); the last slot is
# +Inf. 2**42 ns is 73 minutes, so the finite bounds reach past 1 h.
BUCKET_MIN_LOG2 = 10
BUCKET_MAX_LOG2 = 42
NBUCKETS = BUCKET_MAX_LOG2 - BUCKET_MIN_LOG2 + 2  # finite slots + the +Inf slot


def slot_upper_bound_seconds(slot: int) -> float:
    """Upper bound (`le`) of a kernel slot in seconds; +Inf for the top slot.

    Exact: a slot's bound is 2**(BUCKET_MIN_LOG2 + slot) nanoseconds, and a
    duration equal to the bound is filed in that slot, as `le` means.
    """
    if not 0 <= slot < NBUCKETS:
        raise ValueError(f"slot {slot} outside 0..{NBUCKETS - 1}")
    if slot == NBUCKETS - 1:
        return float("inf")
    return 2 ** (BUCKET_MIN_LOG2 + slot) / 1e9


BUCKET_BOUNDS_SECONDS: tuple[float, ...] = tuple(
    slot_upper_bound_seconds(slot) for slot in range(NBUCKETS)
)


def slot_of_ns(ns: int) -> int:
    """The slot the kernel files `ns` in (a mirror of duration_slot, for tests)."""
    bits = (ns - 1).bit_length() if ns > 1 else 0
    if bits <= BUCKET_MIN_LOG2:
        return 0
    return min(bits - BUCKET_MIN_LOG2, NBUCKETS - 1)


def slots_of_ns(ns):
    """slot_of_ns over a numpy array of nanoseconds. (ns - 1).bit_length()
    is frexp's exponent, exact for every value up to 2**53 ns (104 days),
    and past the last finite bound (2**BUCKET_MAX_LOG2) all land in the
    top slot anyway."""
    import numpy as np

    _, bits = np.frexp(np.maximum(np.asarray(ns, dtype=np.int64) - 1, 0).astype(np.float64))
    return np.clip(bits.astype(np.int64) - BUCKET_MIN_LOG2, 0, NBUCKETS - 1)


# CLOSE-WAIT sockets older than this are stuck (TcpstateCloseWaitStuck): the
# bucket bound nearest 10 minutes (2**39 ns = 549.755813888 s).
CLOSE_WAIT_STUCK_SECONDS = min(BUCKET_BOUNDS_SECONDS[:-1], key=lambda bound: abs(bound - 600))

# ---- label sets --------------------------------------------------------
TRANSITION_LABELS = ("family", "old_state", "new_state")
CLOSE_LABELS = ("family", "old_state", "reason")
CONNECTION_LABELS = ("family", "side")
SOCKETS_LABELS = ("family", "state")
SOCKET_STATE_AGE_LABELS = ("family", "state")
STATE_INFO_LABELS = ("state", "kernel_code", "mib_code", "rfc793_name")
BUILD_INFO_LABELS = ("version", "bcc_version", "kernel", "attach")
PORT_LABEL = "port"
OTHER_PORT = "other"

# The most service ports one exporter labels: bounds the series count.
MAX_SERVICE_PORTS = 32
