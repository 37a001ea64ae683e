"""A real Prometheus server (Debian's `prometheus`) for kernel tests: on
loopback, on a free port, with a temporary data directory, scraping the
given targets every second with the job of dashboards/scrape.py (the
README's), and evaluating the given rule files every second.
Stopped and its directory removed on exit, even when the test fails.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

from dashboards.promapi import PrometheusAPI
from dashboards.rules import JOB
from dashboards.scrape import scrape_job

from .exporter import free_port


class PrometheusServer:
    def __init__(self, targets: Mapping[str, str], rule_files: Sequence[Path] = (),
                 interval: str = "1s"):
        """targets: {instance label: "host:port"} of the tcpstate exporters."""
        self.binary = shutil.which("prometheus")
        if self.binary is None:
            raise RuntimeError("Debian's prometheus is not installed (make setup-test)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = PrometheusAPI(self.url)
        self.config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            # the job README users copy (dashboards/prometheus.yml), with the
            # instance set per target as a DaemonSet's monitor sets it to the node name
            "scrape_configs": [scrape_job(dict(targets))],
        }
        self.directory: Path | None = None
        self.process: subprocess.Popen | None = None

    def start(self) -> "PrometheusServer":
        """Start the process; ready() waits until it serves queries."""
        self.directory = Path(tempfile.mkdtemp(prefix="tcpstate-prometheus-"))
        config = self.directory / "prometheus.yml"
        config.write_text(json.dumps(self.config, indent=2))  # JSON is YAML
        self.log = open(self.directory / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={config}",
             f"--storage.tsdb.path={self.directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    def ready(self, timeout: float = 30.0) -> "PrometheusServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.logs()}")
            if self.api.ready():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"prometheus not ready in {timeout} s: {self.logs()}")

    def logs(self) -> str:
        path = self.directory / "prometheus.log" if self.directory else None
        return path.read_text()[-2000:] if path and path.exists() else ""

    def wait_for(self, expr: str, predicate=lambda result: bool(result),
                 timeout: float = 30.0) -> list[dict]:
        """Poll an instant query until `predicate(result)` holds."""
        deadline = time.monotonic() + timeout
        result = self.api.query(expr)
        while not predicate(result):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting on {expr}: last result {result}")
            time.sleep(0.2)
            result = self.api.query(expr)
        return result

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            if getattr(self, "log", None):
                self.log.close()
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> "PrometheusServer":
        try:
            return self.start().ready()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
