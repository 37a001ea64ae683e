"""The Prometheus side of a tcpstate deployment, as data: the scrape job
the rules and dashboards expect, and the relabelling that keeps the series
budget (README, "Series budget"). generate.py writes the example
configuration dashboards/prometheus.yml; the fleet kernel test scrapes
with the same relabelling.
"""

from __future__ import annotations

import re

from tracer import metrics as m
from tracer.http_server import DEFAULT_PORT

from .rules import JOB, STUCK_LE

# The dashboards read state-duration buckets of SYN-SENT -> ESTABLISHED
# only (handshake percentiles and heatmap). Dropping the buckets of the other
# transitions at ingestion keeps their _sum and _count (mean durations) and
# cuts a node's series by about two thirds. Relabelling has no negative
# match: mark the bucket series to keep, then drop the unmarked ones
# (labels starting with __ vanish after relabelling).
BUDGET_RELABEL = [
    {"source_labels": ["__name__", "old_state", "new_state"],
     "regex": f"{m.STATE_DURATION}_bucket;syn_sent;established",
     "target_label": "__tmp_tcpstate_keep", "replacement": "1"},
    {"source_labels": ["__name__", "__tmp_tcpstate_keep"],
     "regex": f"{m.STATE_DURATION}_bucket;",
     "action": "drop"},
    # Of the ages in state, the rules read the bucket at the stuck bound only.
    {"source_labels": ["__name__", "le"],
     "regex": f"{m.SOCKET_STATE_AGE}_bucket;{re.escape(STUCK_LE)}",
     "target_label": "__tmp_tcpstate_keep", "replacement": "1"},
    {"source_labels": ["__name__", "__tmp_tcpstate_keep"],
     "regex": f"{m.SOCKET_STATE_AGE}_bucket;",
     "action": "drop"},
]


def scrape_job(targets: dict[str, str] | list[str], interval: str | None = None) -> dict:
    """The tcpstate job. targets: addresses, or {instance label: address}."""
    if isinstance(targets, dict):
        static = [{"targets": [address], "labels": {"instance": instance}}
                  for instance, address in targets.items()]
    else:
        static = [{"targets": list(targets)}]
    job = {"job_name": JOB}
    if interval:
        job["scrape_interval"] = interval
    return {**job, "static_configs": static, "metric_relabel_configs": BUDGET_RELABEL}


def example_config() -> dict:
    return {
        "global": {"scrape_interval": "15s", "evaluation_interval": "15s"},
        "rule_files": ["rules/tcpstate.rules.yml"],
        "scrape_configs": [scrape_job([f"node-1.example:{DEFAULT_PORT}",
                                       f"node-2.example:{DEFAULT_PORT}"])],
    }
