"""The measurements behind BENCHMARKS.md, one function per figure. Each
returns plain data (dicts, lists, numbers) that bench/report.py renders."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections import Counter
from dataclasses import dataclass

from tests.kernel.exporter import Exporter, Scrape, prog_ids_of
from tracer import metrics as m
from tracer.probe import Probe
from tracer.program import RAW_TRACEPOINT, TRACEPOINT, choose_attachment, without_close_reasons
from tracer.states import code_of

from . import ftrace, measure, programs
from .memory import BEFORE_COMMITS
from .configs import QUICK_RATE_CONFIGS, RATE_CONFIGS, NodeExporter, Scraper, Serve, Tcpstates
from .lab import CHURN_PORT, DENSE, REQUEST_RESPONSE, SERVICE_PORTS, SINGLE, Lab, Workload

# Connections per second that make ~200k transitions/s (six per connection).
RATE_200K = 200_000 / 6
RATE_2 = 2 / 6
ALL_FEATURES = "+ 10 service ports (all features)"


@dataclass
class Settings:
    rounds: int = 8              # A/B rounds per configuration (figure 1b, 7)
    churn_seconds: float = 1.5   # one workload run (two workloads per slot: ~10 min in all)
    # figures 1b and 7: every round runs each of these in every A and B slot
    workloads: tuple[Workload, ...] = (REQUEST_RESPONSE, DENSE)
    cost_rounds: int = 3         # figure 1
    cost_beside_peer: bool = True  # figure 1: also all at once with tcpstates
    cpu_seconds: float = 31      # figure 2, per rate: scrapes at 15 and 30 s
    scrape_interval: float = 15  # figure 2
    scrapes: int = 200           # figure 3
    held: tuple[int, ...] = (5_000, 50_000)  # figure 4: connections (2 sockets each)
    gauge_scrapes: int = 20      # figure 4
    first_count_repeats: int = 3  # figure 6
    stop_repeats: int = 3        # figure 8, per signal
    hostile_attempts: int = 40   # figure 9: the correct scraper's attempts, 0.5 s apart
    hostile_warmup: float = 5    # figure 9: seconds of flood before the first attempt
    exact_connections: int = 200_000
    skip_connections: int = 40_000  # skips figure: per round
    skip_rounds: int = 3         # skips figure: pairs of rounds (without, with scrapes) per path
    memory_rounds: int = 5       # memory figure: starts of each code (lean, befores)
    memory_scrapes: int = 1000   # memory figure: scrapes of each code, and of node_exporter
    memory_before: tuple[str, ...] = BEFORE_COMMITS  # memory figure: code before the lean daemon
    rate_configs: tuple = RATE_CONFIGS

    @classmethod
    def quick(cls) -> "Settings":
        return cls(rounds=1, churn_seconds=1, cost_rounds=1, cost_beside_peer=False,
                   cpu_seconds=4,
                   scrape_interval=2, scrapes=40, held=(5_000,), gauge_scrapes=5,
                   first_count_repeats=1, stop_repeats=1, exact_connections=20_000,
                   hostile_attempts=10, hostile_warmup=3,
                   skip_connections=10_000, skip_rounds=1, memory_rounds=1,
                   memory_scrapes=200,
                   rate_configs=QUICK_RATE_CONFIGS)


def _ns_per_event(before: dict, after: dict) -> tuple[float, int]:
    runs = after["run_cnt"] - before["run_cnt"]
    return (after["run_time_ns"] - before["run_time_ns"]) / max(runs, 1), runs


EMPTY = "empty program"
COUNTERS_ONLY = "counters only"
SOCKET_TABLE = "+ socket table"
SERVE_DEFAULT = "+ histograms (serve's default)"
NO_TUPLE_HASH = "serve's default less the 4-tuple hash"
# Built per attach path: the feature-cost steps on serve's default path (raw),
# serve's default program on the classic one.
VARIANTS = {
    RAW_TRACEPOINT: {
        COUNTERS_ONLY: lambda path: programs.counters_only(attach=path),
        SOCKET_TABLE: lambda path: programs.socket_table_without_histograms(attach=path),
        NO_TUPLE_HASH: lambda path: programs.serve_without_tuple_hash(attach=path),
        SERVE_DEFAULT: lambda path: Probe(attach=path, seed_live_sockets=False),
        ALL_FEATURES: lambda path: Probe(attach=path, service_ports=SERVICE_PORTS,
                                         seed_live_sockets=False),
    },
    TRACEPOINT: {
        SERVE_DEFAULT: lambda path: Probe(attach=path, seed_live_sockets=False),
    },
}


def kernel_cost(lab: Lab, settings: Settings) -> dict:
    """Figure 1, per attach path (raw tracepoint, classic tracepoint):
    run_time_ns / run_cnt of our program, attached one variant at a time
    beside an empty program of the same attach type (the floor), timed on
    the same events; and, with statistics off as users run it, the
    workload's CPU per event with each program attached alone against the
    untraced runs just before and after it (A B A B ... A): the raw
    program's run time includes its reads of the socket's fields, the
    classic one's excludes the kernel's copy of the tracepoint's record,
    which the workload's CPU includes on both paths. Then ("same run",
    full runs only): every program, two empty programs per path (first and
    last: the kernel runs a hook's programs in attach order) and bcc's
    tcpstates attached at once."""
    with contextlib.ExitStack() as stack:
        empties = {path: stack.enter_context(programs.EmptyProgram(path, attached=False))
                   for path in programs.PATHS}
        built = {(path, name): stack.enter_context(contextlib.closing(build(path)))
                 for path, variants in VARIANTS.items() for name, build in variants.items()}
        for program in built.values():
            program.detach()
        entries = [(path, EMPTY, empties[path]) for path in programs.PATHS]
        entries += [(path, name, program) for (path, name), program in built.items()]
        ns_rounds, cpu_rounds = [], []
        for _ in range(settings.cost_rounds):
            with measure.bpf_stats_enabled(False):
                cpu_rounds.append(_workload_cpu_round(lab, settings, entries))
            with measure.bpf_stats_enabled():
                ns_rounds.append(_beside_empty_round(lab, settings, built, empties))
        paths = {}
        for path in programs.PATHS:
            rows = {}
            for name in (EMPTY, *VARIANTS[path]):
                effect = [r[(path, name)] for r in cpu_rounds]
                row = {"extra_cpu_ns_per_event": [e["extra_cpu_ns_per_event"] for e in effect],
                       "rate_ratio": [e["rate_ratio"] for e in effect]}
                if name != EMPTY:
                    timed = [r[(path, name)] for r in ns_rounds]
                    row.update(ns=[t["ns"] for t in timed], empty_ns=[t["empty_ns"] for t in timed],
                               ratio=[t["ns"] / t["empty_ns"] for t in timed],
                               events=[t["events"] for t in timed])
                rows[name] = {**row, **{f"median_{key}": measure.median(values)
                                        for key, values in row.items()}}
            paths[path] = rows
        result = {"paths": paths, "same_run": {}, "events_per_round": []}
        if settings.cost_beside_peer:
            result.update(_same_run(lab, settings, stack, built, empties))
    return result


def _workload_cpu_round(lab: Lab, settings: Settings, entries: list) -> dict:
    """Each program attached alone between untraced runs: the workload's
    CPU per event beyond the untraced runs around it, and its rate ratio."""
    effects = {}
    before = lab.churn(settings.churn_seconds)
    for path, name, program in entries:
        program.attach()
        try:
            traced = lab.churn(settings.churn_seconds)
        finally:
            program.detach()
        after = lab.churn(settings.churn_seconds)
        untraced = (_cpu_per_event(before) + _cpu_per_event(after)) / 2
        effects[(path, name)] = {
            "extra_cpu_ns_per_event": 1e9 * (_cpu_per_event(traced) - untraced),
            "rate_ratio": traced["rate"] / ((before["rate"] + after["rate"]) / 2)}
        before = after
    return effects


def _beside_empty_round(lab: Lab, settings: Settings, built: dict, empties: dict) -> dict:
    """Each program attached with the empty program of its attach type
    (attached first), both timed on the same events."""
    timed = {}
    for (path, name), program in built.items():
        empty = empties[path]
        empty.attach()
        program.attach()
        try:
            measured = _cost_round(lab, settings, {"program": program.prog_stats,
                                                   "empty": empty.prog_stats})
        finally:
            program.detach()
            empty.detach()
        timed[(path, name)] = {"ns": measured["ns"]["program"],
                               "empty_ns": measured["ns"]["empty"],
                               "events": measured["events"]["program"]}
    return timed


def _same_run(lab: Lab, settings: Settings, stack: contextlib.ExitStack, built: dict,
              empties: dict) -> dict:
    readers = {}
    for path in programs.PATHS:
        empties[path].attach()
        readers[f"{path}: {EMPTY} (first)"] = empties[path].prog_stats
        for (program_path, name), program in built.items():
            if program_path == path:
                program.attach()
                readers[f"{path}: {name}"] = program.prog_stats
        last = stack.enter_context(programs.EmptyProgram(path))
        readers[f"{path}: {EMPTY} (last)"] = last.prog_stats
    peer = stack.enter_context(Tcpstates())
    (peer_prog,) = measure.programs_of(peer.pid)
    readers["bcc tcpstates (classic tracepoint)"] = \
        lambda: measure.programs_of(peer.pid)[peer_prog]
    with measure.bpf_stats_enabled():
        same_run = [_cost_round(lab, settings, readers) for _ in range(settings.cost_rounds)]
    return {
        "same_run": {name: {"median_ns": measure.median([r["ns"][name] for r in same_run]),
                            "ns": [r["ns"][name] for r in same_run]} for name in readers},
        "events_per_round": [r["events"][f"{RAW_TRACEPOINT}: {SERVE_DEFAULT}"]
                             for r in same_run],
    }


def _cpu_per_event(churn: dict) -> float:
    return churn["cpu_seconds"] / max(churn["transitions"], 1)


def _cost_round(lab: Lab, settings: Settings, readers: dict) -> dict:
    before = {name: read() for name, read in readers.items()}
    churn = lab.churn(settings.churn_seconds)
    after = {name: read() for name, read in readers.items()}
    costs = {name: _ns_per_event(before[name], after[name]) for name in readers}
    return {"ns": {name: ns for name, (ns, _) in costs.items()},
            "events": {name: runs for name, (_, runs) in costs.items()}, "churn": churn}


REASONS_ON = "serve's default, close reasons on"
REASONS_OFF = "serve's default, close reasons off"
REASONS_OFF_LAZY = "close reasons off, port read put off"
# The program without reasons, with the one change reasons bring to the other
# closes (bpf/serve.bpf.c, LAZY_CLOSE_SPORT): what reasons cost on their own.
LAZY_CFLAGS = ("-DLAZY_CLOSE_SPORT",)


def close_reasons_cost(lab: Lab, settings: Settings) -> dict:
    """Figure 1c: what close reasons cost serve's program (raw tracepoint):
    its ns/event with them over the same program's without them (as it was
    before reasons), and over the program without them but with the port
    read put off as reasons put it off. All attached at once, timed on the
    same events; the kernel runs a hook's programs in attach order, and the
    first pays for the cache misses, so every order is run and the ratio
    is of the means. Check: the closes counted by reason are the transitions
    into CLOSE the program without reasons counted."""
    on = choose_attachment(RAW_TRACEPOINT)
    if not on.close_reasons:
        return {"skipped": "no close reasons on this kernel (BTF)"}
    off = without_close_reasons(on)
    with contextlib.ExitStack() as stack:
        built = {name: stack.enter_context(contextlib.closing(
                     Probe(attachment=attachment, seed_live_sockets=False, extra_cflags=flags)))
                 for name, attachment, flags in ((REASONS_ON, on, ()), (REASONS_OFF, off, ()),
                                                 (REASONS_OFF_LAZY, off, LAZY_CFLAGS))}
        for program in built.values():
            program.detach()
        rounds = []
        with measure.bpf_stats_enabled():
            for _ in range(settings.cost_rounds):
                for order in itertools.permutations(built):
                    for name in order:
                        built[name].attach()
                    try:
                        measured = _cost_round(lab, settings,
                                               {name: built[name].prog_stats for name in order})
                    finally:
                        for name in order:
                            built[name].detach()
                    rounds.append({"order": list(order), "ns": measured["ns"],
                                   "events": measured["events"][REASONS_ON]})
        closes = int(built[REASONS_ON].read().closes.sum())
        into_close = int(built[REASONS_OFF].read().transitions[..., code_of("close")].sum())
    mean = {name: sum(r["ns"][name] for r in rounds) / len(rounds) for name in built}
    return {"rounds": rounds, "mean_ns": mean,
            "ratio": mean[REASONS_ON] / mean[REASONS_OFF],
            "ratio_to_lazy": mean[REASONS_ON] / mean[REASONS_OFF_LAZY],
            "closes_counted": closes, "transitions_into_close": into_close,
            # all attached over the same churns; other tests' events between
            # two attaches may differ by a few
            "ok": abs(closes - into_close) <= max(10, into_close // 1000)}


def rate_ratios(lab: Lab, settings: Settings) -> dict:
    """Figures 1b and 7: the workload's connection rate under each
    configuration, between two untraced runs (A B A B ... A): a round's
    ratio is B over the mean of the A just before and just after it, which
    cancels a slow drift of the machine's load. Each workload (dense
    connect/reset, request/response) runs in every A and B slot, so both
    are measured in the same rounds under the same configurations."""
    workloads = settings.workloads
    results: dict[str, dict[str, list[dict]]] = {w.name: {} for w in workloads}
    for round_number in range(settings.rounds):
        baseline = {w.name: lab.churn(settings.churn_seconds, workload=w) for w in workloads}
        for make in settings.rate_configs:
            foreign = len(measure.tracepoint_programs())
            runs = {}
            with contextlib.ExitStack() as stack:
                shared = None
                for workload in workloads:
                    if shared is None or not shared.shared:
                        stack.close()
                        shared = stack.enter_context(make())
                    config = shared
                    config.mark()
                    churn = lab.churn(settings.churn_seconds, workload=workload)
                    rss = measure.rss_bytes(config.pid) if config.pid else None
                    runs[workload.name] = (churn, rss, config.verify(churn), config.name)
            following = {w.name: lab.churn(settings.churn_seconds, workload=w)
                         for w in workloads}
            for name, (churn, rss, verified, config_name) in runs.items():
                before, after = baseline[name], following[name]
                untraced = (before["rate"] + after["rate"]) / 2
                untraced_cpu = (_cpu_per_connection(before) + _cpu_per_connection(after)) / 2
                results[name].setdefault(config_name, []).append({
                    "round": round_number,
                    "baseline_rate": untraced, "rate": churn["rate"],
                    "ratio": churn["rate"] / untraced,
                    "cpu_us_per_connection": 1e6 * _cpu_per_connection(churn),
                    "baseline_cpu_us_per_connection": 1e6 * untraced_cpu,
                    "cpu_ratio": untraced_cpu / _cpu_per_connection(churn),
                    "transitions_per_s": churn["transitions"] / churn["seconds"],
                    "baseline_transitions_per_s": before["transitions"] / before["seconds"],
                    "other_programs_on_tracepoint": foreign,
                    "baseline_failed": before["failed"] + after["failed"],
                    "rss_bytes": rss, "verify": verified,
                })
            baseline = following
    return {"workloads": {w.name: {"describe": w.describe(), "args": w.args(),
                                   **_rate_summary(results[w.name])} for w in workloads}}


def _rate_summary(results: dict[str, list[dict]]) -> dict:
    summary = {name: {"median_ratio": measure.median([r["ratio"] for r in rows]),
                      "ratios": [r["ratio"] for r in rows],
                      "median_cpu_ratio": measure.median([r["cpu_ratio"] for r in rows]),
                      "median_cpu_us": measure.median([r["cpu_us_per_connection"] for r in rows]),
                      "median_rate": measure.median([r["rate"] for r in rows]),
                      "median_baseline_rate": measure.median([r["baseline_rate"] for r in rows]),
                      "all_verified": all(r["verify"]["ok"] is not False for r in rows)}
               for name, rows in results.items()}
    peer = results.get(Tcpstates.name)
    if peer:
        for name, rows in results.items():
            summary[name]["median_ratio_to_tcpstates"] = measure.median(
                [r["ratio"] / p["ratio"] for r, p in zip(rows, peer)])
    return {"summary": summary, "rounds": results}


def _cpu_per_connection(churn: dict) -> float:
    return churn["cpu_seconds"] / max(churn["connections"], 1)


def serve_cpu(lab: Lab, settings: Settings) -> dict:
    """Figure 2: CPU time of the `tcpstate serve` process while the
    workload runs at ~2 and ~200k transitions/s, scraped at an interval."""
    results = {}
    with Serve(SERVICE_PORTS) as serve:
        for label, rate in (("2/s", RATE_2), ("200k/s", RATE_200K)):
            serve.mark()
            background = lab.churn_in_background(rate, seconds=settings.cpu_seconds)
            started, cpu_before = time.monotonic(), measure.cpu_seconds(serve.pid)
            scrapes = 0
            while time.monotonic() - started + settings.scrape_interval <= settings.cpu_seconds:
                time.sleep(settings.scrape_interval)
                serve.exporter.scrape()
                scrapes += 1
            out, _ = background.communicate()
            wall = time.monotonic() - started
            cpu = measure.cpu_seconds(serve.pid) - cpu_before
            churn = _last_json(out)
            results[label] = {"cpu_seconds": cpu, "wall_seconds": wall,
                              "percent_of_a_core": 100 * cpu / wall, "scrapes": scrapes,
                              "transitions_per_s": churn["transitions"] / churn["seconds"],
                              "verify": serve.verify(churn)}
    return results


def _last_json(text: str) -> dict:
    import json

    return json.loads(text.strip().splitlines()[-1])


def scrape_latency(lab: Lab, settings: Settings) -> dict:
    """Figure 3: latency of GET /metrics with ten service ports labelled,
    with no workload and while it churns at ~200k transitions/s; and the
    series count."""
    results = {}
    with Serve(SERVICE_PORTS) as serve:
        lab.churn(connections=1000)  # the workload's series exist after this
        scraper = Scraper(serve.exporter.port)
        try:
            for label, rate in (("no workload", None), ("~200k transitions/s", RATE_200K)):
                background = lab.churn_in_background(rate) if rate else None
                try:
                    times, body = [], ""
                    for _ in range(settings.scrapes):
                        elapsed, body = scraper.get()
                        times.append(elapsed)
                finally:
                    if background:
                        background.terminate()
                        background.communicate()
                results[label] = {
                    "scrapes": len(times), "p50_ms": 1000 * measure.percentile(times, 0.5),
                    "p99_ms": 1000 * measure.percentile(times, 0.99),
                    "max_ms": 1000 * max(times),
                    "collector_ms": _collector_ms(body)}
        finally:
            scraper.close()
        lines = [line for line in body.splitlines() if line and not line.startswith("#")]
        return {"by_workload": results, "series": len(lines),
                "tcpstate_series": sum(1 for line in lines if line.startswith(m.PREFIX + "_")),
                "rss_bytes": measure.rss_bytes(serve.pid)}


def _collector_ms(body: str) -> dict[str, float]:
    """tcpstate's own timing of its collector parts, from one scrape."""
    scrape = Scrape.parse(body)
    return {labels["collector"]: 1000 * scrape.value(m.SCRAPE_DURATION, **labels)
            for labels in scrape.series(m.SCRAPE_DURATION)}


