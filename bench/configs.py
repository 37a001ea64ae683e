"""The configurations the workload runs under, each a context manager that
starts its tracer, stops it, and checks what it counted against what the
workload made (`verify`)."""

from __future__ import annotations

import atexit
import functools
import glob
import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.kernel.exporter import Exporter, Scrape, free_port
from tests.kernel.netlab import inside
from tracer import metrics as m
from tracer.program import RAW_TRACEPOINT

from . import measure
from .lab import CHURN_PORT, SERVICE_PORTS, Lab
from .programs import EmptyProgram

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))
TCPSTATES = "/usr/sbin/tcpstates-bpfcc"
NODE_EXPORTER = "prometheus-node-exporter"
NOTHING_PORT = 9  # discard: no socket of the run uses it
START_TIMEOUT_S = 60


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM,
                 timeout: float = 20) -> tuple[str, str]:
    if process.stderr is not None and process.stderr.closed:
        return "", ""  # stopped and read already
    if process.poll() is None:
        process.send_signal(sig)
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()


def clean(churn: dict) -> bool:
    """The workload made every connection and every exchange it tried."""
    return churn["failed"] == 0 and churn.get("exchange_failed", 0) == 0


class Config:
    """Untraced: the baseline."""

    name = "untraced"
    pid: int | None = None
    # One session serves several workload runs (mark/verify around each);
    # False: verify ends the session, so each run gets its own.
    shared = True

    def __enter__(self) -> "Config":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def mark(self) -> None:
        """Called just before the workload runs."""

    def verify(self, churn: dict) -> dict:
        """Called after it: {"ok": True/False/None (nothing claimed), ...}."""
        return {"ok": clean(churn), "failed_connects": churn["failed"]}


class EmptyHandler(Config):
    """A BPF program that does nothing, on the raw tracepoint serve attaches
    to by default: the floor."""

    name = "empty handler"

    def __enter__(self) -> "EmptyHandler":
        self.program = EmptyProgram(RAW_TRACEPOINT).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.program.__exit__(*exc)


class Serve(Config):
    """`tcpstate serve`, with or without the ten service ports labelled."""

    def __init__(self, service_ports: tuple[int, ...] = (), args: tuple[str, ...] = ()):
        self.service_ports = service_ports
        self.args = args
        self.name = "tcpstate serve" + (" --service-ports" if service_ports else "")

    def __enter__(self) -> "Serve":
        self.exporter = Exporter(*self.args, service_ports=self.service_ports).start(
            START_TIMEOUT_S)
        self.pid = self.exporter.process.pid
        return self

    def __exit__(self, *exc) -> None:
        self.exporter.stop()

    def counted(self, scrape: Scrape) -> dict[str, float]:
        labels = {m.PORT_LABEL: str(CHURN_PORT)} if self.service_ports else {}
        return {
            "transitions": scrape.total(m.TRANSITIONS, **labels),
            "missed": scrape.total(m.MISSED_EVENTS),
            "evictions": scrape.total(m.SOCKET_TABLE_EVICTIONS),
        }

    def mark(self) -> None:
        self.before = self.counted(self.exporter.scrape())

    def verify(self, churn: dict) -> dict:
        after = self.counted(self.exporter.scrape())
        delta = {key: int(after[key] - self.before[key]) for key in after}
        expected, counted = churn["transitions"], delta["transitions"]
        # `missed` counts events the kernel skipped on this CPU (a nested
        # run), of any socket on the host: a shortfall it explains was lost,
        # but not silently.
        if self.service_ports:  # the port label isolates the workload: exact
            exact = counted == expected or expected - delta["missed"] <= counted < expected
        else:  # other activity on the host is counted too
            exact = counted + delta["missed"] >= expected
        return {"ok": exact and clean(churn),
                "expected": expected, "counted": delta["transitions"],
                "missed": delta["missed"], "evictions": delta["evictions"],
                "exact": bool(self.service_ports)}


