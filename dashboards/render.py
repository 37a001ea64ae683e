"""Renders a Grafana dashboard's panels from a Prometheus into PNG images,
so a dashboard can be looked at where no Grafana runs.

    python -m dashboards.render --prometheus http://127.0.0.1:9090 \\
        --dashboard dashboards/tcpstate-overview.json --out /tmp/panels \\
        [--sheet overview.png] [--var instance=node-1] [--range 1h]

Each panel's queries are read from the dashboard JSON, its variables
substituted as Grafana would ($__rate_interval from --scrape-interval), and
evaluated through the HTTP API (query_range for graphs and heatmaps, instant
queries for tables, stats and the node graph); matplotlib draws the result.
One PNG per panel goes to --out; --sheet draws the whole dashboard, laid
out by its gridPos, into one image. A failed query is drawn as its error,
reported on stderr, and makes the exit status 1.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")  # no display: files only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from tracer.cli import _Parser as OneLineErrorParser  # noqa: E402

from .promapi import PrometheusAPI, PromQLError  # noqa: E402
from .promql import panels, substitute  # noqa: E402

# Where the life-cycle panel puts each state: RFC 793's figure 6, with
# CLOSED on top (tcpstate's CLOSE is both a socket's birth and its end).
STATE_POSITIONS = {
    "close": (0.5, 1.0), "listen": (0.5, 0.82), "syn_recv": (0.15, 0.66),
    "syn_sent": (0.85, 0.66), "established": (0.5, 0.5), "fin_wait1": (0.15, 0.33),
    "close_wait": (0.85, 0.33), "closing": (0.5, 0.2), "fin_wait2": (0.15, 0.05),
    "last_ack": (0.85, 0.1), "time_wait": (0.5, 0.0),
}
ROW_INCHES = 0.36   # one grid row of a Grafana dashboard
COLUMN_INCHES = 0.7  # one of its 24 columns


@dataclass
class Context:
    api: PrometheusAPI
    variables: dict[str, str]
    start: float
    end: float
    step: float
    errors: list[str] = field(default_factory=list)


# ---- units and labels ----------------------------------------------------------------
def duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 15s, 5m, 1h")
    return float(match.group(1)) * units[match.group(2)]


def prom_duration(seconds: float) -> str:
    return f"{max(1, round(seconds))}s"


def format_value(value: float, unit: str) -> str:
    if math.isnan(value):
        return "NaN"
    if unit == "percentunit":
        return f"{value:.1%}"
    if unit == "s":
        for scale, suffix in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(value) >= scale or scale == 1e-6:
                return f"{value / scale:.3g} {suffix}" if value else "0 s"
    suffix = "/s" if unit in ("ops", "/s") else ""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}{suffix}"
    return f"{value:.3g}{suffix}"


def legend(template: str, labels: dict[str, str]) -> str:
    if not template:
        return "{" + ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


def panel_unit(panel: dict) -> str:
    return panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")


def organize_options(panel: dict) -> dict:
    """The options of the panel's organize transformation (renames,
    excluded fields, column order), {} without one."""
    for transform in panel.get("transformations", []):
        if transform["id"] == "organize":
            return transform["options"]
    return {}


# ---- queries ------------------------------------------------------------------------------
def run_queries(panel: dict, ctx: Context, instant: bool) -> list[tuple[dict, list[dict]]]:
    """(target, result) of each query of the panel; errors are recorded."""
    out = []
    for target in panel.get("targets", []):
        expr = substitute(target["expr"], ctx.variables)
        try:
            if instant or target.get("instant"):
                result = ctx.api.query(expr, ctx.end)
            else:
                result = ctx.api.query_range(expr, ctx.start, ctx.end, ctx.step)
        except PromQLError as exc:
            ctx.errors.append(f"{panel['title']} [{target['refId']}]: {exc}")
            result = []
        out.append((target, result))
    return out


def series_values(series: dict) -> tuple[list[float], list[float]]:
    times = [float(t) for t, _ in series["values"]]
    return times, [float(v) for _, v in series["values"]]


# ---- panel drawers ----------------------------------------------------------------------
def overrides(panel: dict, prop: str) -> dict[str, object]:
    """{series name: value} of by-name field overrides setting `prop`."""
    return {o["matcher"]["options"]: p["value"]
            for o in panel.get("fieldConfig", {}).get("overrides", [])
            if o["matcher"]["id"] == "byName"
            for p in o["properties"] if p["id"] == prop}


def draw_timeseries(ax: Axes, panel: dict, ctx: Context) -> None:
    unit = panel_unit(panel)
    stacked = (panel.get("fieldConfig", {}).get("defaults", {}).get("custom", {})
               .get("stacking", {}).get("mode") == "normal")
    on_right = {name for name, place in overrides(panel, "custom.axisPlacement").items()
                if place == "right"}
    lines, right = [], []
    for target, result in run_queries(panel, ctx, instant=False):
        for series in result:
            times, values = series_values(series)
            name = legend(target.get("legendFormat", ""), series["metric"])
            (right if name in on_right else lines).append((name, times, values))
    lines.sort(key=lambda line: -max(line[2], default=0))
    if stacked and lines:
        grid = sorted({t for _, times, _ in lines for t in times})
        stacks = [[dict(zip(times, values)).get(t, 0.0) for t in grid] for _, times, values in lines]
        ax.stackplot([t - ctx.end for t in grid], *stacks,
                     labels=[name for name, _, _ in lines], alpha=0.8)
    else:
        for name, times, values in lines:
            ax.plot([t - ctx.end for t in times], values, label=name, linewidth=1.2)
    ax.set_xlim(ctx.start - ctx.end, 0)
    ax.set_xlabel("seconds before the end", fontsize=6)
    ax.yaxis.set_major_formatter(lambda v, _: format_value(v, unit))
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if right:  # a second y axis, as the override asks
        twin = ax.twinx()
        units = overrides(panel, "unit")
        for name, times, values in right:
            twin.plot([t - ctx.end for t in times], values, label=name, linewidth=1.2,
                      linestyle="--", color="tab:gray")
            twin.yaxis.set_major_formatter(lambda v, _, u=units.get(name, unit): format_value(v, u))
        twin.tick_params(labelsize=6)
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    shown = [line for line in lines + right if max(line[2], default=0) > 0] or lines + right
    if shown:
        keep = {name for name, _, _ in shown[:8]}
        pairs = [(h, l) for h, l in zip(handles, labels) if l in keep]
        ax.legend(*zip(*pairs), fontsize=5, loc="upper left", ncol=2, framealpha=0.6)
    else:
        no_data(ax)


def draw_heatmap(ax: Axes, panel: dict, ctx: Context) -> None:
    """Cumulative `le` buckets -> counts per bucket (as Grafana's heatmap
    format does), drawn over time; empty buckets at both ends are cut off."""
    buckets = {}
    for _, result in run_queries(panel, ctx, instant=False):
        for series in result:
            buckets[float(series["metric"].get("le", "inf"))] = dict(
                (float(t), float(v)) for t, v in series["values"])
    if not buckets:
        return no_data(ax)
    bounds = sorted(buckets)
    times = sorted({t for b in buckets.values() for t in b})
    cumulative = [[buckets[b].get(t, 0.0) for t in times] for b in bounds]
    counts = [cumulative[0]] + [[max(0.0, hi - lo) for hi, lo in zip(cumulative[i], cumulative[i - 1])]
                                for i in range(1, len(bounds))]
    used = [i for i, row in enumerate(counts) if any(row)]
    if not used:
        return no_data(ax)
    lo, hi = max(0, used[0] - 1), min(len(bounds), used[-1] + 2)
    image = ax.pcolormesh([t - ctx.end for t in times], range(lo, hi), counts[lo:hi],
                          cmap="Oranges", shading="nearest")
    every = max(1, (hi - lo) // 10)  # at most ~10 labels
    ax.set_yticks(range(lo, hi, every))
    ax.set_yticklabels([format_value(b, "s") if math.isfinite(b) else "+Inf"
                        for b in bounds[lo:hi:every]], fontsize=5)
    ax.set_xlabel("seconds before the end", fontsize=6)
    plt.colorbar(image, ax=ax, pad=0.01).ax.tick_params(labelsize=5)


def numeric_fields(panel: dict) -> list[str]:
    """Fields a convertFieldType transformation makes numbers."""
    return [conversion["targetField"]
            for transform in panel.get("transformations", []) if transform["id"] == "convertFieldType"
            for conversion in transform["options"].get("conversions", [])
            if conversion.get("destinationType") == "number"]


def table_rows(panel: dict, ctx: Context) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a table panel: several queries are merged on their
    labels (Grafana's merge transformation), columns renamed, dropped and
    ordered as the organize transformation says, rows sorted as sortBy says."""
    options = organize_options(panel)
    rename = options.get("renameByName", {})
    excluded = {k for k, v in options.get("excludeByName", {}).items() if v}
    order = options.get("indexByName", {})
    results = run_queries(panel, ctx, instant=True)
    merged: dict[tuple, dict[str, object]] = {}
    value_columns = []
    for target, result in results:
        column = f"Value #{target['refId']}" if len(results) > 1 else "Value"
        value_columns.append(column)
        for series in result:
            labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
            row = merged.setdefault(tuple(sorted(labels.items())), dict(labels))
            row[column] = float(series["value"][1])
    for column in numeric_fields(panel):  # Grafana's convertFieldType
        for row in merged.values():
            if column in row:
                row[column] = float(row[column]) if row[column] != "" else ""
    label_columns = sorted({k for row in merged.values() for k in row} - set(value_columns))
    columns = sorted([c for c in label_columns + value_columns if c not in excluded],
                     key=lambda c: order.get(c, len(order) + (c in value_columns)))
    header = [rename.get(c, c) for c in columns]
    rows = sort_rows([[row.get(c, "") for c in columns] for row in merged.values()], header, panel)
    units = overrides(panel, "unit")

    def cell(value: object, name: str) -> str:
        if isinstance(value, float):
            return format_value(value, units.get(name, panel_unit(panel)))
        return str(value)
    return header, [[cell(value, name) for value, name in zip(row, header)] for row in rows]