def gauge_scaling(lab: Lab, settings: Settings) -> dict:
    """Figure 4 (and the evictions of figure 1): scrape time of tcpstate's
    per-state gauge and of node_exporter's tcpstat collector with many idle
    connections open, same run; both gauges checked against the truth."""
    results = {}
    with Serve(SERVICE_PORTS) as serve, NodeExporter(lab) as node:
        ours = Scraper(serve.exporter.port)
        prog_id = next(iter(measure.programs_of(serve.pid)))
        try:
            for held in (0, *settings.held):
                serve.mark()
                holding = lab.holding(held) if held else contextlib.nullcontext(
                    {"ports": [], "open_seconds": 0.0})
                with holding as opened:
                    time.sleep(0.5)
                    scrape = serve.exporter.scrape()
                    counted = sum(scrape.total(m.SOCKETS, state="established",
                                               **{m.PORT_LABEL: str(port)})
                                  for port in opened["ports"])
                    node_body = node.scraper.get()[1]
                    node_counted = Scrape.parse(node_body).value(
                        "node_tcp_connection_states", state="established")
                    after = serve.counted(scrape)
                    times = {"tcpstate": [], "node_exporter": []}
                    for _ in range(settings.gauge_scrapes):
                        times["tcpstate"].append(ours.get()[0])
                        times["node_exporter"].append(node.scraper.get()[0])
                    results[held] = {
                        "sockets": 2 * held, "open_seconds": opened["open_seconds"],
                        "tcpstate_ms": 1000 * measure.median(times["tcpstate"]),
                        "node_exporter_ms": 1000 * measure.median(times["node_exporter"]),
                        "tcpstate_established": counted,
                        "node_exporter_established": node_counted,
                        "evictions": int(after["evictions"] - serve.before["evictions"]),
                        "table_entries": scrape.total(m.SOCKET_TABLE_ENTRIES),
                        "table_capacity": scrape.total(m.SOCKET_TABLE_CAPACITY),
                        "serve_rss_bytes": measure.rss_bytes(serve.pid),
                    }
            maps = measure.map_memory(prog_id)
        finally:
            ours.close()
    return {"by_connections": results, "bpf_maps_bytes": maps,
            "bpf_maps_total_bytes": sum(maps.values())}


