"""Figure 11 (issue 14), memory and start: `tcpstate serve` with default
flags, this checkout's lean daemon beside the code before it (a commit's
`tracer` and `bpf` archived and run from there), side by side with
node_exporter (its default collectors) in one run. Per start: seconds to
the first scrape with events, resident memory then, the loader's peak;
once per code: resident memory over a loop of kept-alive scrapes, its
high-water mark, and the BPF maps' size."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from tests.kernel.exporter import Scrape, free_port
from tracer import metrics as m
from tracer.serve_maps import map_bytes

from . import measure
from .configs import START_TIMEOUT_S, TCPSTATE, NodeExporter, Scraper, stop_process
from .lab import Lab

# The code before the lean daemon, bcc compiled and stayed in the server:
# c9fe161, the classic tracepoint only (the "today"); f2f42da, the
# raw tracepoint just before the lean daemon (516d950^): beside it, the
# start-up the loader process adds and nothing else.
BEFORE_COMMITS = ("c9fe161", "f2f42da")
REPO = Path(__file__).resolve().parent.parent
NEW = "lean (this checkout)"


def before_label(commit: str) -> str:
    return f"before ({commit})"
POLL_SECONDS = 0.01
RSS_SAMPLE_EVERY = 100
LOADER_PEAK = re.compile(r"loader peak (\d+) MiB")
LOADED = re.compile(r"msg=(loaded and attached .*)")
BACKGROUND_RATE = 200  # connections/s in the lab: events for the first scrape to count


def status_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, ... of a process in KiB; {} once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return {key: int(rest.split()[0]) for key, _, rest in
                    (line.partition(":") for line in status) if key.startswith("Vm")}
    except (OSError, ValueError, IndexError):
        return {}


def cpu_with_children_seconds(pid: int) -> float:
    """user + system CPU of a process and of its children it has waited
    for (the loader): less moved by other processes' load than wall time."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return sum(int(field) for field in fields[11:15]) / measure.TICKS


