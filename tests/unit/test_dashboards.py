"""The dashboards and rules: committed output is what the generator makes,
every name they read is one tcpstate exports (or a rule records), and
promtool accepts and unit-tests the rules."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import pytest

from dashboards import generate, rules
from dashboards.promql import (PROMETHEUS_SERIES, exported_names, metric_names, panel_queries,
                               panels, substitute, variable_queries)
from tracer import metrics as m
from tracer.reasons import REASONS
from tracer.states import BY_NAME, TIME_WAIT_HANDOFFS

RULES_DIR = generate.RULES_FILE.parent
RULES_TEST = RULES_DIR / "tcpstate.rules.test.yml"
DASHBOARDS = {uid: json.loads((generate.HERE / f"{uid}.json").read_text())
              for uid in (generate.OVERVIEW_UID, generate.HEALTH_UID, generate.FLEET_UID)}
RECORDED = {record.record for record in rules.RECORDS}


def all_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every PromQL expression the dashboards and rules hold."""
    found = []
    for uid, board in DASHBOARDS.items():
        found += [(f"{uid}: {panel['title']} [{target['refId']}]", target["expr"])
                  for panel, target in panel_queries(board)]
        found += [(f"{uid}: variable {name}", expr) for name, expr in variable_queries(board)]
    found += [(f"rule {record.record}", record.expr) for record in rules.RECORDS]
    found += [(f"alert {alert.alert}", alert.expr) for alert in rules.ALERTS]
    return found


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool (Debian prometheus) is missing under CI")
        pytest.skip("promtool not installed (make setup-test installs it)")
    return path


# ---- generated files --------------------------------------------------------------
def test_committed_files_are_what_the_generator_makes():
    for path, text in generate.outputs().items():
        assert path.exists(), f"{path} is missing: run make dashboards"
        assert path.read_text() == text, f"{path} is stale: run make dashboards"


def test_generator_check_mode_reports_a_stale_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(generate, "HERE", tmp_path)
    monkeypatch.setattr(generate, "RULES_FILE", tmp_path / "rules" / "tcpstate.rules.yml")
    monkeypatch.setattr(generate, "PROMETHEUS_EXAMPLE", tmp_path / "prometheus.yml")
    assert generate.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err


# ---- metric names -----------------------------------------------------------------
def test_metric_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(foo_bucket{a="b", c=~"x|y"}'
            '[$__rate_interval]))) / on (instance) group_left (version) bar_info offset 5m '
            '> 0.5 and instance:baz:rate5m unless label_join(qux, "id", "->", "a", "b")')
    assert metric_names(expr) == {"foo_bucket", "bar_info", "instance:baz:rate5m", "qux"}
    assert metric_names('{__name__="up", job="x"} or sum without (le) (a_b)') == {"up", "a_b"}


def test_every_name_read_is_exported_or_recorded():
    known = exported_names() | RECORDED | PROMETHEUS_SERIES
    for where, expr in all_expressions():
        unknown = metric_names(expr) - known
        assert not unknown, f"{where} reads undeclared {sorted(unknown)}: {expr}"


def test_exported_names_come_from_tracer_metrics():
    names = exported_names()
    assert {m.TRANSITIONS, m.SOCKETS, m.STATE_INFO, m.BUILD_INFO,
            f"{m.STATE_DURATION}_bucket", f"{m.CONNECTION_DURATION}_count"} <= names
    assert "tcpstate_transition_total" not in names  # a misspelling would be caught


def test_every_recorded_series_is_read_somewhere():
    read = set().union(*(metric_names(expr) for _, expr in all_expressions()))
    assert RECORDED <= read, f"recorded but never read: {sorted(RECORDED - read)}"


def test_no_query_asks_for_a_transition_into_time_wait():
    # The kernel hands closing sockets to TIME-WAIT mini-sockets: such a
    # transition does not exist, and a panel reading it would stay empty.
    for where, expr in all_expressions():
        assert not re.search(r'new_state=~?"[^"]*time_wait', expr), where
    handoffs = next(t["expr"] for p, t in panel_queries(DASHBOARDS[generate.OVERVIEW_UID])
                    if "TIME-WAIT" in p["title"] and t["refId"] == "A")
    for old, new in TIME_WAIT_HANDOFFS:
        assert old in handoffs and f'new_state="{new}"' in handoffs


# ---- dashboards ------------------------------------------------------------------------
@pytest.mark.parametrize("uid", DASHBOARDS)
def test_dashboard_is_provisioning_ready(uid):
    board = DASHBOARDS[uid]
    assert board["uid"] == uid and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids))
    for panel in panels(board):
        if panel["type"] == "row":
            continue
        assert panel.get("description"), f"{panel['title']} has no description"
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_overview_selects_node_and_port():
    board = DASHBOARDS[generate.OVERVIEW_UID]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["port"]["includeAll"] and variables["port"]["allValue"] == ".*"
    for panel, target in panel_queries(board):
        assert 'instance="$instance"' in target["expr"], panel["title"]
    types = {panel["type"] for panel in panels(board)}
    assert {"nodeGraph", "heatmap", "table", "timeseries"} <= types


def test_connect_failures_by_reason_panel():
    board = DASHBOARDS[generate.OVERVIEW_UID]
    panel = next(p for p in panels(board) if p["title"] == "Connect failures by reason")
    (target,) = panel["targets"]
    assert metric_names(target["expr"]) == {m.CLOSES}
    assert 'old_state="syn_sent"' in target["expr"] and "by (reason)" in target["expr"]
    assert target["legendFormat"] == "{{reason}}"