class Trace(Config):
    """`tcpstate trace` to /dev/null; `matching_nothing` filters on a port
    no socket uses, so every event is filtered out in the kernel."""

    SUMMARY = re.compile(r"(\d+) events printed, (\d+) lost.*?, (\d+) missed")
    shared = False  # its exit summary counts the whole session

    def __init__(self, matching_nothing: bool = False):
        self.args = ["--port", str(NOTHING_PORT)] if matching_nothing else []
        self.matching_nothing = matching_nothing
        self.name = "tcpstate trace" + (f" --port {NOTHING_PORT}" if matching_nothing else "")

    def __enter__(self) -> "Trace":
        self.process = subprocess.Popen([TCPSTATE, "trace", *self.args],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
        self.pid = self.process.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:  # its "tracing ..." log line says it is ready
            line = self.process.stderr.readline()
            if "tracing" in line:
                return self
            if not line and self.process.poll() is not None:
                break
        stop_process(self.process)
        raise RuntimeError(f"tcpstate trace did not start: {line.strip()}")

    def __exit__(self, *exc) -> None:
        stop_process(self.process)

    def verify(self, churn: dict) -> dict:
        _, stderr = stop_process(self.process)
        found = self.SUMMARY.search(stderr)
        if not found:
            return {"ok": False, "error": f"no summary: {stderr.strip()[-200:]}"}
        printed, lost, missed = map(int, found.groups())
        expected = churn["transitions"]
        if self.matching_nothing:
            ok = printed == 0 and lost == 0
        else:  # all events of the host: the workload's and any other's;
            # missed: the kernel skipped the program (a nested run), and said so
            ok = printed + lost + missed >= expected
        return {"ok": ok and clean(churn), "expected": expected,
                "printed": printed, "lost": lost, "missed": missed}


@functools.lru_cache(maxsize=None)
def peer_kernel_headers() -> str:
    """A kernel source tree tcpstates compiles against. It includes
    net/sock.h, which with the 6.12 headers we link for the running kernel
    needs BPF types newer than Debian 12's bcc 0.26 knows; the 6.1 headers
    (Debian `linux-headers-amd64`) work, and tcpstates reads only the
    tracepoint's arguments, so their struct layouts do not matter. bcc
    takes one tree (BCC_KERNEL_SOURCE): Debian splits it in two, so this
    joins them with symbolic links, once per run."""
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                          text=True).stdout.strip()
    trees = sorted(glob.glob(f"/usr/src/linux-headers-6.1.*-{arch}"))
    if not trees:
        raise RuntimeError(f"bcc tcpstates needs the 6.1 kernel headers: "
                           f"apt-get install linux-headers-{arch}")
    tree = trees[-1]
    joined = tempfile.mkdtemp(prefix="tcpstate-bench-headers-")
    atexit.register(shutil.rmtree, joined, True)
    common = tree[: -len(arch)] + "common"
    for part in (common, tree):
        subprocess.run(["cp", "-rsf", f"{part}/.", joined], check=True)
    return joined


class Tcpstates(Config):
    """bcc's tcpstates (Debian bpfcc-tools) to /dev/null."""

    name = "bcc tcpstates"

    def __enter__(self) -> "Tcpstates":
        env = {**os.environ, "BCC_KERNEL_SOURCE": peer_kernel_headers()}
        self.process = subprocess.Popen([TCPSTATES], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env)
        self.pid = self.process.pid
        deadline = time.monotonic() + START_TIMEOUT_S
        while not measure.programs_of(self.pid):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tcpstates did not start: {stop_process(self.process)[1]}")
            time.sleep(0.05)
        time.sleep(0.5)  # loaded; let it attach and open its perf buffer
        return self

    def __exit__(self, *exc) -> None:
        stop_process(self.process, signal.SIGINT)

    def verify(self, churn: dict) -> dict:
        return {"ok": None if clean(churn) else False}  # it counts nothing


class Scraper:
    """GETs of one /metrics URL over a kept-alive connection, timed; the
    connection is made inside `namespace` when given."""

    def __init__(self, port: int, namespace: str | None = None):
        self.port, self.namespace = port, namespace
        self.connection: http.client.HTTPConnection | None = None

    def get(self) -> tuple[float, str]:
        if self.connection is None:
            self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            if self.namespace:
                with inside(self.namespace):
                    self.connection.connect()
        started = time.perf_counter()
        self.connection.request("GET", "/metrics")
        response = self.connection.getresponse()
        body = response.read().decode()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"scrape of :{self.port} answered {response.status}")
        return elapsed, body

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


class NodeExporter:
    """node_exporter on a free loopback port: by default with only its
    tcpstat collector, inside the lab's namespace so that it sees the
    workload's sockets; with lab=None in the host's namespace, and with
    collectors=None its default collectors (as a node runs it)."""

    def __init__(self, lab: Lab | None, collectors: tuple[str, ...] | None = ("tcpstat",)):
        self.lab = lab
        self.collectors = collectors
        self.port = free_port()

    def __enter__(self) -> "NodeExporter":
        command = [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{self.port}"]
        if self.collectors is not None:
            command += ["--collector.disable-defaults",
                        *(f"--collector.{name}" for name in self.collectors)]
        # a file, not a pipe: a collector that logs every scrape never blocks it
        self.log = tempfile.TemporaryFile("a+")
        # `ip netns exec` execs the exporter: the process's pid is the exporter's
        self.process = subprocess.Popen(
            self.lab.command(*command) if self.lab else command,
            stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        self.pid = self.process.pid
        self.scraper = Scraper(self.port, self.lab.namespace if self.lab else None)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                self.scraper.get()
                return self
            except OSError:
                self.scraper.close()
                self.scraper.connection = None
                if self.process.poll() is not None or time.monotonic() > deadline:
                    stop_process(self.process)
                    self.log.seek(0)
                    raise RuntimeError(f"node_exporter did not start: "
                                       f"{self.log.read()[-300:]}") from None
                time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        self.scraper.close()
        stop_process(self.process)
        self.log.close()


RATE_CONFIGS = (
    EmptyHandler,
    lambda: Serve(),
    lambda: Serve(SERVICE_PORTS),
    lambda: Trace(),
    lambda: Trace(matching_nothing=True),
    Tcpstates,
)
# bcc compiles tcpstates against the whole kernel headers: 10-20 s, too long here.
QUICK_RATE_CONFIGS = (lambda: Serve(SERVICE_PORTS), lambda: Trace())