def first_count(lab: Lab, settings: Settings) -> dict:
    """Figure 6: seconds from starting `tcpstate serve` to the first scrape
    that counts the workload's transitions (the workload runs meanwhile)."""
    background = lab.churn_in_background(rate=200)
    seconds = []
    try:
        for _ in range(settings.first_count_repeats):
            started = time.monotonic()
            with Exporter(service_ports=SERVICE_PORTS) as exporter:
                while exporter.scrape().total(m.TRANSITIONS, **{m.PORT_LABEL: str(CHURN_PORT)}) == 0:
                    time.sleep(0.02)
                seconds.append(time.monotonic() - started)
    finally:
        background.terminate()
        background.communicate()
    return {"seconds": seconds, "median_seconds": measure.median(seconds)}


def stop_time(lab: Lab, settings: Settings) -> dict:
    """Figure 8: seconds from SIGTERM or SIGINT to the exit of a `tcpstate
    serve` that is counting a flat-out churn, its exit code, and whether its
    program is gone from the kernel after it."""
    runs = []
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            lab.churn(seconds=2, workload=REQUEST_RESPONSE)

    worker = threading.Thread(target=churn, daemon=True)
    worker.start()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT) * settings.stop_repeats:
            with Exporter(service_ports=SERVICE_PORTS) as exporter:
                while exporter.scrape().total(m.TRANSITIONS,
                                              **{m.PORT_LABEL: str(CHURN_PORT)}) == 0:
                    time.sleep(0.02)
                ours = prog_ids_of(exporter.process.pid)
                sent = time.monotonic()
                exporter.process.send_signal(sig)
                try:
                    code = exporter.process.wait(10)
                except subprocess.TimeoutExpired:
                    code = None
                took = time.monotonic() - sent
                left = [i for i in ours if subprocess.run(
                    ["bpftool", "prog", "show", "id", str(i)], capture_output=True).returncode == 0]
            runs.append({"signal": signal.Signals(sig).name, "seconds": took, "exit_code": code,
                         "programs_left": len(left)})
    finally:
        stop.set()
        worker.join()
    return {"runs": runs, "max_seconds": max(run["seconds"] for run in runs),
            "ok": all(run["exit_code"] == 0 and not run["programs_left"] for run in runs)}


