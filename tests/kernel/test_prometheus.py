"""A real Prometheus scrapes a real `tcpstate serve` every second while real
connections succeed, get refused, get reset, wait on a lost SYN and stay in
CLOSE_WAIT. Then every panel query of the committed dashboards and every
recording rule must evaluate with data, every alert expression without
error, key panels must show exactly what the workload did, and the renderer
must draw every panel.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from dashboards import generate, render, rules
from dashboards.promapi import PromQLError
from dashboards.promql import panel_queries, panels, substitute
from tracer import metrics as m

from .exporter import Exporter
from .lifecycle_workload import churn, hold_close_wait, slow_handshake
from .netlab import Lab
from .prometheus_server import JOB, PrometheusServer
from .workload import client_closes_first, refused, reset, server_closes_first

PORT = 47201   # the workload's service port
IDLE = 47202   # labelled too, never used: its series must exist at 0
CHURN = 47203  # the preview's varying load (only with TCPSTATE_WRITE_PREVIEW)
INSTANCE = "node-1"
DASHBOARDS = {uid: json.loads((generate.HERE / f"{uid}.json").read_text())
              for uid in (generate.OVERVIEW_UID, generate.HEALTH_UID, generate.FLEET_UID)}
PREVIEW = generate.HERE / "preview" / "tcpstate-overview.png"
# TCPSTATE_WRITE_PREVIEW=SECONDS: run a varying load that long first, and
# write the rendered overview to PREVIEW (how the committed preview is made)
PREVIEW_SECONDS = float(os.environ.get("TCPSTATE_WRITE_PREVIEW") or 0)

# What the workload does on PORT (each connection counted at both ends
# where both ends have PORT as local or remote port)
SUCCEEDED, REFUSED, RESETS, HELD = 10 + 10 + 5 + 2, 10, 5, 3
CONNECTS_ESTABLISHED = SUCCEEDED + HELD


@dataclass
class Stack:
    prometheus: PrometheusServer
    variables: dict[str, str]
    start: float
    end: float


def sum_of(result: list[dict]) -> float:
    return sum(float(s["value"][1]) for s in result)


@pytest.fixture(scope="module")
def stack():
    exporter = Exporter(service_ports=(PORT, IDLE, CHURN))
    prometheus = PrometheusServer({INSTANCE: f"127.0.0.1:{exporter.port}"},
                                  rule_files=[generate.RULES_FILE])
    held: list[socket.socket] = []
    try:
        prometheus.start()  # starts while the exporter compiles its BPF program
        exporter.start()
        prometheus.ready()
        # Counters must be in the TSDB at 0 before the workload, or rate() sees no rise.
        prometheus.wait_for(f'{m.TRANSITIONS}{{instance="{INSTANCE}", port="{PORT}"}}')
        start = time.time()
        with Lab() as lab:
            if PREVIEW_SECONDS:
                held += churn(lab, CHURN, PREVIEW_SECONDS)
            client_closes_first(lab, socket.AF_INET, PORT, 10)
            time.sleep(1.5)  # a scrape between rounds: histograms get a rise too
            server_closes_first(lab, socket.AF_INET6, PORT, 10)
            reset(lab, socket.AF_INET, PORT, RESETS)
            refused(lab, socket.AF_INET, PORT, REFUSED)
            held += slow_handshake(lab, socket.AF_INET, PORT)
            with lab.listener(socket.AF_INET, PORT) as listener:
                held += hold_close_wait(lab, listener, socket.AF_INET, PORT, HELD)
            established = (f'sum({m.TRANSITIONS}{{instance="{INSTANCE}", port="{PORT}", '
                           f'old_state="syn_sent", new_state="established"}})')
            prometheus.wait_for(established,
                                lambda r: r and sum_of(r) == CONNECTS_ESTABLISHED)
            prometheus.wait_for(f'{rules.PORT_CLOSE_WAIT}{{instance="{INSTANCE}", port="{PORT}"}}',
                                lambda r: r and sum_of(r) == HELD)
            time.sleep(2)  # two more scrapes and rule evaluations at the final values
            yield Stack(prometheus, {
                "instance": INSTANCE, "port": str(PORT), "job": JOB, "limit": "10",
                "__rate_interval": "1m", "__interval": "1s"}, start, time.time())
    finally:
        for sock in held:
            sock.close()
        exporter.stop()
        prometheus.stop()


def evaluate(stack: Stack, target: dict) -> list[dict]:
    expr = substitute(target["expr"], stack.variables)
    api = stack.prometheus.api
    if target.get("instant"):
        return api.query(expr, stack.end)
    return api.query_range(expr, stack.start, stack.end, 1)


def panel_result(stack: Stack, uid: str, title: str, ref: str = "A") -> list[dict]:
    target = next(t for p, t in panel_queries(DASHBOARDS[uid])
                  if p["title"] == title and t["refId"] == ref)
    return evaluate(stack, target)


def last(series: dict) -> float:
    return float(series["values"][-1][1]) if "values" in series else float(series["value"][1])


@pytest.mark.parametrize("uid", DASHBOARDS)
def test_every_panel_query_returns_data(stack, uid):
    failures = []
    queries = list(panel_queries(DASHBOARDS[uid]))
    assert queries
    for panel, target in queries:
        where = f"{panel['title']} [{target['refId']}]"
        try:
            result = evaluate(stack, target)
        except PromQLError as exc:
            failures.append(f"{where}: {exc}")
            continue
        if not result:
            failures.append(f"{where}: no data for {substitute(target['expr'], stack.variables)}")
    assert not failures, "\n".join(failures)


def test_overview_panels_show_the_workload(stack):
    uid = generate.OVERVIEW_UID
    (ratio,) = panel_result(stack, uid, "Connect failure ratio")
    assert last(ratio) == pytest.approx(REFUSED / (REFUSED + CONNECTS_ESTABLISHED), rel=1e-9)

    (close_wait,) = panel_result(stack, uid, "CLOSE_WAIT sockets by port")
    assert close_wait["metric"] == {"port": str(PORT)} and last(close_wait) == HELD

    table = {s["metric"]["state"]: s for s in panel_result(stack, uid, "State table (TCP-MIB tcpConnState)")}
    assert table["close_wait"]["metric"]["mib_code"] == "8"
    assert table["close_wait"]["metric"]["rfc793_name"] == "CLOSE-WAIT"
    assert last(table["close_wait"]) == HELD

    nodes = panel_result(stack, uid, "Life-cycle: sockets per state, transitions/s", "nodes")
    assert {s["metric"]["state"] for s in nodes} >= {"close", "listen", "established", "close_wait"}
    edges = {s["metric"]["id"]: last(s) for s in
             panel_result(stack, uid, "Life-cycle: sockets per state, transitions/s", "edges")}
    assert edges["syn_sent->established"] > 0 and edges["established->close_wait"] > 0

    resets = panel_result(stack, uid, "Resets/s (ESTABLISHED -> CLOSE)")
    assert [s["metric"] for s in resets] == [{"port": str(PORT)}] and last(resets[0]) > 0

    # the lost SYN took the initial RTO (1 s): its bucket is the one up to 2**30 ns
    (p99,) = panel_result(stack, uid, "Handshake duration (SYN-SENT -> ESTABLISHED)", "C")
    assert 2 ** 29 / 1e9 < last(p99) <= 2 ** 30 / 1e9

    handoffs = {s["metric"]["old_state"]: last(s)
                for s in panel_result(stack, uid, "Hand-offs to TIME-WAIT/s")}
    assert handoffs["fin_wait2"] > 0  # the active closers went to TIME-WAIT


def test_per_port_table_isolates_each_port(stack):
    target_titles = {t["refId"]: t for p, t in panel_queries(DASHBOARDS[generate.OVERVIEW_UID])
                     if p["title"] == "Per service port"}
    both = {**stack.variables, "port": f"{PORT}|{IDLE}"}
    api = stack.prometheus.api
    values = {ref: {s["metric"]["port"]: float(s["value"][1])
                    for s in api.query(substitute(t["expr"], both), stack.end)}
              for ref, t in target_titles.items()}
    assert values["close_wait"] == {str(PORT): HELD, str(IDLE): 0}
    assert values["failed"] == {str(PORT): pytest.approx(REFUSED / (REFUSED + CONNECTS_ESTABLISHED))}
    assert values["connects"][str(IDLE)] == 0 and values["connects"][str(PORT)] > 0


def test_every_recording_rule_evaluates_with_data(stack):
    api = stack.prometheus.api
    loaded = {rule.get("name"): rule for rule in api.rules()}
    for record in rules.RECORDS:
        assert api.query(record.expr, stack.end), f"{record.record}: no data"
        assert api.query(record.record, stack.end), f"{record.record} was not recorded"
        assert loaded[record.record]["health"] == "ok", loaded[record.record].get("lastError")
    recorded = api.query(f'{rules.CONNECT_FAILURE_RATIO_SERIES}{{instance="{INSTANCE}"}}')
    assert len(recorded) == 1 and 0 < float(recorded[0]["value"][1]) <= 1
    per_port = api.query(f'{rules.PORT_CLOSE_WAIT}{{instance="{INSTANCE}", port="{PORT}"}}')
    assert float(per_port[0]["value"][1]) == HELD


def test_every_alert_expression_evaluates(stack):
    api = stack.prometheus.api
    loaded = {rule.get("name"): rule for rule in api.rules()}
    for alert in rules.ALERTS:
        api.query(alert.expr, stack.end)  # raises PromQLError on an error
        assert loaded[alert.alert]["health"] == "ok", loaded[alert.alert].get("lastError")
    (up,) = api.query(f'up{{job="{JOB}"}}')
    assert up["metric"]["instance"] == INSTANCE and up["value"][1] == "1"


def test_renderer_draws_every_panel(stack, tmp_path):
    board = DASHBOARDS[generate.OVERVIEW_UID]
    sheet = tmp_path / "overview.png"
    window = math.ceil(stack.end - stack.start) + 5
    args = ["--prometheus", stack.prometheus.url, "--dashboard",
            str(generate.HERE / f"{generate.OVERVIEW_UID}.json"), "--out", str(tmp_path / "panels"),
            "--sheet", str(sheet), "--range", f"{window}s", "--end", f"{stack.end:.3f}",
            "--scrape-interval", "1s", "--var", f"instance={INSTANCE}"]
    assert render.main(args) == 0
    drawn = sorted((tmp_path / "panels").glob("*.png"))
    assert len(drawn) == sum(1 for p in panels(board) if p["type"] != "row")
    for image in drawn + [sheet]:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.stat().st_size > 5000
    if PREVIEW_SECONDS:  # this test's ports only (the host is shared), smoother rates
        assert render.main(args[:4] + ["--sheet", str(PREVIEW)] + args[8:] + [
            "--var", f"port=({PORT}|{CHURN})", "--var", "__rate_interval=10s"]) == 0


@pytest.mark.parametrize("uid", [generate.HEALTH_UID, generate.FLEET_UID])
def test_renderer_draws_the_other_dashboards(stack, tmp_path, uid):
    window = math.ceil(stack.end - stack.start) + 5
    assert render.main(["--prometheus", stack.prometheus.url, "--dashboard",
                        str(generate.HERE / f"{uid}.json"), "--out", str(tmp_path),
                        "--range", f"{window}s", "--end", f"{stack.end:.3f}",
                        "--scrape-interval", "1s"]) == 0
    assert len(list(tmp_path.glob("*.png"))) == sum(
        1 for p in panels(DASHBOARDS[uid]) if p["type"] != "row")


def test_renderer_reports_a_failing_query(stack, tmp_path, capsys):
    board = json.loads((generate.HERE / f"{generate.HEALTH_UID}.json").read_text())
    board["panels"] = board["panels"][:1]
    board["panels"][0]["targets"][0]["expr"] = "rate(up[)"  # not PromQL
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(board))
    assert render.main(["--prometheus", stack.prometheus.url, "--dashboard", str(path),
                        "--out", str(tmp_path), "--scrape-interval", "1s"]) == 1
    assert "query failed: Scrape up [A]: bad_data" in capsys.readouterr().err