def children_of(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found += map(int, children.read().split())
    except OSError:
        pass
    return found


@contextlib.contextmanager
def archived(commit: str) -> Iterator[Path]:
    """The commit's `tracer` and `bpf` in a temporary directory."""
    with tempfile.TemporaryDirectory(prefix="tcpstate-bench-before-") as directory:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "tracer", "bpf"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", directory], input=archive, check=True)
        yield Path(directory)


class ChildrenPeak(threading.Thread):
    """The highest VmHWM of a process's children, polled until stopped (a
    thread: the first scrape waits for the whole load, as the server answers
    only once the program is attached). A lower bound: it may miss a
    child's last moments."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak_kib = pid, 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(POLL_SECONDS):
            for child in children_of(self.pid):
                self.peak_kib = max(self.peak_kib, status_kib(child).get("VmHWM", 0))

    def stop(self) -> int:
        self.stopped.set()
        self.join()
        return self.peak_kib


class StartedServe:
    """`tcpstate serve` with default flags on a free loopback port, from its
    start to its first scrape with events: the seconds that took, and the
    loader's peak (ru_maxrss, from its log line; and ChildrenPeak's)."""

    def __init__(self, command: list[str], cwd: Path | None = None,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.command = [*command, "--web.listen-address", f"127.0.0.1:{self.port}"]
        self.cwd, self.env = cwd, env

    def __enter__(self) -> "StartedServe":
        self.log = tempfile.TemporaryFile("a+")
        self.scraper = Scraper(self.port)
        started = time.monotonic()
        self.process = subprocess.Popen(self.command, cwd=self.cwd, env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.pid = self.process.pid
        children = ChildrenPeak(self.pid)
        children.start()
        try:
            while True:
                try:
                    scrape = Scrape.parse(self.scraper.get()[1])
                    if scrape.total(m.TRANSITIONS) > 0:
                        break
                except (OSError, http.client.HTTPException, RuntimeError):
                    self.scraper.close()
                    self.scraper.connection = None
                if self.process.poll() is not None or time.monotonic() > started + START_TIMEOUT_S:
                    raise RuntimeError(f"serve did not count events in time: {self.text()[-300:]}")
                time.sleep(POLL_SECONDS)
            self.start_seconds = time.monotonic() - started
            self.first_scrape = scrape
            self.started_kib = status_kib(self.pid)
            self.start_cpu_seconds = cpu_with_children_seconds(self.pid)
            deadline = time.monotonic() + 5  # the log line may follow the first scrape
            while not LOADED.search(self.text()) and time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
        except BaseException:
            self.__exit__()
            raise
        finally:
            polled_peak = children.stop()
        logged = LOADER_PEAK.search(self.text())
        loaded = LOADED.search(self.text())
        self.result = {
            "start_seconds": self.start_seconds,
            "start_cpu_seconds": self.start_cpu_seconds,
            "rss_start_kib": self.started_kib.get("VmRSS", 0),
            "hwm_start_kib": self.started_kib.get("VmHWM", 0),
            "loader_peak_logged_mib": int(logged.group(1)) if logged else None,
            "loader_peak_polled_kib": polled_peak or None,
            "loaded": loaded.group(1) if loaded else None,
        }
        return self

    def text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc) -> None:
        self.scraper.close()
        stop_process(self.process)
        self.log.close()


def _scrape_loop(serve: StartedServe, node: NodeExporter, scrapes: int) -> dict:
    """`scrapes` kept-alive scrapes of each, alternately; resident memory of
    both every RSS_SAMPLE_EVERY scrapes."""
    samples = [{"scrapes": 0, "serve_kib": status_kib(serve.pid).get("VmRSS", 0),
                "node_exporter_kib": status_kib(node.pid).get("VmRSS", 0)}]
    serve_seconds, node_seconds = [], []
    for done in range(1, scrapes + 1):
        serve_seconds.append(serve.scraper.get()[0])
        node_seconds.append(node.scraper.get()[0])
        if done % RSS_SAMPLE_EVERY == 0 or done == scrapes:
            samples.append({"scrapes": done, "serve_kib": status_kib(serve.pid).get("VmRSS", 0),
                            "node_exporter_kib": status_kib(node.pid).get("VmRSS", 0)})
    after = status_kib(serve.pid)
    maps = {}
    for prog_id in measure.programs_of(serve.pid):
        maps.update(measure.map_memory(prog_id))
    return {"samples": samples, "rss_after_kib": after.get("VmRSS", 0),
            "hwm_after_kib": after.get("VmHWM", 0),
            "node_exporter_rss_after_kib": samples[-1]["node_exporter_kib"],
            "serve_scrape_ms": 1000 * measure.median(serve_seconds),
            "node_exporter_scrape_ms": 1000 * measure.median(node_seconds),
            "maps_bytes": maps, "maps_total_bytes": sum(maps.values()),
            "table_capacity": int(serve.first_scrape.total(m.SOCKET_TABLE_CAPACITY))}


def memory_and_start(lab: Lab, settings) -> dict:
    """Rounds of one start of each code (the order alternating round by
    round), a churn of BACKGROUND_RATE connections/s in the lab meanwhile;
    the first round also scrapes each `settings.memory_scrapes` times,
    node_exporter as often beside it."""
    codes: dict[str, dict] = {NEW: {"command": [TCPSTATE, "serve"]}}
    runs: dict[str, list[dict]] = {NEW: []}
    loops: dict[str, dict] = {}
    before_errors = []
    background = lab.churn_in_background(rate=BACKGROUND_RATE)
    load_before = measure.load_average()
    try:
        with contextlib.ExitStack() as stack:
            for commit in settings.memory_before:
                try:
                    before = stack.enter_context(archived(commit))
                except (subprocess.CalledProcessError, OSError) as exc:
                    before_errors.append(f"git archive {commit} failed: {exc}")
                    continue
                # `python -m` puts its working directory first on sys.path
                codes[before_label(commit)] = {
                    "command": [sys.executable, "-m", "tracer.cli", "serve"],
                    "cwd": before, "env": {**os.environ, "PYTHONPATH": str(before)}}
                runs[before_label(commit)] = []
            node = stack.enter_context(NodeExporter(None, collectors=None))
            node_started = status_kib(node.pid)
            for round_number in range(settings.memory_rounds):
                order = list(codes) if round_number % 2 == 0 else list(codes)[::-1]
                for label in order:
                    with StartedServe(**codes[label]) as serve:
                        run = dict(serve.result, round=round_number)
                        if label not in loops:
                            loops[label] = _scrape_loop(serve, node, settings.memory_scrapes)
                        runs[label].append(run)
    finally:
        background.terminate()
        background.communicate()
    summary = {}
    for label, rows in runs.items():
        summary[label] = {
            "median_start_seconds": measure.median([r["start_seconds"] for r in rows]),
            "median_start_cpu_seconds": measure.median([r["start_cpu_seconds"] for r in rows]),
            "median_rss_start_kib": measure.median([r["rss_start_kib"] for r in rows]),
            "loader_peak_logged_mib": [r["loader_peak_logged_mib"] for r in rows],
            "loader_peak_polled_kib": [r["loader_peak_polled_kib"] for r in rows],
            **loops[label]}
    new = summary[NEW]
    new["map_bytes_formula"] = map_bytes(os.cpu_count(), 1, new["table_capacity"])
    ratios = {}
    for label in list(summary)[1:]:  # side by side: each round's starts, then the median
        start_ratios = [n["start_seconds"] / b["start_seconds"]
                        for n, b in zip(runs[NEW], runs[label])]
        ratios[label] = {"start_per_round": start_ratios,
                         "start": measure.median(start_ratios),
                         "start_cpu": new["median_start_cpu_seconds"]
                         / summary[label]["median_start_cpu_seconds"],
                         "rss_start": new["median_rss_start_kib"]
                         / summary[label]["median_rss_start_kib"],
                         "rss_after": new["rss_after_kib"] / summary[label]["rss_after_kib"]}
    return {"runs": runs, "summary": summary, "ratios": ratios,
            "scrapes": settings.memory_scrapes,
            "node_exporter_rss_start_kib": node_started.get("VmRSS", 0),
            "before_commits": list(settings.memory_before), "before_errors": before_errors,
            "cpus": os.cpu_count(), "background_rate": BACKGROUND_RATE,
            "load_average": [load_before, measure.load_average()]}