def exact_count(lab: Lab, settings: Settings) -> dict:
    """The foundation's check: after a churn of N connections every
    transition is counted exactly, transition by transition."""
    n = settings.exact_connections
    port = {m.PORT_LABEL: str(CHURN_PORT)}

    def by_transition(scrape: Scrape) -> Counter:
        found = Counter()
        for labels in scrape.series(m.TRANSITIONS):
            if labels.get(m.PORT_LABEL) == str(CHURN_PORT):
                found[(labels["old_state"], labels["new_state"])] += scrape.value(
                    m.TRANSITIONS, **labels)
        return found

    with Serve(SERVICE_PORTS) as serve:
        before_scrape = serve.exporter.scrape()
        before = by_transition(before_scrape)
        durations_before = before_scrape.value(
            m.STATE_DURATION + "_count", family="ipv4", old_state="established",
            new_state="close", **port)
        serve.mark()
        churn = lab.churn(connections=n)
        after_scrape = serve.exporter.scrape()
        verified = serve.verify(churn)
    made, listeners = churn["connections"], churn["listeners"]
    expected = Counter({("close", "syn_sent"): made, ("syn_sent", "established"): made,
                        ("established", "close"): 2 * made, ("listen", "syn_recv"): made,
                        ("syn_recv", "established"): made, ("close", "listen"): listeners,
                        ("listen", "close"): listeners})
    counted = by_transition(after_scrape) - before
    counted = Counter({key: int(value) for key, value in counted.items() if value})
    durations = after_scrape.value(
        m.STATE_DURATION + "_count", family="ipv4", old_state="established",
        new_state="close", **port) - durations_before
    return {"connections": made, "seconds": churn["seconds"], "failed": churn["failed"],
            "expected": {f"{a}->{b}": v for (a, b), v in expected.items()},
            "counted": {f"{a}->{b}": v for (a, b), v in counted.items()},
            "exact": counted == expected, "missed": verified["missed"],
            "established_close_durations_observed": int(durations),
            "ok": counted == expected and verified["ok"]}


