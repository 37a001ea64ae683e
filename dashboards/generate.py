"""Generates tcpstate's Grafana dashboards and Prometheus rule file.

    python -m dashboards.generate          # (re)write the committed files
    python -m dashboards.generate --check  # exit 1 if they differ

The metric names come from tracer/metrics.py, the states from
tracer/states.py, the recorded series from dashboards/rules.py: a name is
spelled once. The output is committed so that users need no Python to
provision it; tests/unit/test_dashboards.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Iterable

from grafana_foundation_sdk.builders import (
    common as cb,
    dashboard as db,
    heatmap,
    nodegraph,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm, dashboard as dm, heatmap as hm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from tracer import metrics as m
from tracer.states import BY_NAME

from . import rules as r
from .promql import selector, time_wait_handoffs, transition

HERE = Path(__file__).resolve().parent
RULES_FILE = HERE / "rules" / "tcpstate.rules.yml"

OVERVIEW_UID = "tcpstate-overview"
HEALTH_UID = "tcpstate-health"
FLEET_UID = "tcpstate-fleet"
TAGS = ["tcpstate", "tcp"]
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
RATE = "$__rate_interval"
# The selectors of the single-node dashboards; the port matcher matches
# series without a port label too (regex ".*"), so it works unlabelled.
NODE = {"instance": "$instance"}
NODE_PORT = {"instance": "$instance", "port": "~$port"}


# ---- small builders ---------------------------------------------------------
def query(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
          fmt: PromQueryFormat | None = None) -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    q = q.instant() if instant else q.range()
    if legend:
        q = q.legend_format(legend)
    if fmt is not None:
        q = q.format(fmt)
    return q


def rate(metric: str, by: str, **labels: str) -> str:
    grouping = f"sum by ({by}) " if by else "sum "
    return f"{grouping}(rate({selector(metric, **labels)}[{RATE}]))"


def graph(title: str, description: str, queries: Iterable[prometheus.Dataquery], *,
          unit: str = "short", width: int = 12, height: int = 8, stacked: bool = False,
          ) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).description(description).datasource(DATASOURCE)
             .unit(unit).span(width).height(height).fill_opacity(10).line_width(1)
             .legend(cb.VizLegendOptions().show_legend(True)
                     .display_mode(cm.LegendDisplayMode.TABLE)
                     .placement(cm.LegendPlacement.BOTTOM).calcs(["mean", "max", "lastNotNull"]))
             .tooltip(cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI)
                      .sort(cm.SortOrder.DESCENDING)))
    if stacked:
        panel = panel.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL)).fill_opacity(60)
    for q in queries:
        panel = panel.with_target(q)
    return panel


def organize(rename: dict[str, str], exclude: Iterable[str] = ("Time",),
             order: Iterable[str] = ()) -> dm.DataTransformerConfig:
    return dm.DataTransformerConfig(id_val="organize", options={
        "excludeByName": {name: True for name in exclude},
        "renameByName": rename,
        "indexByName": {name: i for i, name in enumerate(order)},
    })


def with_ids(dashboard: dict) -> dict:
    """Stable panel ids, in layout order (Grafana needs them unique)."""
    for number, panel in enumerate(dashboard["panels"], start=1):
        panel["id"] = number
    return dashboard


def datasource_variable() -> db.DatasourceVariable:
    return db.DatasourceVariable("datasource").label("Data source").type("prometheus")


def label_variable(name: str, label: str, expr: str, *, multi: bool = False,
                   all_value: str | None = None) -> db.QueryVariable:
    var = (db.QueryVariable(name).label(label).datasource(DATASOURCE)
           .query({"query": f"label_values({expr}, {name})", "refId": f"{name}-values"})
           .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.NATURAL_ASC))
    if multi:
        var = var.multi(True)
    if all_value is not None:
        var = var.include_all(True).all_value(all_value)
    return var


def build(dashboard: db.Dashboard) -> dict:
    return with_ids(json.loads(json.dumps(dashboard.build(), cls=JSONEncoder)))


# ---- the "TCP life-cycle" overview -----------------------------------------------
def lifecycle_graph() -> nodegraph.Panel:
    """The RFC 793 diagram, live: states are nodes (main stat: sockets now),
    transitions are edges (main stat: per second). Grafana's node graph reads
    a frame with a `source` field as edges and any other frame as nodes; the
    organize transformation renames the Prometheus table columns to the
    field names it wants (id, title, source, target, mainStat)."""
    states = "|".join(s for s in BY_NAME if s != "new_syn_recv")
    live = (f"sum by (state) ({selector(m.SOCKETS, **NODE_PORT)}) * on (state) "
            f"group_left (rfc793_name) max by (state, rfc793_name) "
            f"({selector(m.STATE_INFO, **NODE)})")
    # CLOSE has no gauge; it is a node all the same, with 0 sockets
    nodes = (f"{live} or (0 * max by (state, rfc793_name) "
             f"({selector(m.STATE_INFO, **NODE, state='~' + states)}))")
    edges = (f'label_join({rate(m.TRANSITIONS, "old_state, new_state", **NODE_PORT)}, '
             f'"id", "->", "old_state", "new_state")')
    return (nodegraph.Panel().title("Life-cycle: sockets per state, transitions/s")
            .description("The TCP state diagram of RFC 793, drawn from live data. Nodes are "
                         "states with the sockets in them now; edges are transitions with "
                         "their rate. There is no edge into TIME-WAIT: the kernel hands a "
                         "closing socket to a TIME-WAIT mini-socket and reports "
                         "FIN-WAIT-2/CLOSING -> CLOSE.")
            .datasource(DATASOURCE).span(24).height(14)
            .with_target(query(nodes, ref="nodes", instant=True, fmt=PromQueryFormat.TABLE))
            .with_target(query(edges, ref="edges", instant=True, fmt=PromQueryFormat.TABLE))
            .with_transformation(organize(
                {"state": "id", "rfc793_name": "title", "old_state": "source",
                 "new_state": "target", "Value": "mainStat", "Value #nodes": "mainStat",
                 "Value #edges": "mainStat"}))
            .nodes(nodegraph.NodeOptions().main_stat_unit("short"))
            .edges(nodegraph.EdgeOptions().main_stat_unit("/s")))


def state_table() -> table.Panel:
    expr = (f"sum by (state) ({selector(m.SOCKETS, **NODE_PORT)}) * on (state) "
            f"group_left (kernel_code, mib_code, rfc793_name) "
            f"max by (state, kernel_code, mib_code, rfc793_name) ({selector(m.STATE_INFO, **NODE)})")
    return (table.Panel().title("State table (TCP-MIB tcpConnState)")
            .description("Sockets in each state now, with the state's RFC 793 name, TCP-MIB "
                         "tcpConnState code and Linux kernel code (tcpstate_state_info).")
            .datasource(DATASOURCE).span(8).height(10)
            .with_target(query(expr, instant=True, fmt=PromQueryFormat.TABLE))
            .with_transformation(organize(
                {"rfc793_name": "RFC 793", "mib_code": "TCP-MIB", "kernel_code": "kernel",
                 "state": "state", "Value": "sockets"},
                order=("mib_code", "rfc793_name", "state", "kernel_code", "Value")))
            .sort_by([cb.TableSortByFieldState().display_name("TCP-MIB")]))


def overview() -> dict:
    syn_sent_exits = rate(m.TRANSITIONS, "", **transition("syn_sent", **NODE_PORT))
    handshake = (f"{m.STATE_DURATION}_bucket",
                 transition("syn_sent", "established", **NODE_PORT))
    dash = (db.Dashboard("TCP life-cycle").uid(OVERVIEW_UID).tags(TAGS)
            .description("The TCP connection life-cycle of one node, from tcpstate's eBPF "
                         "tracepoint counters.")
            .time("now-1h", "now").refresh("30s").timezone("browser").editable()
            .tooltip(dm.DashboardCursorSync.CROSSHAIR)
            .with_variable(datasource_variable())
            .with_variable(label_variable("instance", "Node", m.BUILD_INFO))
            .with_variable(label_variable("port", "Service port",
                                          selector(m.TRANSITIONS, **NODE),
                                          multi=True, all_value=".*"))
            .link(db.DashboardLink("tcpstate").type(dm.DashboardLinkType.DASHBOARDS)
                  .tags(["tcpstate"]).as_dropdown(True).include_vars(True).keep_time(True)))

    dash = dash.with_row(db.Row("Life-cycle")).with_panel(lifecycle_graph())
    dash = dash.with_panel(graph(
        "Transitions/s by transition",
        "Every state change the kernel made, per second (sock:inet_sock_set_state).",
        [query(rate(m.TRANSITIONS, "old_state, new_state", **NODE_PORT),
               "{{old_state}} -> {{new_state}}")],
        unit="ops", width=24))

    dash = dash.with_row(db.Row("Sockets"))
    dash = dash.with_panel(graph(
        "Sockets per state",
        "Live TCP sockets by state. TIME-WAIT is the kernel's own per-namespace count "
        "(it includes orphaned FIN-WAIT-2 mini-sockets) and has no port: it shows only "
        "when all ports are selected.",
        [query(f"sum by (state) ({selector(m.SOCKETS, **NODE_PORT)})", "{{state}}")],
        width=16, height=10, stacked=True))
    dash = dash.with_panel(state_table())
    dash = dash.with_panel(graph(
        "CLOSE_WAIT sockets by port",
        "Sockets whose peer closed while the local program has not: a count that only "
        "grows is a program leaking connections (alert TcpstateCloseWaitGrowing).",
        [query(f"sum by (port) ({selector(m.SOCKETS, **NODE_PORT, state='close_wait')})",
               "port {{port}}")]))
    dash = dash.with_panel(graph(
        "Hand-offs to TIME-WAIT/s",
        "Sockets given to a TIME-WAIT mini-socket (FIN-WAIT-1/2 or CLOSING -> CLOSE: the "
        "kernel reports no transition into TIME-WAIT; FIN-WAIT-1 -> CLOSE may also be a "
        "reset), and the TIME-WAIT sockets of all namespaces now (right axis).",
        [query(rate(m.TRANSITIONS, "old_state", **time_wait_handoffs(**NODE_PORT)),
               "{{old_state}} -> close"),
         query(f"sum({selector(m.SOCKETS, **NODE, state='time_wait')})",
               "TIME-WAIT sockets", ref="B")],
        unit="ops")
        .override_by_name("TIME-WAIT sockets", [
            dm.DynamicConfigValue(id_val="custom.axisPlacement", value="right"),
            dm.DynamicConfigValue(id_val="unit", value="short")]))

    dash = dash.with_row(db.Row("Connections"))
    dash = dash.with_panel(graph(
        "Connect outcomes/s",
        "Outgoing connects by how SYN-SENT ended: ESTABLISHED, or CLOSE (refused, timed "
        "out, or reset during the handshake).",
        [query(rate(m.TRANSITIONS, "", **transition("syn_sent", "established", **NODE_PORT)),
               "established"),
         query(rate(m.TRANSITIONS, "", **transition("syn_sent", "close", **NODE_PORT)),
               "failed (syn_sent -> close)", ref="B")],
        unit="ops", width=8))
    dash = dash.with_panel(graph(
        "Connect failure ratio",
        "The share of connects that ended SYN-SENT -> CLOSE.",
        [query(f"{rate(m.TRANSITIONS, '', **transition('syn_sent', 'close', **NODE_PORT))}"
               f" / {syn_sent_exits}", "failure ratio")],
        unit="percentunit", width=8)
        .min(0).max(1)
        .thresholds(db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps([
            dm.Threshold(value=None, color="green"),
            dm.Threshold(value=r.CONNECT_FAILURE_RATIO, color="red")]))
        .thresholds_style(cb.GraphThresholdsStyleConfig().mode(
            cm.GraphThresholdsStyleMode.LINE)))
    dash = dash.with_panel(graph(
        "Resets/s (ESTABLISHED -> CLOSE)",
        "Established connections that ended without the FIN exchange: a reset received "
        "or sent (including an abortive close with SO_LINGER 0).",
        [query(rate(m.TRANSITIONS, "port", **transition("established", "close", **NODE_PORT)),
               "port {{port}}")],
        unit="ops", width=8))
    dash = dash.with_panel(graph(
        "Handshake duration (SYN-SENT -> ESTABLISHED)",
        "Percentiles of the time outgoing connects spent in SYN-SENT: one round trip, "
        "plus the retransmission timeouts of lost SYNs (>= 1 s each).",
        [query(f"histogram_quantile({q}, sum by (le) "
               f"(rate({selector(handshake[0], **handshake[1])}[{RATE}])))",
               f"p{int(q * 100)}", ref=ref)
         for q, ref in ((0.5, "A"), (0.9, "B"), (0.99, "C"))],
        unit="s"))
    dash = dash.with_panel(
        heatmap.Panel().title("Handshake duration heatmap")
        .description("Connects per duration bucket and time (the kernel's log2 buckets).")
        .datasource(DATASOURCE).span(12).height(8)
        .with_target(query(f"sum by (le) (increase({selector(handshake[0], **handshake[1])}"
                           f"[{RATE}]))", "{{le}}", fmt=PromQueryFormat.HEATMAP))
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("s"))
        .rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.LE))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME)
               .scheme("Oranges").steps(64)))
    dash = dash.with_panel(graph(
        "Connection lifetime",
        "Whole connections, from their first state after CLOSE or LISTEN to CLOSE, by "
        "side (client: connect(); server: accept()).",
        [query(f"histogram_quantile({q}, sum by (side, le) (rate("
               f"{selector(m.CONNECTION_DURATION + '_bucket', **NODE_PORT)}[{RATE}])))",
               f"{{{{side}}}} p{int(q * 100)}", ref=ref)
         for q, ref in ((0.5, "A"), (0.99, "B"))],
        unit="s", width=24))

    dash = dash.with_row(db.Row("Per service port"))
    dash = dash.with_panel(port_table())
    return build(dash)


def port_table() -> table.Panel:
    """One row per labelled service port (tcpstate serve --service-ports)."""
    by = "port"
    p = {**NODE_PORT}
    columns = (
        ("connects", "Connects/s", rate(m.TRANSITIONS, by, **transition("syn_sent", **p))),
        ("failed", "Failure ratio",
         f"{rate(m.TRANSITIONS, by, **transition('syn_sent', 'close', **p))} / "
         f"({rate(m.TRANSITIONS, by, **transition('syn_sent', **p))} > 0)"),
        ("accepts", "Accepts/s", rate(m.TRANSITIONS, by, **transition("syn_recv", "established", **p))),
        ("resets", "Resets/s", rate(m.TRANSITIONS, by, **transition("established", "close", **p))),
        ("established", "ESTABLISHED", f"sum by (port) ({selector(m.SOCKETS, **p, state='established')})"),
        ("close_wait", "CLOSE-WAIT", f"sum by (port) ({selector(m.SOCKETS, **p, state='close_wait')})"),
        ("p99", "Handshake p99",
         f"histogram_quantile(0.99, sum by (port, le) (rate("
         f"{selector(m.STATE_DURATION + '_bucket', **transition('syn_sent', 'established', **p))}"
         f"[{RATE}])))"),
    )
    panel = (table.Panel().title("Per service port")
             .description("Each service port tcpstate labels (--service-ports); `other` is "
                          "every other port. Rates over the dashboard's rate interval.")
             .datasource(DATASOURCE).span(24).height(9)
             .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
             .with_transformation(organize(
                 {f"Value #{ref}": title for ref, title, _ in columns},
                 order=("port", *(f"Value #{ref}" for ref, _, _ in columns))))
             .override_by_name("Failure ratio", [dm.DynamicConfigValue(id_val="unit", value="percentunit")])
             .override_by_name("Handshake p99", [dm.DynamicConfigValue(id_val="unit", value="s")]))
    for ref, _, expr in columns:
        panel = panel.with_target(query(expr, ref=ref, instant=True, fmt=PromQueryFormat.TABLE))
    return panel


# ---- "tcpstate exporter health" ----------------------------------------------------
def health() -> dict:
    node = {"job": "$job", "instance": "~$instance"}
    dash = (db.Dashboard("tcpstate exporter health").uid(HEALTH_UID).tags(TAGS)
            .description("Is tcpstate itself healthy: scrapes, its kernel tables, its losses.")
            .time("now-6h", "now").refresh("1m").timezone("browser").editable()
            .with_variable(datasource_variable())
            .with_variable(label_variable("job", "Job", m.BUILD_INFO))
            .with_variable(label_variable("instance", "Node", selector(m.BUILD_INFO, job="$job"),
                                          multi=True, all_value=".*"))
            .link(db.DashboardLink("tcpstate").type(dm.DashboardLinkType.DASHBOARDS)
                  .tags(["tcpstate"]).as_dropdown(True).include_vars(True).keep_time(True)))
    dash = dash.with_panel(graph(
        "Scrape up", "1 when Prometheus scraped the exporter (alert TcpstateExporterDown).",
        [query(f"{selector('up', **node)}", "{{instance}}")], width=8).min(0).max(1))
    dash = dash.with_panel(graph(
        "Collector success",
        "tcpstate_scrape_collector_success: 0 means that part of the collector failed and "
        "its families are missing (alert TcpstateCollectorFailing).",
        [query(selector(m.SCRAPE_SUCCESS, **node), "{{instance}} {{collector}}")],
        width=8).min(0).max(1))
    dash = dash.with_panel(graph(
        "Collector duration", "Time each part of the collector took per scrape.",
        [query(selector(m.SCRAPE_DURATION, **node), "{{instance}} {{collector}}")],
        unit="s", width=8))
    dash = dash.with_panel(graph(
        "Socket table fill",
        "Sockets tracked for durations over the table's capacity (--socket-table-size).",
        [query(f"{selector(m.SOCKET_TABLE_ENTRIES, **node)} / "
               f"{selector(m.SOCKET_TABLE_CAPACITY, **node)}", "{{instance}}")],
        unit="percentunit", width=8).min(0))
    dash = dash.with_panel(graph(
        "Socket table evictions/s",
        "Entries evicted from a full table row: their durations are lost "
        "(alert TcpstateSocketTableEvicting).",
        [query(rate(m.SOCKET_TABLE_EVICTIONS, "instance", **node), "{{instance}}")],
        unit="ops", width=8))
    dash = dash.with_panel(graph(
        "Transitions without a duration/s",
        "Transitions of sockets with no recorded entry time (older than the exporter, or "
        "evicted): counted, never observed as a duration.",
        [query(rate(m.DURATION_UNKNOWN, "instance", **node), "{{instance}}")],
        unit="ops", width=8))
    dash = dash.with_panel(graph(
        "Missed BPF events/s",
        "Tracepoint hits the kernel did not run the program for (it was already running "
        "on that CPU): these transitions are missing from every count.",
        [query(rate(m.MISSED_EVENTS, "instance", **node), "{{instance}}")],
        unit="ops", width=8))
    dash = dash.with_panel(graph(
        "Non-TCP state changes/s",
        "SCTP and MPTCP state changes the tracepoint reported and tcpstate skipped.",
        [query(rate(m.OTHER_PROTOCOL, "instance", **node), "{{instance}}")],
        unit="ops", width=8))
    dash = dash.with_panel(graph(
        "Series per scrape",
        "Samples Prometheus ingests per scrape of each exporter (the series budget).",
        [query(selector("scrape_samples_scraped", **node), "{{instance}}")], width=8))
    dash = dash.with_panel(
        table.Panel().title("Build info")
        .description("tcpstate's version, the bcc it runs on, and the kernel, per node.")
        .datasource(DATASOURCE).span(24).height(6)
        .with_target(query(selector(m.BUILD_INFO, **node), instant=True,
                           fmt=PromQueryFormat.TABLE))
        .with_transformation(organize({}, exclude=("Time", "Value", "__name__"),
                                      order=("instance", "version", "bcc_version", "kernel"))))
    return build(dash)


# ---- the fleet view -------------------------------------------------------------------
def fleet() -> dict:
    port = {"port": "~$port"}
    drill = [dm.DynamicConfigValue(id_val="links", value=[{
        "title": "TCP life-cycle of ${__value.raw}",
        "url": f"/d/{OVERVIEW_UID}?var-instance=${{__value.raw}}&${{datasource:queryparam}}"
               "&${__url_time_range}",
    }])]

    def top(title: str, description: str, expr: str, unit: str) -> table.Panel:
        return (table.Panel().title(title).description(description).datasource(DATASOURCE)
                .span(6).height(10)
                .with_target(query(f"topk($limit, {expr})", instant=True,
                                   fmt=PromQueryFormat.TABLE))
                .with_transformation(organize({"Value": title.split(" by ")[-1]},
                                              exclude=("Time", "job")))
                .sort_by([cb.TableSortByFieldState().display_name(title.split(" by ")[-1])
                          .desc(True)])
                .override_by_name("instance", drill)
                .override_by_name(title.split(" by ")[-1],
                                  [dm.DynamicConfigValue(id_val="unit", value=unit)]))

    def per_node(series: str) -> str:
        return f"sum by (instance) ({selector(series, **port)})"

    failure_ratio = (f"{per_node(r.PORT_CONNECT_FAILURES)} / "
                     f"({per_node(r.PORT_CONNECT_ATTEMPTS)} > 0)")
    p99 = r.handshake_quantile(0.99, selector(r.PORT_HANDSHAKE_BUCKETS, **port), "instance")
    dash = (db.Dashboard("tcpstate fleet").uid(FLEET_UID).tags(TAGS)
            .description("Every node running tcpstate, ranked; click a node to open its "
                         "TCP life-cycle. Reads only the recorded series of "
                         "dashboards/rules/tcpstate.rules.yml.")
            .time("now-1h", "now").refresh("1m").timezone("browser").editable()
            .with_variable(datasource_variable())
            .with_variable(label_variable("port", "Service port", r.PORT_CONNECT_ATTEMPTS,
                                          multi=True, all_value=".*"))
            .with_variable(db.CustomVariable("limit").label("Top").values("10,25,100")
                           .current(dm.VariableOption(text="10", value="10")))
            .with_variable(label_variable("instance", "Open node", m.BUILD_INFO))
            .link(db.DashboardLink("TCP life-cycle of the picked node")
                  .type(dm.DashboardLinkType.LINK).url(f"/d/{OVERVIEW_UID}")
                  .include_vars(True).keep_time(True).icon("dashboard")))
    dash = dash.with_panel(
        stat.Panel().title("Nodes").description("Nodes whose tcpstate Prometheus scrapes.")
        .datasource(DATASOURCE).span(6).height(4)
        .with_target(query(f"count({m.BUILD_INFO})", instant=True)))
    dash = dash.with_panel(
        stat.Panel().title("Connects/s").description("Outgoing connects of the whole fleet.")
        .datasource(DATASOURCE).span(6).height(4).unit("ops")
        .with_target(query(f"sum({selector(r.PORT_CONNECT_ATTEMPTS, **port)})", instant=True)))
    dash = dash.with_panel(
        stat.Panel().title("Connect failure ratio")
        .description("The share of the fleet's connects that ended SYN-SENT -> CLOSE.")
        .datasource(DATASOURCE).span(6).height(4).unit("percentunit")
        .with_target(query(f"sum({selector(r.PORT_CONNECT_FAILURES, **port)}) / "
                           f"sum({selector(r.PORT_CONNECT_ATTEMPTS, **port)})", instant=True)))
    dash = dash.with_panel(
        stat.Panel().title("CLOSE-WAIT sockets")
        .description("Sockets in CLOSE-WAIT on the whole fleet.")
        .datasource(DATASOURCE).span(6).height(4)
        .with_target(query(f"sum({selector(r.PORT_CLOSE_WAIT, **port)})", instant=True)))
    dash = dash.with_panel(top(
        "Top nodes by connect failure ratio",
        "Nodes whose outgoing connects fail most (SYN-SENT -> CLOSE over all exits of "
        "SYN-SENT, last 5 minutes).", failure_ratio, "percentunit"))
    dash = dash.with_panel(top(
        "Top nodes by CLOSE-WAIT sockets",
        "Nodes holding the most sockets in CLOSE-WAIT (a leak grows here).",
        per_node(r.PORT_CLOSE_WAIT), "short"))
    dash = dash.with_panel(top(
        "Top nodes by handshake p99",
        "Nodes whose connects' SYN-SENT -> ESTABLISHED 99th percentile is slowest "
        "(last 5 minutes).", p99, "s"))
    dash = dash.with_panel(top(
        "Top nodes by resets/s",
        "Nodes whose established connections most often end in a reset "
        "(ESTABLISHED -> CLOSE, last 5 minutes).", per_node(r.PORT_RESETS), "ops"))
    return build(dash)


# ---- files ---------------------------------------------------------------------------
def outputs() -> dict[Path, str]:
    """Every generated file and its content."""
    files = {HERE / f"{uid}.json": json.dumps(board, indent=2, sort_keys=True) + "\n"
             for uid, board in ((OVERVIEW_UID, overview()), (HEALTH_UID, health()),
                                (FLEET_UID, fleet()))}
    files[RULES_FILE] = r.to_yaml(r.rule_groups())
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a committed file is stale")
    args = parser.parse_args(argv)
    stale = [path for path, text in outputs().items()
             if not path.exists() or path.read_text() != text]
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(HERE.parent)} (run make dashboards)", file=sys.stderr)
        return 1 if stale else 0
    for path, text in outputs().items():
        path.write_text(text)
    print(f"wrote {len(outputs())} files, {len(stale)} changed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