def test_network_failures_alert_apart_from_refusals():
    """Timeouts and unreachables have their own alert; refusals (a peer that
    answers) do not count towards it."""
    alert = next(a for a in rules.ALERTS if a.alert == "TcpstateConnectTimeoutsOrUnreachable")
    (record,) = [r for r in rules.RECORDS
                 if r.record == rules.CONNECT_NETWORK_FAILURE_RATIO_SERIES]
    assert rules.CONNECT_NETWORK_FAILURE_RATIO_SERIES in metric_names(alert.expr)
    assert 'reason=~"timeout|unreachable"' in record.expr
    assert set(rules.NETWORK_FAILURE_REASONS) <= set(REASONS)
    assert "refused" not in rules.NETWORK_FAILURE_REASONS


def test_life_cycle_graph_has_every_state_and_node_graph_fields():
    panel = next(p for p in panels(DASHBOARDS[generate.OVERVIEW_UID]) if p["type"] == "nodeGraph")
    nodes = next(t["expr"] for t in panel["targets"] if t["refId"] == "nodes")
    for state in BY_NAME:
        if state != "new_syn_recv":
            assert state in nodes
    renamed = panel["transformations"][0]["options"]["renameByName"]
    assert {"id", "title", "source", "target", "mainStat"} <= set(renamed.values())


def test_fleet_drills_into_the_overview():
    board = DASHBOARDS[generate.FLEET_UID]
    assert any(link.get("url") == f"/d/{generate.OVERVIEW_UID}" and link["includeVars"]
               for link in board["links"])
    tops = [p for p in panels(board) if p["title"].startswith("Top nodes")]
    assert len(tops) == 4
    for panel in tops:
        links = [prop["value"] for override in panel["fieldConfig"]["overrides"]
                 if override["matcher"]["options"] == "instance"
                 for prop in override["properties"] if prop["id"] == "links"]
        assert links and links[0][0]["url"].startswith(f"/d/{generate.OVERVIEW_UID}?var-instance=")
        assert panel["targets"][0]["expr"].startswith("topk($limit,")
        # the fleet reads recorded series only: cheap over thousands of nodes
        assert metric_names(panel["targets"][0]["expr"]) <= RECORDED


def test_substitute_prefers_longest_variable():
    assert substitute("rate(x[$__rate_interval]) $port ${port}",
                      {"__rate_interval": "1m", "__rate": "BAD", "port": "80"}) == "rate(x[1m]) 80 80"


# ---- rules ------------------------------------------------------------------------------
def test_every_alert_has_a_runbook_and_severity():
    for alert in rules.ALERTS:
        assert alert.severity in ("warning", "critical")
        assert alert.summary and alert.description and len(alert.runbook) > 100


def test_promtool_checks_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(generate.RULES_FILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules.RECORDS) + len(rules.ALERTS)} rules found" in result.stdout


def test_promtool_checks_the_example_configuration():
    result = subprocess.run([promtool(), "check", "config", str(generate.PROMETHEUS_EXAMPLE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_promtool_unit_tests_pass():
    result = subprocess.run([promtool(), "test", "rules", RULES_TEST.name],
                            cwd=RULES_DIR, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_tests_every_alert_firing_and_not_firing():
    text = RULES_TEST.read_text()
    cases = re.findall(r"alertname: (\w+)\n\s+eval_time: \S+.*\n\s+exp_alerts:( \[\])?", text)
    for alert in rules.ALERTS:
        outcomes = {bool(empty) for name, empty in cases if name == alert.alert}
        assert outcomes == {True, False}, f"{alert.alert}: needs a firing and a silent case"


def test_grafana_provisioning_files_fit_the_dashboards():
    """The provider loads a folder of files; the data source is of the type
    the dashboards' `datasource` variable offers."""
    import yaml

    provisioning = generate.HERE / "provisioning"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tcpstate.yaml").read_text())[
        "providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"]
    for uid, board in DASHBOARDS.items():
        (variable,) = [v for v in board["templating"]["list"] if v["name"] == "datasource"]
        assert variable["type"] == "datasource" and variable["query"] == source["type"], uid


def test_readme_shows_the_provisioning_files_as_they_are():
    readme = (generate.HERE.parent / "README.md").read_text()
    for path in sorted((generate.HERE / "provisioning").rglob("*.yaml")):
        assert f"```yaml\n{path.read_text()}```" in readme, path


def test_stuck_sockets_panel_and_relabelling_read_the_bucket_at_the_stuck_bound():
    """The overview's stuck-sockets panel and the TcpstateCloseWaitStuck
    rule read the age bucket at the bound nearest 10 minutes, which the
    budget relabelling keeps while it drops the age's other buckets."""
    from dashboards.scrape import BUDGET_RELABEL

    assert rules.STUCK_LE == "549.755813888"
    stuck = [target["expr"] for panel, target in panel_queries(DASHBOARDS[generate.OVERVIEW_UID])
             if panel["title"].startswith("Sockets in their state for over")]
    assert len(stuck) == 2
    assert f'{m.SOCKET_STATE_AGE}_bucket' in stuck[0] and f'le="{rules.STUCK_LE}"' in stuck[0]
    assert m.SOCKET_STATE_AGE_UNKNOWN in stuck[1]
    keep = [rule for rule in BUDGET_RELABEL if rule.get("source_labels") == ["__name__", "le"]]
    (rule,) = keep
    pattern = re.compile(rule["regex"])
    assert pattern.fullmatch(f"{m.SOCKET_STATE_AGE}_bucket;549.755813888")
    assert not pattern.fullmatch(f"{m.SOCKET_STATE_AGE}_bucket;1099.511627776")
    assert not pattern.fullmatch(f"{m.SOCKET_STATE_AGE}_bucket;549x755813888")