HOSTILE_KEEPALIVE, HOSTILE_WRONG_PASSWORD, HOSTILE_SLOW = 130, 140, 500
HONEST_SOURCE = "127.0.0.2"


def hostile_neighbour(lab: Lab, settings: Settings) -> dict:
    """Figure 9 (issue 15): the correct scraper, on its own source address,
    beside 130 keep-alive scrapers, 140 wrong-password clients and 500 slow
    readers on 127.0.0.1 (bench/hostile.py, a process of its own), against
    an exporter with basic auth (bcrypt cost 10) and ten service ports.
    Each attempt is one GET, and one retry after a 503; then SIGTERM while
    the flood goes on."""
    import base64

    import bcrypt

    user, password = "prometheus", "scrape-secret"
    directory = Path(tempfile.mkdtemp(prefix="tcpstate-bench-"))
    config = directory / "web.yml"
    config.write_text(f"basic_auth_users:\n  {user}: "
                      f"'{bcrypt.hashpw(password.encode(), bcrypt.gensalt(10)).decode()}'\n")
    auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    exporter = Exporter("--web.config.file", str(config), service_ports=SERVICE_PORTS,
                        headers=auth).start()
    neighbour = subprocess.Popen(
        [sys.executable, "-m", "bench.hostile", str(exporter.port), user, password,
         str(settings.hostile_warmup + 2 * settings.hostile_attempts * 10 + 30),
         str(HOSTILE_KEEPALIVE), str(HOSTILE_WRONG_PASSWORD), str(HOSTILE_SLOW)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    attempts, stop = [], {}
    connection = None
    try:
        time.sleep(settings.hostile_warmup)
        for _ in range(settings.hostile_attempts):
            started = time.perf_counter()
            statuses = []
            for _try in range(2):  # one retry, after a 503 only
                try:
                    if connection is None:
                        connection = http.client.HTTPConnection(
                            "127.0.0.1", exporter.port, timeout=10,
                            source_address=(HONEST_SOURCE, 0))
                    connection.request("GET", "/metrics", headers=auth)
                    response = connection.getresponse()
                    response.read()
                    statuses.append(response.status)
                except (OSError, http.client.HTTPException) as exc:
                    statuses.append(exc.__class__.__name__)
                    connection.close()
                    connection = None
                if statuses[-1] != 503:
                    break
            attempts.append({"statuses": statuses, "served": statuses[-1] == 200,
                             "seconds": time.perf_counter() - started})
            time.sleep(0.5)
        sent = time.monotonic()
        exporter.process.send_signal(signal.SIGTERM)
        try:
            stop = {"exit_code": exporter.process.wait(30)}
        except subprocess.TimeoutExpired:
            stop = {"exit_code": None}
        stop["seconds"] = time.monotonic() - sent
    finally:
        if connection is not None:
            connection.close()
        neighbour.send_signal(signal.SIGTERM)
        try:
            out, _ = neighbour.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            neighbour.kill()
            out, _ = neighbour.communicate()
        exporter.stop()
    times = [a["seconds"] for a in attempts]
    served = [a for a in attempts if a["served"]]
    return {"attempts": len(attempts), "served": len(served),
            "retried": sum(len(a["statuses"]) > 1 for a in attempts),
            "failures": [a["statuses"] for a in attempts if not a["served"]],
            "median_ms": 1000 * measure.median(times), "p99_ms": 1000 * measure.percentile(times, 0.99),
            "max_ms": 1000 * max(times),
            "neighbour_answered": json.loads(out.strip().splitlines()[-1]) if out.strip() else {},
            "stop": stop, "log_tail": exporter.log().splitlines()[-3:]}
# The skips figure: the steered softirq and `tcpstate serve` share CPU 0, as
# a NIC's interrupts and the exporter share a CPU on a host; the churn runs
# on CPU 1.
STEERED_CPU, WORKLOAD_CPU = 0, 1


def skips_under_scrapes(lab: Lab, settings: Settings) -> dict:
    """Skips under scrapes: a fresh namespace whose loopback receive
    softirq RPS steers to CPU 0, `tcpstate serve --attach PATH` pinned to
    CPU 0, a churn of one client and one server thread pinned to CPU 1;
    rounds without and with a loop of scrapes against serve, alternately, on
    each attach path. Per round: the namespace's PassiveOpens against the
    births (listen -> syn_recv) serve counted on the churn's port,
    tcpstate_bpf_missed_events_total's delta (host-wide), and the births an
    ftrace instance saw over a thread of PID 1 (hidden from every BPF program
    by this kernel, counted nowhere: bench/ftrace.py)."""
    results = {}
    with Lab(name="rps", rps_cpus=format(1 << STEERED_CPU, "x")) as steered, \
            ftrace.BirthEvents(CHURN_PORT) as births:
        for path in programs.PATHS:
            exporter = Exporter("--attach", path, service_ports=(CHURN_PORT,))
            exporter.command = ["taskset", "-c", str(STEERED_CPU), *exporter.command]
            rounds = []
            with exporter:
                for _ in range(settings.skip_rounds):
                    for scraping in (False, True):
                        rounds.append(_skips_round(steered, exporter, births, scraping,
                                                   settings.skip_connections))
            results[path] = {"rounds": rounds,
                             "without": _skips_totals([r for r in rounds if not r["scraping"]]),
                             "with": _skips_totals([r for r in rounds if r["scraping"]])}
    for result in results.values():
        result["ok"] = (result["with"]["missed"] <= result["without"]["missed"]
                        and result["with"]["skipped"] <= result["without"]["skipped"]
                        and all(r["accounted"] for r in result["rounds"]))
    return {"connections": settings.skip_connections, "paths": results,
            "steered_cpu": STEERED_CPU, "workload_cpu": WORKLOAD_CPU}


def _skips_round(steered: Lab, exporter: Exporter, births: "ftrace.BirthEvents",
                 scraping: bool, connections: int) -> dict:
    port = {m.PORT_LABEL: str(CHURN_PORT)}

    def counted(scrape: Scrape) -> tuple[float, float]:
        return (scrape.total(m.TRANSITIONS, old_state="listen", new_state="syn_recv", **port),
                scrape.total(m.MISSED_EVENTS))

    before, kernel_before = counted(exporter.scrape()), steered.tcp_mib()["PassiveOpens"]
    births.clear()
    pid1 = ftrace.pid1_threads()
    stop, scrapes = threading.Event(), []

    def scrape_loop() -> None:
        scraper = Scraper(exporter.port)
        try:
            while not stop.is_set():
                scrapes.append(scraper.get()[0])
        finally:
            scraper.close()

    loop = threading.Thread(target=scrape_loop, daemon=True)
    if scraping:
        loop.start()
    try:
        churn = steered.churn(connections=connections, workload=SINGLE, cpu=WORKLOAD_CPU)
    finally:
        stop.set()
        if scraping:
            loop.join()
    pid1 |= ftrace.pid1_threads()
    seen = births.take(pid1)
    after, kernel_after = counted(exporter.scrape()), steered.tcp_mib()["PassiveOpens"]
    kernel = kernel_after - kernel_before
    births_counted, missed = int(after[0] - before[0]), int(after[1] - before[1])
    return {"scraping": scraping, "scrapes": len(scrapes),
            "scrapes_per_s": len(scrapes) / churn["seconds"],
            "connections": churn["connections"], "failed": churn["failed"],
            "seconds": churn["seconds"], "passive_opens": kernel, "counted": births_counted,
            "missed": missed, "ftrace": seen.recorded, "ftrace_overrun": seen.overrun,
            "hidden_by_kernel": seen.over_pid1,
            # the churn's births the kernel skipped the program for; `missed`
            # is host-wide, so it counts these and any other socket's
            "skipped": kernel - births_counted - seen.over_pid1,
            "accounted": (not seen.overrun and seen.recorded == kernel
                          and 0 <= kernel - births_counted - seen.over_pid1 <= missed)}


def _skips_totals(rounds: list[dict]) -> dict:
    keys = ("connections", "passive_opens", "counted", "missed", "hidden_by_kernel",
            "skipped", "scrapes")
    totals = {key: sum(r[key] for r in rounds) for key in keys}
    totals["seconds"] = sum(r["seconds"] for r in rounds)
    return totals