def sort_rows(rows: list[list], header: list[str], panel: dict) -> list[list]:
    """Sorted by the panel's sortBy column: numbers by value, then text."""
    sort_by = panel.get("options", {}).get("sortBy") or []
    if not sort_by or sort_by[0].get("displayName") not in header:
        return rows
    index = header.index(sort_by[0]["displayName"])

    def key(row: list) -> tuple:
        value = row[index]
        return (0, value, "") if isinstance(value, float) else (1, 0.0, str(value))
    return sorted(rows, key=key, reverse=bool(sort_by[0].get("desc")))


def draw_table(ax: Axes, panel: dict, ctx: Context) -> None:
    header, rows = table_rows(panel, ctx)
    ax.axis("off")
    if not rows:
        return no_data(ax)
    table = ax.table(cellText=rows[:20], colLabels=header, loc="upper center", cellLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(6)
    table.scale(1, 1.1)


def draw_stat(ax: Axes, panel: dict, ctx: Context) -> None:
    ax.axis("off")
    values = [float(s["value"][1]) for _, result in run_queries(panel, ctx, instant=True)
              for s in result]
    if not values:
        return no_data(ax)
    ax.text(0.5, 0.45, format_value(values[0], panel_unit(panel)), ha="center", va="center",
            fontsize=18, color="tab:green", transform=ax.transAxes)


def draw_node_graph(ax: Axes, panel: dict, ctx: Context) -> None:
    """States as nodes at their RFC 793 places, transitions as arrows whose
    width follows the rate; a transition at 0/s is a thin grey arrow."""
    rename = organize_options(panel).get("renameByName", {})
    frames = {target["refId"]: [{rename.get(k, k): v for k, v in
                                 {**s["metric"], "Value": s["value"][1]}.items()}
                                for s in result]
              for target, result in run_queries(panel, ctx, instant=True)}
    nodes = {row["id"]: row for rows in frames.values() for row in rows if "source" not in row}
    edges = [row for rows in frames.values() for row in rows if "source" in row]
    ax.axis("off")
    ax.set_xlim(-0.08, 1.08)
    ax.set_ylim(-0.08, 1.08)
    if not nodes and not edges:
        return no_data(ax)
    top = max((float(e["mainStat"]) for e in edges), default=0) or 1
    for edge in edges:
        a, b = STATE_POSITIONS.get(edge["source"]), STATE_POSITIONS.get(edge["target"])
        if a is None or b is None:
            continue
        rate = float(edge["mainStat"])
        live = rate > 0
        ax.annotate("", xy=b, xytext=a, arrowprops=dict(
            arrowstyle="-|>", color="tab:blue" if live else "0.8", shrinkA=18, shrinkB=18,
            linewidth=0.6 + 3.5 * math.sqrt(rate / top) if live else 0.5,
            connectionstyle="arc3,rad=0.18"))
        if live:
            mid = ((a[0] + b[0]) / 2 + (b[1] - a[1]) * 0.09, (a[1] + b[1]) / 2 - (b[0] - a[0]) * 0.09)
            ax.text(*mid, format_value(rate, "ops"), fontsize=5, ha="center", va="center",
                    color="tab:blue", bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none"))
    for state, (x, y) in STATE_POSITIONS.items():
        node = nodes.get(state, {})
        # a scatter marker stays round whatever the panel's aspect ratio
        ax.scatter([x], [y], s=1100, color="tab:orange" if node else "0.85", zorder=3)
        ax.text(x, y + 0.012, node.get("title", state), ha="center", va="center", fontsize=5.5,
                zorder=4, weight="bold")
        if node:
            ax.text(x, y - 0.018, format_value(float(node["mainStat"]), "short"),
                    ha="center", va="center", fontsize=5.5, zorder=4)


def no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, "No data", ha="center", va="center", transform=ax.transAxes,
            color="0.5", fontsize=9)


DRAWERS: dict[str, Callable[[Axes, dict, Context], None]] = {
    "timeseries": draw_timeseries, "heatmap": draw_heatmap, "table": draw_table,
    "stat": draw_stat, "nodeGraph": draw_node_graph,
}


def draw(ax: Axes, panel: dict, ctx: Context) -> None:
    ax.set_title(panel["title"], fontsize=8, loc="left")
    ax.tick_params(labelsize=6)
    drawer = DRAWERS.get(panel["type"])
    if drawer is None:
        ax.axis("off")
        ax.text(0.5, 0.5, f"({panel['type']} panels are not rendered)", ha="center",
                transform=ax.transAxes, fontsize=7)
    else:
        drawer(ax, panel, ctx)


# ---- files -------------------------------------------------------------------------------
def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_panels(dashboard: dict, ctx: Context, out: Path, dpi: int = 90) -> list[Path]:
    """One PNG per panel (rows excluded), named by panel id and title."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        grid = panel.get("gridPos", {"w": 12, "h": 8})
        fig = plt.figure(figsize=(max(4.0, grid["w"] * COLUMN_INCHES / 1.4),
                                  max(2.5, grid["h"] * ROW_INCHES * 1.1)))
        draw(fig.add_subplot(), panel, ctx)
        fig.tight_layout()
        path = out / f"{panel['id']:02d}-{slug(panel['title'])}.png"
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        written.append(path)
    return written


def render_sheet(dashboard: dict, ctx: Context, path: Path, dpi: int = 72) -> Path:
    """The whole dashboard in one image, each panel where gridPos puts it."""
    items = list(panels(dashboard))
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in items)
    width, height = 24 * COLUMN_INCHES, rows * ROW_INCHES + 0.6
    fig = plt.figure(figsize=(width, height))
    fig.suptitle(f"{dashboard['title']}  ({prom_duration(ctx.end - ctx.start)} ending "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(ctx.end))}; "
                 + ", ".join(f"{k}={v}" for k, v in sorted(ctx.variables.items())
                             if not k.startswith("__")) + ")", fontsize=11, x=0.01, ha="left")
    top = 0.6 / height
    for panel in items:
        g = panel["gridPos"]
        left, bottom = g["x"] / 24, 1 - top - (g["y"] + g["h"]) * ROW_INCHES / height
        w, h = g["w"] / 24, g["h"] * ROW_INCHES / height
        if panel["type"] == "row":
            fig.text(left + 0.005, bottom + h / 2, panel["title"], fontsize=10, weight="bold",
                     va="center")
            continue
        # margins inside the panel's cell for titles and tick labels
        ax = fig.add_axes((left + w * 0.06, bottom + h * 0.14, w * 0.9, h * 0.72))
        draw(ax, panel, ctx)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def default_variables(dashboard: dict, api: PrometheusAPI, given: dict[str, str]) -> dict[str, str]:
    """Values for the dashboard's variables that were not given: a query
    variable's All value if it has one, else its first value, as Grafana picks."""
    values = dict(given)
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if name in values:
            continue
        if var["type"] == "custom":
            values[name] = var.get("current", {}).get("value") or var["query"].split(",")[0]
        elif var["type"] == "query" and var.get("includeAll"):
            values[name] = var.get("allValue") or ".*"
        elif var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
            if inner:
                expr = substitute(inner.group(1), values)
                found = sorted(s["metric"].get(inner.group(2), "") for s in
                               api.query(f"count by ({inner.group(2)}) ({expr})"))
                values[name] = found[0] if found else ""
    return values


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="python -m dashboards.render",
                                description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True, metavar="URL",
                        help="base URL of a Prometheus, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", required=True, type=Path, help="dashboard JSON file")
    parser.add_argument("--out", type=Path, help="directory for one PNG per panel")
    parser.add_argument("--sheet", type=Path, help="one PNG of the whole dashboard")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                        help="a dashboard variable's value (default: as Grafana would pick)")
    parser.add_argument("--range", type=duration_seconds, default=3600.0, metavar="DURATION",
                        help="time range ending now (default 1h)")
    parser.add_argument("--end", type=float, help="end of the range, Unix seconds (default now)")
    parser.add_argument("--scrape-interval", type=duration_seconds, default=15.0,
                        metavar="DURATION", help="the targets' scrape interval (default 15s)")
    args = parser.parse_args(argv)
    if not args.out and not args.sheet:
        parser.error("nothing to do: give --out and/or --sheet")
    given = {}
    for item in args.var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--var {item!r} is not NAME=VALUE")
        given[name] = value
    try:
        dashboard = json.loads(args.dashboard.read_text())
    except (OSError, ValueError) as exc:
        print(f"render: cannot read {args.dashboard}: {exc}", file=sys.stderr)
        return 2
    end = args.end or time.time()
    step = max(args.scrape_interval, args.range / 240)
    # Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval)
    given.setdefault("__rate_interval",
                     prom_duration(max(step + args.scrape_interval, 4 * args.scrape_interval)))
    given.setdefault("__interval", prom_duration(step))
    api = PrometheusAPI(args.prometheus)
    try:
        variables = default_variables(dashboard, api, given)
    except (OSError, PromQLError) as exc:
        print(f"render: cannot query {args.prometheus}: {exc}", file=sys.stderr)
        return 2
    ctx = Context(api, variables, end - args.range, end, step)
    try:
        written = render_panels(dashboard, ctx, args.out) if args.out else []
        if args.sheet:
            written.append(render_sheet(dashboard, ctx, args.sheet))
    except OSError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 2
    for error in dict.fromkeys(ctx.errors):
        print(f"render: query failed: {error}", file=sys.stderr)
    print(f"render: wrote {len(written)} images")
    return 1 if ctx.errors else 0


if __name__ == "__main__":
    sys.exit(main())
