"""A private network for kernel tests: a client and a server namespace joined
by a veth pair, with IPv4 and IPv6 addresses of their own. Sockets are made
inside a namespace with setns(2) in the calling thread and keep it after the
thread returns to the root namespace, so one test process drives both ends.
Nothing here ever sends outside the two namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import subprocess
import time
from collections import Counter
from typing import Callable, Iterator

CLONE_NEWNET = 0x40000000
PREFIX = "tcpst-"
# A factor for the tests' waits: tests/vm sets it in emulated VMs, where
# everything, loading the BPF program first, is many times slower.
TIME_SCALE = "TCPSTATE_TEST_TIME_SCALE"
_libc = ctypes.CDLL(None, use_errno=True)
_serial = itertools.count()

ADDRESSES = {
    socket.AF_INET: ("10.231.0.1", "10.231.0.2", 24),
    socket.AF_INET6: ("fd00:231::1", "fd00:231::2", 64),
}

# ss -tan state names -> tcpstate's
SS_STATES = {
    "ESTAB": "established", "SYN-SENT": "syn_sent", "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1", "FIN-WAIT-2": "fin_wait2", "TIME-WAIT": "time_wait",
    "CLOSE-WAIT": "close_wait", "LAST-ACK": "last_ack", "LISTEN": "listen",
    "CLOSING": "closing", "UNCONN": "close",
}


def run(*command: str) -> str:
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def remove_stale_namespaces() -> None:
    """Namespaces a killed earlier run left behind: those whose creating
    process (the pid in the name) is gone, never a running session's."""
    for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else ():
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and os.path.exists(f"/proc/{pid}"):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "setns")


@contextlib.contextmanager
def inside(namespace: str) -> Iterator[None]:
    """Run the block in `namespace` (this thread only), then come back."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        _setns(target)
        yield
    finally:
        _setns(home)
        os.close(target)
        os.close(home)


class Lab:
    def __init__(self) -> None:
        serial = f"{os.getpid()}-{next(_serial)}"
        self.client = f"{PREFIX}{serial}-c"
        self.server = f"{PREFIX}{serial}-s"
        self._up = False

    def __enter__(self) -> "Lab":
        try:
            run("ip", "netns", "add", self.client)
            run("ip", "netns", "add", self.server)
            run("ip", "link", "add", "veth-c", "netns", self.client, "type", "veth",
                "peer", "name", "veth-s", "netns", self.server)
            for ns, dev, index in ((self.client, "veth-c", 0), (self.server, "veth-s", 1)):
                run("ip", "-n", ns, "link", "set", "lo", "up")
                # set_link(False) must not flush the IPv6 addresses
                run("ip", "netns", "exec", ns, "sysctl", "-qw",
                    f"net.ipv6.conf.{dev}.keep_addr_on_down=1")
                for family, (a, b, bits) in ADDRESSES.items():
                    address = (a, b)[index]
                    extra = ["nodad"] if family == socket.AF_INET6 else []
                    run("ip", "-n", ns, "addr", "add", f"{address}/{bits}", "dev", dev, *extra)
                run("ip", "-n", ns, "link", "set", dev, "up")
            self._up = True
            return self
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for ns in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    def address(self, family: int, side: str) -> str:
        client, server, _ = ADDRESSES[family]
        return server if side == "server" else client

    def socket(self, side: str, family: int = socket.AF_INET) -> socket.socket:
        with inside(self.server if side == "server" else self.client):
            return socket.socket(family, socket.SOCK_STREAM)

    def listener(self, family: int, port: int, backlog: int = 4096) -> socket.socket:
        listener = self.socket("server", family)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.address(family, "server"), port))
        listener.listen(backlog)
        return listener

    def connect(self, family: int, port: int) -> socket.socket:
        client = self.socket("client", family)
        client.connect((self.address(family, "server"), port))
        return client

    def set_link(self, up: bool) -> None:
        run("ip", "-n", self.client, "link", "set", "veth-c", "up" if up else "down")

    def ss_states(self, side: str, port: int) -> Counter[str]:
        """States of the TCP sockets on `port` in one namespace, as ss sees them."""
        ns = self.server if side == "server" else self.client
        out = run("ip", "netns", "exec", ns, "ss", "-tanH",
                  f"( sport = :{port} or dport = :{port} )")
        return Counter(SS_STATES[line.split()[0]] for line in out.splitlines() if line.strip())


class RoutedLab(Lab):
    """A Lab whose server namespace is also a router: the client reaches
    three more networks through it, where the router's routes answer as
    `unreachable` (ICMP host unreachable; IPv6: no route), `prohibit` (ICMP
    administratively prohibited) and `blackhole` (silence). Only these two
    namespaces ever see the packets."""

    ROUTES = ("unreachable", "prohibit", "blackhole")
    NETWORKS = {
        socket.AF_INET: {route: (f"10.232.{i}.0/24", f"10.232.{i}.9")
                         for i, route in enumerate(ROUTES, start=1)},
        socket.AF_INET6: {route: (f"fd00:232:{i}::/64", f"fd00:232:{i}::9")
                          for i, route in enumerate(ROUTES, start=1)},
    }

    def __enter__(self) -> "RoutedLab":
        super().__enter__()
        try:
            router, client = self.server, self.client
            # a host that does not forward drops what it has no route for
            # without an ICMP error; rate limits would drop our few errors
            for setting in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1",
                            "net.ipv4.icmp_ratelimit=0", "net.ipv6.icmp.ratelimit=0"):
                run("ip", "netns", "exec", router, "sysctl", "-qw", setting)
            for family, networks in self.NETWORKS.items():
                version = "-4" if family == socket.AF_INET else "-6"
                for route, (network, _) in networks.items():
                    run("ip", version, "-n", router, "route", "add", route, network)
                    run("ip", version, "-n", client, "route", "add", network,
                        "via", self.address(family, "server"))
            return self
        except BaseException:
            self.close()
            raise

    def destination(self, family: int, route: str) -> str:
        """An address the router's `route` route covers."""
        return self.NETWORKS[family][route][1]

    def sysctl(self, side: str, setting: str) -> None:
        """Set a sysctl inside one namespace (network sysctls are per namespace)."""
        run("ip", "netns", "exec", self.server if side == "server" else self.client,
            "sysctl", "-qw", setting)


def scaled(seconds: float) -> float:
    """`seconds` times the factor in TCPSTATE_TEST_TIME_SCALE (default 1)."""
    factor = os.environ.get(TIME_SCALE, "1")
    try:
        return seconds * float(factor)
    except ValueError:
        raise ValueError(f"{TIME_SCALE}={factor!r} is not a number") from None


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0,
             interval: float = 0.05) -> bool:
    """Polls until `predicate` holds or `timeout` (scaled) has passed."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
