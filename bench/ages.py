"""Ages in state and `tcpstate sockets` at scale (issue 16's speed
targets), in figure 4's setup: idle connections held open in the lab's
namespace (two sockets each), one `tcpstate serve` with the service ports.

- What the age histogram adds to a scrape: the collector's own code
  (MappedTable.live_entries and age_histogram) timed on serve's real table, mapped
  in this process through the query socket, beside the scrape's total and
  its `bpf` part (which includes it). Target: <= 30 ms at 100,000 sockets.
- `tcpstate sockets` answer time, the whole command as a user runs it
  (interpreter start, table, /proc, owners, output). Target: < 1 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tracer import metrics as m
from tracer.query_socket import fetch_table
from tracer.socket_table import MappedTable, age_histogram

from prometheus_client.parser import text_string_to_metric_families

from . import measure
from .configs import TCPSTATE, Scraper, Serve
from .lab import SERVICE_PORTS, Lab

REPEATS = 20
ANSWERS = 5


def _collector_bpf_ms(body: str) -> float:
    for line in body.splitlines():
        if line.startswith(m.SCRAPE_DURATION) and 'collector="bpf"' in line:
            return 1000 * float(line.rsplit(" ", 1)[1])
    return float("nan")


def _unknown_established(body: str) -> float:
    return sum(sample.value for family in text_string_to_metric_families(body)
               if family.name == m.SOCKET_STATE_AGE_UNKNOWN
               for sample in family.samples if sample.labels.get("state") == "established")


def _age_histogram_ms(query: str, port_slots: int) -> tuple[float, int]:
    description, fd = fetch_table(query)
    table = MappedTable(fd, description["rows"], description["ways"])
    os.close(fd)
    try:
        times = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            age_histogram(table.live_entries(), time.monotonic_ns(), port_slots)
            times.append(time.perf_counter() - started)
        live = len(table.live_entries())
    finally:
        table.close()
    return 1000 * measure.median(times), live


def _answer(query: str, *args: str) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run([TCPSTATE, "sockets", "--query-socket", query, *args],
                            capture_output=True, text=True, timeout=120)
    took = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"tcpstate sockets failed: {result.stderr.strip()}")
    return took, result.stdout


def socket_ages(lab: Lab, settings) -> dict:
    results = {}
    with tempfile.TemporaryDirectory(prefix="tcpstate-ages-") as directory:
        query = str(Path(directory) / "serve.sock")
        with Serve(SERVICE_PORTS, args=("--query-socket", query)) as serve:
            scraper = Scraper(serve.exporter.port)
            try:
                for held in (0, max(settings.held)):
                    holding = lab.holding(held) if held else contextlib.nullcontext(
                        {"ports": [], "open_seconds": 0.0})
                    with holding as opened:
                        time.sleep(0.5)
                        scrapes, bpf_parts = [], []
                        for _ in range(REPEATS):
                            took, body = scraper.get()
                            scrapes.append(took)
                            bpf_parts.append(_collector_bpf_ms(body))
                        ages_ms, live = _age_histogram_ms(query, 1 + len(SERVICE_PORTS))
                        answers = [_answer(query, "--state", "established")[0]
                                   for _ in range(ANSWERS)]
                        runbook = [_answer(query, "--state", "close_wait", "--older-than", "9m")[0]
                                   for _ in range(ANSWERS)]
                        one_port = ([_answer(query, "--port", str(opened["ports"][0]))
                                     for _ in range(ANSWERS)] if opened["ports"] else [])
                        _, listed = _answer(query, "--state", "established", "--json")
                        rows = [json.loads(line) for line in listed.splitlines()]
                        held_ports = set(opened["ports"])
                        ours = [row for row in rows if row["local_port"] in held_ports
                                or row["remote_port"] in held_ports]
                        unknown = _unknown_established(scraper.get()[1])
                        results[held] = {
                            "sockets": 2 * held, "table_live_entries": live,
                            "scrape_ms": 1000 * measure.median(scrapes),
                            "collector_bpf_ms": measure.median(bpf_parts),
                            "age_histogram_ms": ages_ms,
                            "sockets_answer_s": measure.median(answers),
                            "sockets_answers_s": answers,
                            "runbook_answer_s": measure.median(runbook),
                            "one_port_answer_s": (measure.median([t for t, _ in one_port])
                                                  if one_port else None),
                            "one_port_listed": (len(one_port[0][1].splitlines()) - 1
                                                if one_port else 0),
                            "listed_established": len(rows),
                            "listed_held_with_owner": sum(1 for row in ours if row["pid"]),
                            # evicted from a full row: no age, not listed
                            "unknown_established": unknown,
                        }
            finally:
                scraper.close()
    return {"by_connections": results}


def render(data: dict, figures: dict, out, failures: list[str]) -> list[str]:
    lines = ["### Ages in state and `tcpstate sockets` (figure 4's setup)", "",
             "Idle connections held open in the lab namespace, `tcpstate serve "
             "--service-ports ...`. Age histogram: `age_histogram()` (the collector's code) "
             f"on serve's mapped table, median of {REPEATS}; scrape: whole /metrics GET, "
             f"median of {REPEATS}; `tcpstate sockets`: the whole command, median of "
             f"{ANSWERS}: all established (`--state established`), the runbook's query "
             "(`--state close_wait --older-than 9m`, none here), and one held port "
             "(`--port P`).", "",
             "| sockets | live table entries | age histogram (ms) | scrape (ms) | "
             "collector `bpf` part (ms) | `sockets --state established` (s) | "
             "`sockets --state close_wait --older-than 9m` (s) | `sockets --port P` (s, rows) | "
             "listed / held with owner | established of unknown age |",
             "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for held, row in data["by_connections"].items():
        lines.append(f"| {row['sockets']:,} | {row['table_live_entries']:,} | "
                     f"{row['age_histogram_ms']:.1f} | {row['scrape_ms']:.1f} | "
                     f"{row['collector_bpf_ms']:.1f} | {row['sockets_answer_s']:.2f} | "
                     f"{row['runbook_answer_s']:.2f} | "
                     + (f"{row['one_port_answer_s']:.2f}, {row['one_port_listed']:,}"
                        if row["one_port_answer_s"] is not None else "") + " | "
                     f"{row['listed_established']:,} / {row['listed_held_with_owner']:,} | "
                     f"{row['unknown_established']:,.0f} |")
        # every held socket is listed with its owner, or was evicted (of unknown age)
        if row["listed_held_with_owner"] + row["unknown_established"] < row["sockets"]:
            failures.append(f"tcpstate sockets listed {row['listed_held_with_owner']} of the "
                            f"{row['sockets']} held sockets with their owner "
                            f"({row['unknown_established']:.0f} of unknown age)")
    return lines
