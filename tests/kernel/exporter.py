"""A real `tcpstate serve` process for kernel tests, and its scrapes."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import http.client
from pathlib import Path
from typing import Mapping, Sequence

from prometheus_client.parser import text_string_to_metric_families

from .netlab import scaled

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def prog_ids_of(pid: int) -> set[int]:
    """The ids of the BPF programs a process holds, from /proc/PID/fdinfo."""
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                ids.update(int(line.split()[1]) for line in info if line.startswith("prog_id:"))
        except OSError:
            continue  # closed meanwhile
    return ids


class Scrape(dict):
    """{(sample name, frozenset of label pairs): value}."""

    @classmethod
    def parse(cls, text: str) -> "Scrape":
        scrape = cls()
        scrape.text = text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scrape[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return scrape

    def value(self, name: str, **labels: str) -> float:
        """One sample's value; 0 when the series is absent."""
        return self.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, l), v in self.items() if n == name and wanted <= l)

    def series(self, name: str) -> list[dict[str, str]]:
        return [dict(l) for (n, l) in self if n == name]


class Exporter:
    def __init__(self, *args: str, service_ports: Sequence[int] = (),
                 env: Mapping[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 headers: Mapping[str, str] | None = None, port: int | None = None):
        """ssl_context and headers (e.g. Authorization) are used by scrape();
        port: a given one (a restart on the same port), else a free one."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        command = [TCPSTATE, "serve", "--web.listen-address", f"127.0.0.1:{self.port}"]
        if service_ports:
            command += ["--service-ports", ",".join(map(str, service_ports))]
        self.command = command + list(args)
        self.env = {**os.environ, **(env or {})}
        self.ssl_context = ssl_context
        self.headers = dict(headers or {})
        self.process: subprocess.Popen | None = None
        # a file, not a pipe: a chatty exporter never blocks on a full pipe
        self._log = tempfile.TemporaryFile("a+")  # O_APPEND: reading never moves its writes
        self._connection: http.client.HTTPConnection | None = None

    def start(self, timeout: float = 60.0) -> "Exporter":
        # its own process group: stop() ends whatever the command started too
        self.process = subprocess.Popen(self.command, env=self.env, stdout=subprocess.DEVNULL,
                                        stderr=self._log, text=True, start_new_session=True)
        deadline = time.monotonic() + scaled(timeout)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tcpstate exited {self.process.returncode}: {self.log()}")
            try:
                self.scrape()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"tcpstate did not start serving in time: {self.log()}")

    def log(self) -> str:
        """Everything the exporter wrote to stderr so far."""
        self._log.seek(0)
        return self._log.read()

    def scrape(self) -> Scrape:
        """One scrape over a kept-alive connection, as Prometheus does, so
        that scraping adds no TIME-WAIT sockets to what it measures."""
        for attempt in (1, 2):
            if self._connection is None and self.ssl_context is not None:
                self._connection = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, timeout=10, context=self.ssl_context)
            elif self._connection is None:
                self._connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._connection.request("GET", "/metrics", headers=self.headers)
                response = self._connection.getresponse()
                body = response.read().decode()
                if response.status != 200:
                    raise OSError(f"scrape answered {response.status}")
                return Scrape.parse(body)
            except (OSError, http.client.HTTPException):
                self._connection.close()
                self._connection = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process, wait (SIGKILL after `timeout`), then kill
        what is left of its process group (a wrapper's children)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self.process is None:
            return 0
        try:
            if self.process.poll() is None:
                self.process.send_signal(sig)
                try:
                    self.process.wait(scaled(timeout))
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # nothing left
        return self.process.returncode

    def __enter__(self) -> "Exporter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
