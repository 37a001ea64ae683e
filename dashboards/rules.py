"""Prometheus recording and alerting rules for tcpstate, as data.

Recording rules follow Prometheus' level:metric:operations naming. The
`instance_port:` level keeps the service port, so the fleet view can rank
nodes for one port; the `instance:` level sums it away for alerts and the
all-ports fleet view. generate.py writes them to rules/tcpstate.rules.yml;
rules/tcpstate.rules.test.yml is promtool's unit test of every alert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

from tracer import metrics as m

from .promql import selector, transition
from .yamlout import dump

# The scrape job the README's Prometheus configuration names.
JOB = "tcpstate"
WINDOW = "5m"

# Alert thresholds: what a demanding SRE pages on, documented in each runbook.
CONNECT_FAILURE_RATIO = 0.10
CONNECT_MIN_RATE = 0.2           # connects/s below which a ratio is noise
# Connects that time out or meet an ICMP error: the network or a firewall,
# not a peer that answers. Each timeout costs its caller seconds, so a
# smaller share than of all failures pages.
CONNECT_NETWORK_FAILURE_RATIO = 0.05
NETWORK_FAILURE_REASONS = ("timeout", "unreachable")
CLOSE_WAIT_MIN_SOCKETS = 20
# A bucket bound (2**29 ns): histogram_quantile interpolates inside a bucket,
# so a threshold inside one would fire on RTTs of 0.3 s. p99 above a bound
# means: more than 1 % of handshakes took longer. A lost SYN costs >= 1 s.
HANDSHAKE_P99_SECONDS = 2 ** 29 / 1e9

# CLOSE-WAIT longer than this is stuck: the bucket bound nearest 10 minutes.
STUCK_LE = floatToGoString(m.CLOSE_WAIT_STUCK_SECONDS)

_INSTANCE = "instance, job"
_INSTANCE_PORT = "instance, job, port"


@dataclass(frozen=True)
class Record:
    record: str
    expr: str


@dataclass(frozen=True)
class Alert:
    alert: str
    expr: str
    for_: str
    severity: str
    summary: str
    description: str
    runbook: str
    labels: dict = field(default_factory=dict)


def _rate(metric: str, by: str, **labels: str) -> str:
    return f"sum by ({by}) (rate({selector(metric, **labels)}[{WINDOW}]))"


# ---- recorded series (the names the fleet view and alerts read) ----------
PORT_CONNECT_ATTEMPTS = "instance_port:tcpstate_connect_attempts:rate5m"
PORT_CONNECT_FAILURES = "instance_port:tcpstate_connect_failures:rate5m"
PORT_CONNECT_FAILURES_BY_REASON = "instance_port_reason:tcpstate_connect_failures:rate5m"
CONNECT_FAILURES_BY_REASON = "instance_reason:tcpstate_connect_failures:rate5m"
CONNECT_NETWORK_FAILURE_RATIO_SERIES = "instance:tcpstate_connect_network_failure:ratio_rate5m"
PORT_RESETS = "instance_port:tcpstate_resets:rate5m"
PORT_CLOSE_WAIT = "instance_port:tcpstate_close_wait_sockets:sum"
PORT_CLOSE_WAIT_STUCK = "instance_port:tcpstate_close_wait_stuck_sockets:sum"
PORT_HANDSHAKE_BUCKETS = "instance_port_le:tcpstate_handshake_seconds_bucket:rate5m"
CONNECT_ATTEMPTS = "instance:tcpstate_connect_attempts:rate5m"
CONNECT_FAILURES = "instance:tcpstate_connect_failures:rate5m"
CONNECT_FAILURE_RATIO_SERIES = "instance:tcpstate_connect_failure:ratio_rate5m"
HANDSHAKE_P99 = "instance:tcpstate_handshake_seconds:p99_rate5m"
TABLE_EVICTIONS = "instance:tcpstate_socket_table_evictions:rate5m"
MISSED_EVENTS = "instance:tcpstate_bpf_missed_events:rate5m"


def handshake_quantile(q: float, buckets: str, by: str) -> str:
    """histogram_quantile over recorded handshake buckets. `>= 0` drops the
    NaN of a window without handshakes, so that it neither ranks nor alerts."""
    return f"histogram_quantile({q}, sum by ({by}, le) ({buckets})) >= 0"


_NETWORK_FAILURES = selector(CONNECT_FAILURES_BY_REASON,
                             reason="~" + "|".join(NETWORK_FAILURE_REASONS))

RECORDS: tuple[Record, ...] = (
    # Every exit from SYN-SENT is a connect's outcome: established, or
    # close (refused, timed out, reset), rarely syn_recv (simultaneous open).
    Record(PORT_CONNECT_ATTEMPTS, _rate(m.TRANSITIONS, _INSTANCE_PORT, **transition("syn_sent"))),
    Record(PORT_CONNECT_FAILURES,
           _rate(m.TRANSITIONS, _INSTANCE_PORT, **transition("syn_sent", "close"))),
    Record(PORT_RESETS, _rate(m.TRANSITIONS, _INSTANCE_PORT, **transition("established", "close"))),
    Record(PORT_CLOSE_WAIT,
           f"sum by ({_INSTANCE_PORT}) ({selector(m.SOCKETS, state='close_wait')})"),
    # CLOSE-WAIT sockets older than the bucket bound nearest 10 minutes: all
    # of known age (_gcount) less those at most that old (the bound's bucket).
    Record(PORT_CLOSE_WAIT_STUCK,
           f"sum by ({_INSTANCE_PORT}) "
           f"({selector(m.SOCKET_STATE_AGE + '_gcount', state='close_wait')}) - "
           f"sum by ({_INSTANCE_PORT}) "
           f"({selector(m.SOCKET_STATE_AGE + '_bucket', state='close_wait', le=STUCK_LE)})"),
    Record(PORT_HANDSHAKE_BUCKETS,
           _rate(f"{m.STATE_DURATION}_bucket", f"{_INSTANCE_PORT}, le",
                 **transition("syn_sent", "established"))),
    # Why connects failed (tcpstate_closes_total: raw tracepoint with BTF only).
    Record(PORT_CONNECT_FAILURES_BY_REASON,
           _rate(m.CLOSES, f"{_INSTANCE_PORT}, reason", old_state="syn_sent")),
    Record(CONNECT_FAILURES_BY_REASON,
           f"sum by ({_INSTANCE}, reason) ({PORT_CONNECT_FAILURES_BY_REASON})"),
    Record(CONNECT_ATTEMPTS, f"sum by ({_INSTANCE}) ({PORT_CONNECT_ATTEMPTS})"),
    Record(CONNECT_FAILURES, f"sum by ({_INSTANCE}) ({PORT_CONNECT_FAILURES})"),
    # No connects, no ratio (rather than NaN).
    Record(CONNECT_FAILURE_RATIO_SERIES, f"{CONNECT_FAILURES} / ({CONNECT_ATTEMPTS} > 0)"),
    Record(CONNECT_NETWORK_FAILURE_RATIO_SERIES,
           f"sum by ({_INSTANCE}) ({_NETWORK_FAILURES}) / ({CONNECT_ATTEMPTS} > 0)"),
    Record(HANDSHAKE_P99, handshake_quantile(0.99, PORT_HANDSHAKE_BUCKETS, _INSTANCE)),
    Record(TABLE_EVICTIONS, _rate(m.SOCKET_TABLE_EVICTIONS, _INSTANCE)),
    Record(MISSED_EVENTS, _rate(m.MISSED_EVENTS, _INSTANCE)),
)

ALERTS: tuple[Alert, ...] = (
    Alert(
        "TcpstateConnectFailureRatioHigh",
        f"{CONNECT_FAILURE_RATIO_SERIES} > {CONNECT_FAILURE_RATIO} "
        f"and on ({_INSTANCE}) {CONNECT_ATTEMPTS} > {CONNECT_MIN_RATE}",
        "10m", "warning",
        "{{ $labels.instance }}: {{ $value | humanizePercentage }} of outgoing connects fail",
        f"More than {CONNECT_FAILURE_RATIO:.0%} of connect() calls on {{{{ $labels.instance }}}} "
        "end SYN-SENT -> CLOSE (refused, timed out or reset) instead of ESTABLISHED.",
        "Open the node's 'TCP life-cycle' dashboard: 'Connect outcomes' and the per-port "
        "table show which service port fails. Refused (RST to the SYN) means nothing "
        "listens there or its backlog overflowed (check the server's "
        "`nstat TcpExtListenOverflows`); timed out means a firewall or an unreachable "
        "peer. Fix the peer or the client's target list; this alert clears 10 minutes "
        "after the ratio drops.",
    ),
    Alert(
        "TcpstateConnectTimeoutsOrUnreachable",
        f"{CONNECT_NETWORK_FAILURE_RATIO_SERIES} > {CONNECT_NETWORK_FAILURE_RATIO} "
        f"and on ({_INSTANCE}) {CONNECT_ATTEMPTS} > {CONNECT_MIN_RATE}",
        "10m", "warning",
        "{{ $labels.instance }}: {{ $value | humanizePercentage }} of outgoing connects "
        "time out or are unreachable",
        f"More than {CONNECT_NETWORK_FAILURE_RATIO:.0%} of connect() calls on "
        "{{ $labels.instance }} end without an answer from the peer: timed out (no "
        "SYN-ACK after the SYN retries) or an ICMP unreachable/prohibited error. Unlike "
        "refusals (a peer that answers with RST), these point at the network: a "
        "firewall that drops, a route, a dead host.",
        "Open the node's 'TCP life-cycle' dashboard: 'Connect failures by reason' splits "
        "timeout from unreachable, and the per-port variable names the service. Timeouts: "
        "a firewall or security group dropping SYNs, or a host that is down (try `nc -vz "
        "HOST PORT` from the node; `tcpstate trace --reason timeout` lists the remote "
        "addresses). Unreachable: a router's ICMP error (`ip route get HOST`, the peer's "
        "network ACLs; IPv6 'prohibited' shows as EACCES to the program). A timeout that "
        "met an ICMP error first counts as unreachable.",
    ),
    Alert(
        "TcpstateCloseWaitGrowing",
        f"{PORT_CLOSE_WAIT} > {CLOSE_WAIT_MIN_SOCKETS} and deriv({PORT_CLOSE_WAIT}[1h]) > 0",
        "1h", "warning",
        "{{ $labels.instance }} port {{ $labels.port }}: {{ $value }} sockets in CLOSE-WAIT and rising",
        "Sockets in CLOSE-WAIT (the peer closed, the local program has not) have grown "
        "for an hour. That is the classic descriptor leak: a program that never calls "
        "close() on connections its peers have finished.",
        "Find the owner: `ss -tanp state close-wait '( sport = :PORT or dport = :PORT )'` "
        "on the node lists the process. Its code misses a close() on an error or EOF "
        "path (or a pool never evicts dead connections). Restarting the process frees "
        "the sockets but the count will grow again until the code is fixed; watch its "
        "open file limit meanwhile (`ls /proc/PID/fd | wc -l`).",
    ),
    Alert(
        "TcpstateCloseWaitStuck",
        f"{PORT_CLOSE_WAIT_STUCK} > 0",
        "5m", "warning",
        "{{ $labels.instance }} port {{ $labels.port }}: {{ $value }} sockets stuck in "
        "CLOSE-WAIT for over " + f"{m.CLOSE_WAIT_STUCK_SECONDS:.0f} s",
        "Sockets have sat in CLOSE-WAIT (the peer closed, the local program has not) "
        f"for more than {m.CLOSE_WAIT_STUCK_SECONDS} s: the bucket bound of "
        f"{m.SOCKET_STATE_AGE} nearest 10 minutes (2^39 ns). A program that has not "
        "closed a finished connection in 9 minutes has almost surely lost track of it.",
        "On the node, as root: `tcpstate sockets --state close_wait --older-than 9m` "
        "lists them oldest first with the owning PID and command, addresses and "
        "namespace. The owner misses a close() on an error or EOF path (or a pool "
        "never evicts dead connections). The threshold is 549.755813888 s, not 600 s: "
        "ages are counted in power-of-two buckets. Sockets of unknown age (older than "
        "tcpstate, see tcpstate_socket_state_age_unknown) cannot fire this alert.",
    ),
    Alert(
        "TcpstateHandshakeSlow",
        f"{HANDSHAKE_P99} > {HANDSHAKE_P99_SECONDS}",
        "15m", "warning",
        "{{ $labels.instance }}: handshake p99 is {{ $value | humanizeDuration }}",
        f"For 15 minutes, more than 1% of the connects on {{{{ $labels.instance }}}} spent "
        f"over {HANDSHAKE_P99_SECONDS:.2f} s in SYN-SENT. A lost SYN or SYN-ACK costs at "
        "least the 1 s initial retransmission timeout, so this usually means packet loss "
        "or a peer whose accept queue is full (it drops SYNs).",
        "In the 'Handshake duration' heatmap, a band near 1 s, 3 s, 7 s is SYN "
        "retransmission. Check the peers' `nstat TcpExtListenDrops TcpExtListenOverflows`, "
        "the path's packet loss, and conntrack table drops (`conntrack -S`). The "
        "per-port table names the service.",
    ),
    Alert(
        "TcpstateSocketTableEvicting",
        f"{TABLE_EVICTIONS} > 0",
        "15m", "warning",
        "{{ $labels.instance }}: tcpstate's socket table evicts {{ $value | humanize }} sockets/s",
        "The per-socket table that tcpstate uses to time states is full in some rows, so "
        "it evicts the oldest entry. Transitions are still counted exactly; the durations "
        "of evicted sockets are lost (tcpstate_duration_unknown_total grows), so duration "
        "histograms under-represent long-lived connections.",
        "Compare 'Socket table fill' on the 'tcpstate exporter health' dashboard with "
        "the node's open TCP sockets (`ss -s`). Restart tcpstate with a larger "
        "--socket-table-size (above the peak socket count, rounded up to rows of 8; each socket "
        "costs about 32 bytes of kernel memory).",
    ),
    Alert(
        "TcpstateMissingEvents",
        f"{MISSED_EVENTS} > 0",
        "10m", "warning",
        "{{ $labels.instance }}: the kernel skips tcpstate's program for {{ $value | humanize }} events/s",
        "The kernel did not run tcpstate's BPF program for some TCP state changes and "
        "said so (recursion_misses): those transitions are missing from every count, so "
        "counts are near, not exact, while this fires.",
        "Look at `attach` in the 'Build info' table of the 'tcpstate exporter health' "
        "dashboard. `tracepoint` (the fallback without BTF) is skipped whenever another "
        "BPF program or a BPF map read runs on the same CPU: list them with `bpftool prog "
        "show` and `bpftool perf show`; a kernel with BTF (/sys/kernel/btf/vmlinux) lets "
        "tcpstate attach as a raw tracepoint, which they cannot make skip. "
        "`raw_tracepoint` is skipped only when its own run is interrupted on a CPU by a "
        "softirq that changes another socket's state: rare; sustained, it means a very "
        "high rate of state changes on few CPUs (check the NIC's interrupt spread).",
    ),
    Alert(
        "TcpstateExporterDown",
        f'up{{job="{JOB}"}} == 0',
        "5m", "critical",
        "{{ $labels.instance }}: tcpstate is not being scraped",
        "Prometheus cannot scrape tcpstate on {{ $labels.instance }}: the TCP "
        "life-cycle of this node is invisible and its other alerts cannot fire.",
        "On the node: `systemctl status tcpstate` or `kubectl -n NAMESPACE get pods -o "
        "wide` for the pod on this node, then `journalctl -u tcpstate` / `kubectl logs`. "
        "`tcpstate serve --dry-run` says which prerequisite (privileges, tracefs, kernel version, "
        "kernel headers) is missing. Also check that the port (default 9814) is "
        "reachable from Prometheus.",
    ),
    Alert(
        "TcpstateCollectorFailing",
        f"{m.SCRAPE_SUCCESS} == 0",
        "10m", "warning",
        "{{ $labels.instance }}: tcpstate collector {{ $labels.collector }} fails",
        "Part of tcpstate's collector fails on every scrape, so its metric families are "
        "missing from the scrape (never partial: the rest is served).",
        "`journalctl -u tcpstate` (or the pod's logs) has an error line `collector NAME "
        "failed: CAUSE` (a repeated one is logged once). `bpf` failing means the BPF maps "
        "cannot be read; `time_wait` means a network namespace could not be entered "
        "though it could at start.",
    ),
)


def rule_groups() -> dict:
    """The rule file as Prometheus reads it."""
    return {"groups": [
        {"name": "tcpstate.rules",
         "rules": [{"record": r.record, "expr": r.expr} for r in RECORDS]},
        {"name": "tcpstate.alerts",
         "rules": [{
             "alert": a.alert, "expr": a.expr, "for": a.for_,
             "labels": {"severity": a.severity, **a.labels},
             "annotations": {"summary": a.summary, "description": a.description,
                             "runbook": a.runbook},
         } for a in ALERTS]},
    ]}


def rules_file() -> str:
    return dump(rule_groups(), "Generated by dashboards/generate.py from dashboards/rules.py: do not edit.")
