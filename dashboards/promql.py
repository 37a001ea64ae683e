"""PromQL helpers shared by the generator, the renderer and the tests:
label selectors, the metric names an expression reads, Grafana variable
substitution, and the queries of a dashboard's JSON.
"""

from __future__ import annotations

import re
from typing import Iterator, Mapping

from tracer import metrics as m
from tracer.states import TIME_WAIT_HANDOFFS


def selector(metric: str, **labels: str) -> str:
    """`metric{a="x", b=~"y"}`: a value starting with `~` or `!` is a regex
    or negated matcher (`~y` -> `=~"y"`, `!y` -> `!="y"`, `!~y` -> `!~"y"`)."""
    matchers = []
    for name, value in labels.items():
        op = "="
        for prefix in ("!~", "~", "!"):
            if value.startswith(prefix):
                op = {"~": "=~", "!": "!=", "!~": "!~"}[prefix]
                value = value[len(prefix):]
                break
        matchers.append(f'{name}{op}"{value}"')
    return f"{metric}{{{', '.join(matchers)}}}" if matchers else metric


def transition(old_state: str, new_state: str | None = None, **labels: str) -> dict[str, str]:
    """Label matchers of one transition (or of every exit of old_state)."""
    matchers = {"old_state": old_state, **labels}
    if new_state is not None:
        matchers["new_state"] = new_state
    return matchers


def time_wait_handoffs(**labels: str) -> dict[str, str]:
    """Matchers of the transitions that hand a socket to a TIME-WAIT mini-socket."""
    olds = "|".join(old for old, _ in TIME_WAIT_HANDOFFS)
    (new,) = {new for _, new in TIME_WAIT_HANDOFFS}
    return {"old_state": f"~{olds}", "new_state": new, **labels}


# ---- metric names an expression reads -----------------------------------
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "and", "or", "unless", "offset", "inf", "nan"}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_VARIABLES = re.compile(r"\$\{[^}]*\}|\$\w+")
_NAMES = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(?![\w:]|\s*\()")
_NUMBERS = re.compile(r"\b\d[\w.]*")


def metric_names(expr: str) -> set[str]:
    """The metric (and recorded series) names `expr` selects.

    Not a full parser: it removes what cannot hold a metric name (strings,
    label matchers, label lists of by/on/..., ranges, variables, numbers,
    function calls) and keeps the identifiers left. Also reads the name of a
    `{__name__="..."}` selector.
    """
    names = set(re.findall(r'__name__\s*=\s*"([^"]+)"', expr))
    text = _VARIABLES.sub(" ", expr)
    text = _STRINGS.sub(" ", text)
    text = _LABEL_LISTS.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    names.update(n for n in _NAMES.findall(text) if n.lower() not in _KEYWORDS)
    return names


# Series Prometheus itself adds to each scrape, which dashboards may read.
PROMETHEUS_SERIES = frozenset({"up", "scrape_samples_scraped", "scrape_duration_seconds"})

_HISTOGRAMS = (m.STATE_DURATION, m.CONNECTION_DURATION)
_GAUGE_HISTOGRAMS = (m.SOCKET_STATE_AGE,)


def exported_names() -> set[str]:
    """Every sample name tcpstate serve exports, from tracer/metrics.py."""
    names = {value for key, value in vars(m).items()
             if key.isupper() and isinstance(value, str) and value.startswith(m.PREFIX + "_")}
    for histogram in _HISTOGRAMS:
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    for histogram in _GAUGE_HISTOGRAMS:
        names |= {f"{histogram}_bucket", f"{histogram}_gsum", f"{histogram}_gcount"}
    return names - {m.PREFIX + "_"}


# ---- Grafana variables and dashboard queries ------------------------------
def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace `$name` and `${name}` (longest names first, so that
    `$__rate_interval` is not read as `$__rate`)."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name])
        expr = re.sub(r"\$" + re.escape(name) + r"\b", lambda _: variables[name], expr)
    return expr


def panels(dashboard: Mapping) -> Iterator[Mapping]:
    """Every panel, including those nested in rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping) -> Iterator[tuple[Mapping, Mapping]]:
    """(panel, target) for each Prometheus query of each panel."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("expr"):
                yield panel, target


def variable_queries(dashboard: Mapping) -> Iterator[tuple[str, str]]:
    """(variable name, PromQL inside label_values()/query_result()) of query variables."""
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else query or ""
        inner = re.fullmatch(r"\s*(?:label_values|query_result)\((.*)\)\s*", text, re.S)
        if inner:
            # label_values(expr, label): the expression is all but the last argument
            body = inner.group(1)
            if text.lstrip().startswith("label_values") and "," in body:
                body = body.rsplit(",", 1)[0]
            yield variable["name"], body.strip()
