"""The benchmark's private network namespace and its workload, bench/churn.c.

The namespace has only a loopback device; the workload's sockets are the
only ones in it, so its gauges and node_exporter's view are exact there.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

NS_PREFIX = "tcpstate-bench-"
CHURN_PORT = 48000
# Ten labelled service ports (figure 3); the churn and the held connections
# use the first ones, so `port` labels isolate them from other activity.
SERVICE_PORTS = tuple(range(CHURN_PORT, CHURN_PORT + 10))
# Held connections: at most this many per process (two descriptors each,
# under a hard limit of open files that root may not be allowed to raise),
# each process on a server port of its own.
HOLD_PER_PROCESS = 9_000

HERE = Path(__file__).resolve().parent
# Namespace settings: a listen backlog the churn never fills (a full queue
# drops the handshake's last ACK and changes the transitions), and ephemeral
# ports below the service ports (a client must not take a port a later
# listener binds), ~38k of them per server port.
SYSCTLS = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.ipv4.ip_local_port_range": f"10000 {CHURN_PORT - 1}",
    "net.ipv4.tcp_tw_reuse": "1",
}


@dataclass(frozen=True)
class Workload:
    """How bench/churn.c runs flat out: its client and server threads, and
    the request/response each connection carries (none: connect, reset)."""

    name: str
    clients: int = 2
    servers: int = 2
    request_bytes: int = 0
    response_bytes: int = 0
    exchanges: int = 1

    def args(self) -> list[str]:
        args = ["-t", str(self.clients), "-s", str(self.servers)]
        if self.request_bytes:
            args += ["-q", str(self.request_bytes), "-Q", str(self.response_bytes),
                     "-k", str(self.exchanges)]
        return args

    def describe(self) -> str:
        threads = f"{self.clients} client and {self.servers} server threads"
        if not self.request_bytes:
            return f"connect, reset; {threads}"
        return (f"connect, {self.exchanges} x ({self.request_bytes} B request, "
                f"{self.response_bytes} B response), reset; {threads}")


# Every connection as cheap as it can be: ~700k state changes/s on 2 cores.
DENSE = Workload("dense")
# Each connection does some work, as a service's do: ~200k state changes/s
# flat out on the same 2 cores, the rate the issues' targets are set at.
REQUEST_RESPONSE = Workload("request/response", clients=5, servers=5, request_bytes=100,
                            response_bytes=100, exchanges=3)
# One client and one server thread, for a churn pinned to one CPU.
SINGLE = Workload("single", clients=1, servers=1)


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def build_churn(into: Path) -> Path:
    binary = into / "churn"
    run("gcc", "-O2", "-Wall", "-pthread", "-o", str(binary), str(HERE / "churn.c"))
    return binary


def remove_stale_namespaces() -> None:
    """Namespaces a killed earlier run left behind: those whose creating
    process (the pid in the name) is gone, never a running one's."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else ():
        if not name.startswith(NS_PREFIX):
            continue
        pid = name[len(NS_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Lab:
    """The namespace and the churn binary; a context manager that removes both.

    rps_cpus: a hex CPU mask the namespace's loopback receive softirq is
    steered to (RPS), as a NIC's interrupts land on one CPU of a real host;
    `name` tells a second lab of the same run apart."""

    def __init__(self, name: str = "", rps_cpus: str | None = None) -> None:
        self.namespace = f"{NS_PREFIX}{os.getpid()}" + (f"-{name}" if name else "")
        self.rps_cpus = rps_cpus
        self._build = tempfile.TemporaryDirectory(prefix="tcpstate-bench-")
        self.churn_binary = build_churn(Path(self._build.name))

    def __enter__(self) -> "Lab":
        remove_stale_namespaces()
        run("ip", "netns", "add", self.namespace)
        try:
            run("ip", "-n", self.namespace, "link", "set", "lo", "up")
            for key, value in SYSCTLS.items():
                self.exec("sysctl", "-qw", f"{key}={value}")
            if self.rps_cpus:  # sysfs inside `ip netns exec` is the namespace's
                self.exec("sh", "-c", f"echo {self.rps_cpus} > "
                          "/sys/class/net/lo/queues/rx-0/rps_cpus")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.namespace], capture_output=True)
        self._build.cleanup()

    def command(self, *command: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespace, *command]

    def exec(self, *command: str) -> str:
        return run(*self.command(*command))

    def tcp_mib(self) -> dict[str, int]:
        """The namespace's TCP counters (/proc/net/snmp): PassiveOpens, ..."""
        names, values = [line.split()[1:] for line in self.exec("cat", "/proc/net/snmp")
                         .splitlines() if line.startswith("Tcp:")]
        return dict(zip(names, map(int, values)))

    def churn(self, seconds: float | None = None, connections: int | None = None,
              rate: float | None = None, workload: Workload = DENSE,
              port: int = CHURN_PORT, cpu: int | None = None) -> dict:
        """Run the churn to its end (pinned to `cpu` when given); its JSON
        report, with `transitions`, the state changes the kernel must have
        reported for it."""
        args = [*workload.args(), "-p", str(port)]
        if seconds:
            args += ["-d", str(seconds)]
        if connections:
            args += ["-n", str(connections)]
        if rate:
            args += ["-r", str(rate)]
        pinned = ["taskset", "-c", str(cpu)] if cpu is not None else []
        done = subprocess.run(self.command(*pinned, str(self.churn_binary), *args),
                              capture_output=True, text=True)
        if done.returncode not in (0, 3):  # 3: some connects failed, reported
            raise RuntimeError(f"churn failed: {done.stderr.strip()}")
        return json.loads(done.stdout)

    def churn_in_background(self, rate: float, port: int = CHURN_PORT,
                            seconds: float = 3600) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(str(self.churn_binary), "-t", "1", "-s", "1", "-p", str(port),
                         "-r", str(rate), "-d", str(seconds)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    @contextlib.contextmanager
    def holding(self, connections: int, port: int = CHURN_PORT) -> Iterator[dict]:
        """Hold `connections` idle connections (two sockets each) open,
        spread over processes of HOLD_PER_PROCESS each, on consecutive
        server ports from `port`; yields {"ports": [...], "open_seconds": s}."""
        sizes = [HOLD_PER_PROCESS] * (connections // HOLD_PER_PROCESS)
        if connections % HOLD_PER_PROCESS:
            sizes.append(connections % HOLD_PER_PROCESS)
        processes = []
        try:
            started = time.monotonic()
            for index, size in enumerate(sizes):
                processes.append(subprocess.Popen(
                    self.command(str(self.churn_binary), "-H", str(size),
                                 "-p", str(port + index)),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True))
            for process in processes:
                line = process.stdout.readline().split()
                if not line or line[0] != "ready":
                    raise RuntimeError(f"churn -H failed: {process.stderr.read().strip()}")
            yield {"ports": [port + index for index in range(len(sizes))],
                   "open_seconds": time.monotonic() - started}
        finally:
            for process in processes:
                process.stdin.close()
            for process in processes:
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
