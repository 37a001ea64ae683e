"""The fleet view against a real fleet in miniature: three `tcpstate serve`
(standing in for three nodes, each labelling its own service port), one real
Prometheus scraping all three with the instance labels node-a/b/c and
evaluating the recording rules. Every fleet query must return one series
per node with the values that node's workload implies.

All three exporters trace the same kernel, so their whole-node totals are
alike; selecting the three service ports (as the fleet view's port picker
does) gives each node only its own port, because every other port is
labelled `other` by that node.
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from dashboards import generate, rules
from dashboards.promql import panel_queries, substitute
from tracer import metrics as m

from .exporter import Exporter
from .lifecycle_workload import hold_close_wait, slow_handshake
from .netlab import Lab
from .prometheus_server import PrometheusServer
from .workload import client_closes_first, refused, reset


@dataclass(frozen=True)
class Node:
    instance: str
    port: int
    succeeded: int
    refused: int
    resets: int
    close_wait: int
    slow: bool  # one connect waits for a SYN retransmission (~1 s)

    @property
    def connects(self) -> int:
        # every exit from SYN-SENT; a slow handshake adds the connect that filled the queue
        return self.succeeded + self.refused + self.resets + self.close_wait + 2 * self.slow


NODES = (
    Node("node-a", 47210, succeeded=6, refused=2, resets=0, close_wait=1, slow=False),
    Node("node-b", 47220, succeeded=3, refused=5, resets=2, close_wait=4, slow=False),
    Node("node-c", 47230, succeeded=4, refused=0, resets=1, close_wait=2, slow=True),
)
FLEET = json.loads((generate.HERE / f"{generate.FLEET_UID}.json").read_text())
VARIABLES = {"port": "(" + "|".join(str(n.port) for n in NODES) + ")", "limit": "10"}


def run_workload(lab: Lab, node: Node) -> list[socket.socket]:
    """All but the first successful connect, which warm_up made."""
    family, port = socket.AF_INET, node.port
    client_closes_first(lab, family, port, node.succeeded - 1)
    refused(lab, family, port, node.refused)
    if node.resets:
        reset(lab, family, port, node.resets)
    held = slow_handshake(lab, family, port) if node.slow else []
    with lab.listener(family, port) as listener:
        held += hold_close_wait(lab, listener, family, port, node.close_wait)
    return held


@pytest.fixture(scope="module")
def fleet():
    exporters = {node.instance: Exporter(service_ports=(node.port,)) for node in NODES}
    prometheus = PrometheusServer({name: f"127.0.0.1:{e.port}" for name, e in exporters.items()},
                                  rule_files=[generate.RULES_FILE])
    held: list[socket.socket] = []
    try:
        prometheus.start()
        with ThreadPoolExecutor(len(exporters)) as pool:  # three BPF compiles at once
            list(pool.map(Exporter.start, exporters.values()))
        prometheus.ready()
        # each node's counters must be in the TSDB at 0 before its workload
        for node in NODES:
            prometheus.wait_for(f'{m.TRANSITIONS}{{instance="{node.instance}", port="{node.port}"}}')
        with Lab() as lab:
            # A histogram series appears with its first observation, and rate()
            # cannot see the rise to a series' first sample: let Prometheus
            # scrape each node's handshake histogram once before the rest.
            for node in NODES:
                client_closes_first(lab, socket.AF_INET, node.port, 1)
            for node in NODES:
                prometheus.wait_for(f'{m.STATE_DURATION}_count{{instance="{node.instance}", '
                                    f'port="{node.port}", old_state="syn_sent"}}')
            for node in NODES:
                held += run_workload(lab, node)
            close_wait = f"sum by (instance) ({rules.PORT_CLOSE_WAIT}{{port=~\"{VARIABLES['port']}\"}})"
            expected = {n.instance: n.close_wait for n in NODES}
            prometheus.wait_for(close_wait, lambda r: {s["metric"]["instance"]: float(s["value"][1])
                                                       for s in r} == expected)
            time.sleep(2)  # the rules evaluate again at the final values
            yield prometheus
    finally:
        for sock in held:
            sock.close()
        for exporter in exporters.values():
            exporter.stop()
        prometheus.stop()


def by_instance(prometheus: PrometheusServer, title: str) -> dict[str, float]:
    (target,) = [t for p, t in panel_queries(FLEET) if p["title"] == title]
    result = prometheus.api.query(substitute(target["expr"], VARIABLES))
    instances = [s["metric"]["instance"] for s in result]
    assert sorted(instances) == sorted(n.instance for n in NODES), f"{title}: {result}"
    return {s["metric"]["instance"]: float(s["value"][1]) for s in result}


def test_every_fleet_query_evaluates_with_data(fleet):
    for panel, target in panel_queries(FLEET):
        assert fleet.api.query(substitute(target["expr"], VARIABLES)), panel["title"]


def test_top_nodes_by_connect_failure_ratio(fleet):
    ratios = by_instance(fleet, "Top nodes by connect failure ratio")
    # one exporter's series share scrape timestamps, so rate() extrapolates
    # its numerator and denominator alike: the ratio is exact
    assert ratios == {n.instance: pytest.approx(n.refused / n.connects, rel=1e-9) for n in NODES}


def test_top_nodes_by_close_wait(fleet):
    assert by_instance(fleet, "Top nodes by CLOSE-WAIT sockets") == {
        n.instance: n.close_wait for n in NODES}


def test_top_nodes_by_handshake_p99(fleet):
    p99 = by_instance(fleet, "Top nodes by handshake p99")
    for node in NODES:
        if node.slow:  # the retransmitted SYN: the bucket (2**29, 2**30] ns
            assert 2 ** 29 / 1e9 < p99[node.instance] <= 2 ** 30 / 1e9
        else:  # a handshake across a veth takes microseconds
            assert p99[node.instance] < 0.01


def test_top_nodes_by_resets(fleet):
    resets = by_instance(fleet, "Top nodes by resets/s")
    assert resets["node-a"] == 0
    # both ends of a reset connection go ESTABLISHED -> CLOSE; the rates of
    # different exporters extrapolate slightly differently
    assert resets["node-b"] == pytest.approx(2 * resets["node-c"], rel=0.25)


def test_fleet_totals(fleet):
    def stat(title: str) -> float:
        (target,) = [t for p, t in panel_queries(FLEET) if p["title"] == title]
        (sample,) = fleet.api.query(substitute(target["expr"], VARIABLES))
        return float(sample["value"][1])

    assert stat("Nodes") == len(NODES)
    assert stat("CLOSE-WAIT sockets") == sum(n.close_wait for n in NODES)
    total_ratio = sum(n.refused for n in NODES) / sum(n.connects for n in NODES)
    assert stat("Connect failure ratio") == pytest.approx(total_ratio, rel=0.1)


def test_instance_level_records_have_one_series_per_node(fleet):
    for record in (rules.CONNECT_ATTEMPTS, rules.CONNECT_FAILURES,
                   rules.CONNECT_FAILURE_RATIO_SERIES, rules.HANDSHAKE_P99, rules.TABLE_EVICTIONS):
        result = fleet.api.query(record)
        assert sorted(s["metric"]["instance"] for s in result) == [n.instance for n in NODES], record


def test_node_picker_lists_every_node(fleet):
    (picker,) = [v for v in FLEET["templating"]["list"] if v["name"] == "instance"]
    assert picker["query"]["query"] == f"label_values({m.BUILD_INFO}, instance)"
    result = fleet.api.query(f"count by (instance) ({m.BUILD_INFO})")
    assert sorted(s["metric"]["instance"] for s in result) == [n.instance for n in NODES]


def test_budget_relabelling_keeps_only_the_handshake_buckets(fleet):
    assert fleet.api.query(f'{m.STATE_DURATION}_bucket{{old_state!="syn_sent"}}') == []
    assert fleet.api.query(f'{m.STATE_DURATION}_count{{old_state!="syn_sent"}}')
    kept = fleet.api.query(f'count by (old_state, new_state) ({m.STATE_DURATION}_bucket)')
    assert [s["metric"] for s in kept] == [{"old_state": "syn_sent", "new_state": "established"}]
