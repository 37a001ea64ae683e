"""`tcpstate trace` on real sockets: exact lines, every filter in and out,
JSON records, the exit summary, owners, and a reader that goes away.

Each test runs the real command as a subprocess and isolates its own events
with a port filter on a service port of its own (47100-47199), so other
engineers' sockets on this machine never reach its output.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tracer.reasons import REASONS
from tracer.states import BY_NAME, FAMILIES as FAMILY_NAMES

from .exporter import TCPSTATE
from .netlab import Lab, inside, run, scaled

_ports = itertools.count(47100)
# Clients bind ports of their own, below the ephemeral range (32768-60999),
# so that every socket a test makes has a port pair known in advance.
_client_ports = itertools.count(20000)
IPV4, IPV6 = socket.AF_INET, socket.AF_INET6
SUMMARY = re.compile(r"tcpstate trace: (\d+) events printed, (\d+) lost .*, (\d+) missed")


def next_port() -> int:
    port = next(_ports)
    assert port < 47200, "tests/kernel/test_trace.py owns ports 47100-47199"
    return port


def my_comm() -> str:
    """What the kernel calls this thread (bpf_get_current_comm)."""
    return Path("/proc/thread-self/comm").read_text().strip()


class Mine:
    """The sockets a test makes, by port pair. Other tests on this machine
    use the same lab addresses in namespaces of their own, and their
    ephemeral ports may take one of our port numbers: a line is ours when
    its (local, remote) port pair is one of ours."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.pairs: set[tuple[int, int]] = set()

    def owns(self, local_port: int, remote_port: int) -> bool:
        return (local_port, remote_port) in self.pairs or (remote_port, local_port) in self.pairs

    def listener(self, family: int, port: int) -> socket.socket:
        self.pairs.add((port, 0))
        return self.lab.listener(family, port)

    def client(self, family: int, port: int) -> tuple[socket.socket, int]:
        """An unconnected client bound to a port of its own, and that port."""
        client_port = next(_client_ports)
        self.pairs.add((client_port, port))
        client = self.lab.socket("client", family)
        client.bind((self.lab.address(family, "client"), client_port))
        return client, client_port

    def connect(self, family: int, port: int) -> socket.socket:
        client, _ = self.client(family, port)
        client.connect((self.lab.address(family, "server"), port))
        return client

    def closes_first(self, family: int, port: int, n: int) -> None:
        """n connections; each client closes first (see closes_first_steps)."""
        with self.listener(family, port) as listener:
            for _ in range(n):
                client = self.connect(family, port)
                server, _ = listener.accept()
                client.close()
                assert server.recv(1) == b""
                server.close()

    def refused(self, family: int, port: int, n: int) -> None:
        for _ in range(n):
            client, _ = self.client(family, port)
            with pytest.raises(ConnectionRefusedError):
                client.connect((self.lab.address(family, "server"), port))
            client.close()


def closes_first_steps(n: int) -> Counter:
    steps_ = Counter({step: n for step in (
        ("close", "syn_sent"), ("syn_sent", "established"), ("established", "fin_wait1"),
        ("fin_wait1", "fin_wait2"), ("fin_wait2", "close"),
        ("listen", "syn_recv"), ("syn_recv", "established"), ("established", "close_wait"),
        ("close_wait", "last_ack"), ("last_ack", "close"))})
    steps_[("close", "listen")] = steps_[("listen", "close")] = 1
    return steps_


REFUSED_STEPS = Counter({("close", "syn_sent"): 1, ("syn_sent", "close"): 1})


@dataclass(frozen=True)
class Line:
    """One text line, less the columns that vary from run to run."""
    pid: int | None
    comm: str | None
    laddr: str
    lport: int
    raddr: str
    rport: int
    old: str
    new: str
    reason: str = field(default="-", compare=False)  # "-": not a close

    @property
    def step(self) -> tuple[str, str]:
        return self.old, self.new


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def header(self) -> str:
        return self.stdout.splitlines()[0]

    @property
    def body(self) -> list[str]:
        return self.stdout.splitlines()[1:]

    def lines(self, mine: Mine | None = None) -> list[Line]:
        """The printed lines; with `mine`, only those of our own sockets."""
        parsed = []
        for text in self.body:
            (time_, pid, comm, laddr, lport, raddr, rport, old, arrow, new, reason,
             ms) = text.split()
            assert arrow == "->" and re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3}", time_), text
            assert ms == "-" or re.fullmatch(r"\d+\.\d{3}", ms), text
            # a reason on closes only ("-" there too where reasons are off)
            assert reason == "-" or (new == "close" and reason in REASONS), text
            parsed.append(Line(None if pid == "-" else int(pid), None if comm == "-" else comm,
                               laddr, int(lport), raddr, int(rport), old, new, reason))
        return [line for line in parsed if mine is None or mine.owns(line.lport, line.rport)]

    def records(self, mine: Mine | None = None) -> list[dict]:
        records = [json.loads(text) for text in self.stdout.splitlines()]
        return [r for r in records
                if mine is None or mine.owns(r["local_port"], r["remote_port"])]

    def summary(self) -> tuple[int, int, int, Counter]:
        """(printed, lost, missed, matrix as Counter of (old, new))."""
        lines = self.stderr.splitlines()
        at = next(i for i, line in enumerate(lines) if SUMMARY.search(line))
        printed, lost, missed = map(int, SUMMARY.search(lines[at]).groups())
        matrix: Counter = Counter()
        table = lines[at + 1:]
        if table:
            columns = table[0].split()[3:]  # after "old \ new"
            assert columns[-1] == "total"
            for row in table[1:]:
                old, *cells = row.split()
                assert len(cells) == len(columns), row
                total = int(cells[-1])
                if old == "total":
                    assert total == printed
                    continue
                assert total == sum(map(int, cells[:-1])), row
                for new, cell in zip(columns[:-1], cells[:-1]):
                    if int(cell):
                        matrix[(old, new)] = int(cell)
        return printed, lost, missed, matrix


class Trace:
    """A running `tcpstate trace ARGS`: started, and attached with its
    filters written, when the block is entered."""

    def __init__(self, *args: str, stdout=subprocess.PIPE):
        self.command = [TCPSTATE, "trace", *args]
        self.stdout = stdout
        self.process: subprocess.Popen | None = None
        self._stderr: list[str] = []

    def __enter__(self) -> "Trace":
        self.process = subprocess.Popen(self.command, stdout=self.stdout,
                                        stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + scaled(60)
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                raise AssertionError(f"trace exited {self.process.wait()}: {self._stderr}")
            self._stderr.append(line)
            if "msg=tracing " in line:
                return self
        raise AssertionError("trace did not start in time")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> Result:
        """Wait a moment for the timer-driven drain, signal, collect."""
        time.sleep(scaled(0.2))
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> Result:
        stdout, stderr = self.process.communicate(timeout=scaled(timeout))
        return Result(self.process.returncode, stdout or "", "".join(self._stderr) + stderr)

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def run_trace(workload, *args: str) -> Result:
    with Trace(*args) as trace:
        workload()
        result = trace.stop()
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


def steps(lines: list[Line]) -> Counter:
    return Counter(line.step for line in lines)


def assert_summary_matches(result: Result) -> None:
    """The exit summary counts exactly the lines printed (all of them, ours
    and any other test's that passed the filters), and nothing was lost."""
    printed, lost, missed, matrix = result.summary()
    assert printed == len(result.body)
    assert lost == 0
    assert matrix == steps(result.lines())


def same_lines(actual: list[Line], expected: list[Line]) -> bool:
    return sorted(actual, key=repr) == sorted(expected, key=repr)


def ends(lab: Lab, family: int, port: int, client_port: int) -> tuple[dict, dict, dict]:
    """The address columns of a listener on `port`, and of the client and
    the server child of one connection to it, as Line fields."""
    client_ip, server_ip = lab.address(family, "client"), lab.address(family, "server")
    anywhere = "0.0.0.0" if family == IPV4 else "::"
    return (dict(laddr=server_ip, lport=port, raddr=anywhere, rport=0),
            dict(laddr=client_ip, lport=client_port, raddr=server_ip, rport=port),
            dict(laddr=server_ip, lport=port, raddr=client_ip, rport=client_port))


# ---------------------------------------------------------------- exact lines

def test_client_closes_first_exact_lines(lab):
    """Every column of every line, both ends and the listener. The client
    connects without binding first: its connect line has local port 0."""
    port, me, comm = next_port(), os.getpid(), my_comm()
    mine, state = Mine(lab), {}

    def workload():
        with mine.listener(IPV4, port) as listener:
            client = lab.connect(IPV4, port)
            state["eph"] = eph = client.getsockname()[1]
            mine.pairs |= {(eph, port), (0, port)}
            server, _ = listener.accept()
            client.close()
            assert server.recv(1) == b""
            server.close()

    result = run_trace(workload, "--port", str(port))
    ours, nobody = dict(pid=me, comm=comm), dict(pid=None, comm=None)
    listener, client, child = ends(lab, IPV4, port, state["eph"])
    expected = [
        Line(**ours, **listener, old="close", new="listen"),
        # connect() is traced before the local port is chosen
        Line(**ours, **{**client, "lport": 0}, old="close", new="syn_sent"),
        Line(**ours, **client, old="syn_sent", new="established"),
        # the child's handshake runs in softirq: no owner known yet
        Line(**nobody, **child, old="listen", new="syn_recv"),
        Line(**nobody, **child, old="syn_recv", new="established"),
        Line(**ours, **client, old="established", new="fin_wait1"),
        Line(**nobody, **child, old="established", new="close_wait"),
        Line(**ours, **client, old="fin_wait1", new="fin_wait2"),
        # an orphan in FIN-WAIT-2 is handed to a TIME-WAIT mini-socket at once
        Line(**ours, **client, old="fin_wait2", new="close"),
        # the owner's close() makes it known
        Line(**ours, **child, old="close_wait", new="last_ack"),
        Line(**ours, **child, old="last_ack", new="close"),
        Line(**ours, **listener, old="listen", new="close"),
    ]
    lines = result.lines(mine)
    assert same_lines(lines, expected)
    # each socket's lines come in the order of its life
    for one in (listener, child, client):
        def of(line, one=one):  # the connect line has no local port yet
            return (line.laddr, line.raddr, line.rport) == (one["laddr"], one["raddr"],
                                                            one["rport"])
        assert [l.step for l in lines if of(l)] == [l.step for l in expected if of(l)]
    assert_summary_matches(result)


def test_columns_are_aligned_for_both_families(lab):
    port, mine = next_port(), Mine(lab)

    def workload():
        mine.closes_first(IPV4, port, 1)
        mine.closes_first(IPV6, port, 1)

    result = run_trace(workload, "--port", str(port))
    header = result.header
    assert header.split() == ["TIME", "PID", "COMM", "LADDR", "LPORT", "RADDR", "RPORT",
                              "OLDSTATE", "->", "NEWSTATE", "REASON", "MS"]
    body = result.body
    assert len(result.lines(mine)) == 24
    assert {len(line) for line in body} == {len(header)}
    # right-aligned columns end, left-aligned ones start, where their title does
    for title in ("PID", "LPORT", "RPORT", "MS"):
        end = header.index(title) + len(title)
        assert all(line[end - 1] != " " and line[end:end + 1] in ("", " ")
                   for line in body), title
    for title in ("COMM", "LADDR", "RADDR", "OLDSTATE", "REASON"):
        start = header.index(title)
        assert all(line[start - 1] == " " and line[start] != " " for line in body), title


def test_refused_exact_lines(lab):
    port, mine = next_port(), Mine(lab)
    client_ip, server_ip = lab.address(IPV4, "client"), lab.address(IPV4, "server")
    state = {}

    def workload():
        client, state["cport"] = mine.client(IPV4, port)
        with pytest.raises(ConnectionRefusedError):
            client.connect((server_ip, port))
        client.close()

    result = run_trace(workload, "--rport", str(port))
    ends = dict(pid=os.getpid(), comm=my_comm(), laddr=client_ip, lport=state["cport"],
                raddr=server_ip, rport=port)
    assert result.lines(mine) == [Line(**ends, old="close", new="syn_sent"),
                                  Line(**ends, old="syn_sent", new="close")]
    assert_summary_matches(result)


def test_reset_exact_lines(lab):
    """SO_LINGER 0: the client aborts with RST; the server's child goes to
    CLOSE in softirq, before anyone owning it acted: no owner."""
    port, mine = next_port(), Mine(lab)
    server_ip, state = lab.address(IPV4, "server"), {}

    def workload():
        with mine.listener(IPV4, port) as listener:
            client, state["cport"] = mine.client(IPV4, port)
            client.connect((server_ip, port))
            server, _ = listener.accept()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            with pytest.raises(ConnectionResetError):
                server.recv(1)
            server.close()

    result = run_trace(workload, "--port", str(port))
    ours, nobody = dict(pid=os.getpid(), comm=my_comm()), dict(pid=None, comm=None)
    listener, client, child = ends(lab, IPV4, port, state["cport"])
    expected = [
        Line(**ours, **listener, old="close", new="listen"),
        Line(**ours, **client, old="close", new="syn_sent"),
        Line(**ours, **client, old="syn_sent", new="established"),
        Line(**nobody, **child, old="listen", new="syn_recv"),
        Line(**nobody, **child, old="syn_recv", new="established"),
        Line(**ours, **client, old="established", new="close"),
        Line(**nobody, **child, old="established", new="close"),
        Line(**ours, **listener, old="listen", new="close"),
    ]
    assert same_lines(result.lines(mine), expected)
    assert_summary_matches(result)


def test_ipv6_exact_lines(lab):
    """IPv6, and this time the server closes first."""
    port, mine = next_port(), Mine(lab)
    server_ip, state = lab.address(IPV6, "server"), {}

    def workload():
        with mine.listener(IPV6, port) as listener:
            client, state["cport"] = mine.client(IPV6, port)
            client.connect((server_ip, port))
            server, _ = listener.accept()
            server.close()
            assert client.recv(1) == b""
            client.close()

    result = run_trace(workload, "--port", str(port))
    ours, nobody = dict(pid=os.getpid(), comm=my_comm()), dict(pid=None, comm=None)
    listener, client, child = ends(lab, IPV6, port, state["cport"])
    expected = [
        Line(**ours, **listener, old="close", new="listen"),
        Line(**ours, **client, old="close", new="syn_sent"),
        Line(**ours, **client, old="syn_sent", new="established"),
        Line(**nobody, **child, old="listen", new="syn_recv"),
        Line(**nobody, **child, old="syn_recv", new="established"),
        Line(**ours, **child, old="established", new="fin_wait1"),  # its owner closed it
        Line(**ours, **client, old="established", new="close_wait"),
        Line(**ours, **child, old="fin_wait1", new="fin_wait2"),
        Line(**ours, **client, old="close_wait", new="last_ack"),
        Line(**ours, **child, old="fin_wait2", new="close"),
        Line(**ours, **client, old="last_ack", new="close"),
        Line(**ours, **listener, old="listen", new="close"),
    ]
    assert same_lines(result.lines(mine), expected)
    assert_summary_matches(result)


# ---------------------------------------------------------------- filters

def test_port_filter_either_end_and_or_of_repeats(lab):
    wanted, also, other = next_port(), next_port(), next_port()
    mine = Mine(lab)

    def workload():
        for port in (wanted, also, other):
            mine.closes_first(IPV4, port, 2)

    result = run_trace(workload, "--port", str(wanted), "--port", str(also))
    lines = result.lines(mine)
    assert steps(lines) == closes_first_steps(2) + closes_first_steps(2)
    assert {line.lport for line in lines} >= {wanted, also} <= {line.rport for line in lines}
    assert not any(other in (line.lport, line.rport) for line in lines)


def test_lport_and_rport_pick_one_end(lab):
    port, other, mine = next_port(), next_port(), Mine(lab)

    with Trace("--lport", str(port)) as local, Trace("--rport", str(port)) as remote:
        mine.closes_first(IPV4, port, 2)
        mine.closes_first(IPV4, other, 2)
        local, remote = local.stop(), remote.stop()
    server_side = local.lines(mine)
    assert all(line.lport == port for line in server_side)
    assert steps(server_side) == Counter({
        ("close", "listen"): 1, ("listen", "close"): 1, ("listen", "syn_recv"): 2,
        ("syn_recv", "established"): 2, ("established", "close_wait"): 2,
        ("close_wait", "last_ack"): 2, ("last_ack", "close"): 2})
    client_side = remote.lines(mine)
    assert all(line.rport == port for line in client_side)
    assert steps(client_side) == Counter({
        ("close", "syn_sent"): 2, ("syn_sent", "established"): 2,
        ("established", "fin_wait1"): 2, ("fin_wait1", "fin_wait2"): 2,
        ("fin_wait2", "close"): 2})


def test_lport_and_rport_together_mean_both(lab):
    """Different flags AND: the server child of one given client only."""
    port, mine = next_port(), Mine(lab)
    with mine.listener(IPV4, port) as listener:
        first, first_port = mine.client(IPV4, port)
        second, _ = mine.client(IPV4, port)
        with Trace("--lport", str(port), "--rport", str(first_port)) as trace:
            for client in (first, second):
                client.connect((lab.address(IPV4, "server"), port))
                server, _ = listener.accept()
                client.close()
                server.recv(1)
                server.close()
            result = trace.stop()
    lines = result.lines(mine)
    assert {(line.lport, line.rport) for line in lines} == {(port, first_port)}
    assert steps(lines) == Counter({("listen", "syn_recv"): 1, ("syn_recv", "established"): 1,
                                    ("established", "close_wait"): 1,
                                    ("close_wait", "last_ack"): 1, ("last_ack", "close"): 1})


@pytest.mark.parametrize("flag, family", [("-4", IPV4), ("-6", IPV6)])
def test_family_filter(lab, flag, family):
    port, mine = next_port(), Mine(lab)

    def workload():
        mine.closes_first(IPV4, port, 1)
        mine.closes_first(IPV6, port, 1)

    result = run_trace(workload, flag, "--port", str(port))
    lines = result.lines(mine)
    assert steps(lines) == closes_first_steps(1)
    wanted = lab.address(family, "server")
    assert all(wanted in (line.laddr, line.raddr) for line in lines)
    # -4 narrows the address columns to the width of IPv4's
    assert len(result.header) < 140 if flag == "-4" else len(result.header) > 170


def test_both_family_flags_mean_either(lab):
    port, mine = next_port(), Mine(lab)

    def workload():
        mine.closes_first(IPV4, port, 1)
        mine.closes_first(IPV6, port, 1)

    result = run_trace(workload, "-4", "-6", "--port", str(port))
    assert steps(result.lines(mine)) == closes_first_steps(1) + closes_first_steps(1)


def test_state_filter_old_or_new_and_repeats(lab):
    port, mine = next_port(), Mine(lab)

    def workload():
        mine.closes_first(IPV4, port, 3)
        mine.refused(IPV4, port, 2)

    result = run_trace(workload, "--port", str(port), "--state", "close_wait",
                       "--state", "SYN-SENT")
    assert steps(result.lines(mine)) == Counter({
        ("established", "close_wait"): 3, ("close_wait", "last_ack"): 3,
        ("close", "syn_sent"): 5, ("syn_sent", "established"): 3, ("syn_sent", "close"): 2})


def test_transition_filter(lab):
    port, mine = next_port(), Mine(lab)

    def workload():
        mine.closes_first(IPV4, port, 3)
        mine.refused(IPV4, port, 2)

    result = run_trace(workload, "--port", str(port), "--transition", "syn_sent:close",
                       "--transition", "close:listen")
    assert steps(result.lines(mine)) == Counter({("syn_sent", "close"): 2,
                                                 ("close", "listen"): 1})


def test_min_ms_filter(lab):
    """Only transitions out of a state held at least that long; a state whose
    start was not seen (a socket's birth) never passes."""
    port, mine = next_port(), Mine(lab)

    def workload():
        with mine.listener(IPV4, port) as listener:
            held = mine.connect(IPV4, port)
            held_server, _ = listener.accept()
            time.sleep(0.3)
            for _ in range(3):  # short-lived ones
                client = mine.connect(IPV4, port)
                server, _ = listener.accept()
                client.close()
                server.recv(1)
                server.close()
            held.close()
            held_server.recv(1)
            held_server.close()

    result = run_trace(workload, "--port", str(port), "--min-ms", "250")
    assert steps(result.lines(mine)) == Counter({("established", "fin_wait1"): 1,
                                                 ("established", "close_wait"): 1,
                                                 ("listen", "close"): 1})


# ---------------------------------------------------------------- owners

class Child:
    """A python process inside a namespace, named `comm`, that runs `body`
    once told to and then one step per `proceed()`, saying what it did."""

    PRELUDE = """
        import socket, sys
        open("/proc/self/comm", "w").write({comm!r})
        def say(word): print(word, flush=True)
        def wait(): sys.stdin.readline()
        wait()
    """

    def __init__(self, namespace: str, comm: str, body: str):
        self.comm = comm
        code = textwrap.dedent(self.PRELUDE.format(comm=comm)) + textwrap.dedent(body)
        # `ip netns exec` enters the namespace and execs python: the same pid
        self.process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, sys.executable, "-c", code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.process.pid

    def proceed(self) -> None:
        self.process.stdin.write("\n")
        self.process.stdin.flush()

    def expect(self, word: str, timeout: float = 10) -> None:
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        assert ready, f"{self.comm}: no {word!r} in time"
        assert self.process.stdout.readline().strip() == word

    def __enter__(self) -> "Child":
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def test_owner_of_connecting_and_listening_processes_and_pid_filter(lab):
    """Real processes connect and listen: their sockets carry their pid and
    name. The server's child shows no owner until its owner acts: its
    handshake runs in softirq, where the current task is whoever was
    interrupted (here, likely the connecting process), never its owner."""
    port, cport, mine = next_port(), next(_client_ports), Mine(lab)
    mine.pairs |= {(port, 0), (cport, port)}
    server_ip, client_ip = lab.address(IPV4, "server"), lab.address(IPV4, "client")
    listening = Child(lab.server, "tcpst-listen", f"""
        s = socket.socket(socket.AF_INET)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("{server_ip}", {port})); s.listen(); say("listening")
        conn, _ = s.accept(); say("accepted")
        wait(); conn.close(); s.close(); say("closed")
    """)
    connecting = Child(lab.client, "tcpst-conn", f"""
        c = socket.socket(socket.AF_INET); c.bind(("{client_ip}", {cport}))
        c.connect(("{server_ip}", {port})); say("connected")
        wait(); c.close(); say("closed")
    """)
    with listening, connecting:
        with Trace("--port", str(port)) as everyone, \
                Trace("--port", str(port), "--pid", str(connecting.pid)) as by_pid, \
                Trace("--port", str(port), "--pid", f"{listening.pid},{connecting.pid}",
                      "--pid", str(os.getpid())) as by_pids:
            listening.proceed()
            listening.expect("listening")
            connecting.proceed()
            connecting.expect("connected")
            listening.expect("accepted")
            connecting.proceed()
            connecting.expect("closed")
            listening.proceed()
            listening.expect("closed")
            everyone, by_pid, by_pids = everyone.stop(), by_pid.stop(), by_pids.stop()

    lines = everyone.lines(mine)
    assert len(lines) == 12
    listener_socket = [line for line in lines if line.rport == 0]
    client_socket = [line for line in lines if line.rport == port]
    child_socket = [line for line in lines if line.lport == port and line.rport == cport]
    assert len(listener_socket) == 2 and len(client_socket) == 5 and len(child_socket) == 5
    assert {(l.pid, l.comm) for l in listener_socket} == {(listening.pid, "tcpst-listen")}
    assert {(l.pid, l.comm) for l in client_socket} == {(connecting.pid, "tcpst-conn")}
    assert {line.step: (line.pid, line.comm) for line in child_socket} == {
        ("listen", "syn_recv"): (None, None),
        ("syn_recv", "established"): (None, None),
        ("established", "close_wait"): (None, None),
        ("close_wait", "last_ack"): (listening.pid, "tcpst-listen"),
        ("last_ack", "close"): (listening.pid, "tcpst-listen")}
    # --pid: only sockets known to be owned by one of those processes
    assert by_pid.lines(mine) == client_socket
    assert same_lines(by_pids.lines(mine), [line for line in lines if line.pid is not None])


def test_pid_filter_never_matches_through_an_interrupted_process(lab):
    """The test process connects; the server child's handshake and FIN run
    in softirq on its behalf, yet --pid <this process> shows the child only
    once this process closes it: the owner, not the current task, counts."""
    port, mine = next_port(), Mine(lab)

    def workload():
        with mine.listener(IPV4, port) as listener:
            client = mine.connect(IPV4, port)
            server, _ = listener.accept()
            client.close()
            server.recv(1)  # the child, not owned by anyone known yet, is in CLOSE-WAIT
            server.close()

    result = run_trace(workload, "--port", str(port), "--pid", str(os.getpid()))
    lines = result.lines(mine)
    assert all(line.pid == os.getpid() for line in result.lines())
    assert steps(lines) == closes_first_steps(1) - Counter({
        ("listen", "syn_recv"): 1, ("syn_recv", "established"): 1,
        ("established", "close_wait"): 1})


IPPROTO_MPTCP = 262


def test_a_kernel_worker_is_never_an_owner(lab):
    """MPTCP closes its TCP subflows from a kernel worker (kworker), in
    process context: the subflows keep the owner that connected, and the
    server's, never owned by a known process, stay without one."""
    port, mine = next_port(), Mine(lab)
    cport = next(_client_ports)
    mine.pairs |= {(port, 0), (cport, port)}
    server_ip = lab.address(IPV4, "server")

    def mptcp(side: str) -> socket.socket:
        with inside(lab.server if side == "server" else lab.client):
            try:
                return socket.socket(IPV4, socket.SOCK_STREAM, IPPROTO_MPTCP)
            except OSError as exc:
                pytest.skip(f"no MPTCP here: {exc}")

    def workload():
        with mptcp("server") as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((server_ip, port))
            listener.listen()
            client = mptcp("client")
            client.bind((lab.address(IPV4, "client"), cport))
            client.connect((server_ip, port))
            server, _ = listener.accept()
            client.close()
            server.recv(1)
            server.close()

    lines = run_trace(workload, "--port", str(port)).lines(mine)
    client_side = [line for line in lines if line.lport == cport]
    child = [line for line in lines if line.rport == cport]
    assert len(client_side) >= 5 and len(child) == 5
    assert {(line.pid, line.comm) for line in client_side} == {(os.getpid(), my_comm())}
    assert {(line.pid, line.comm) for line in child} == {(None, None)}


def test_destroying_a_listener_does_not_make_the_destroyer_its_owner(lab):
    """`ss -K` closes a listener (SOCK_DESTROY, tcp_abort) from the ss
    process: the LISTEN -> CLOSE line still names the process that listened."""
    port, mine = next_port(), Mine(lab)

    def workload():
        listener = mine.listener(IPV4, port)
        run("ip", "netns", "exec", lab.server, "ss", "-K", "-t", "state", "listening",
            f"( sport = :{port} )")
        listener.close()

    lines = run_trace(workload, "--lport", str(port)).lines(mine)
    # then close() of the destroyed socket: CLOSE -> CLOSE, once more
    assert [(line.step, line.pid, line.comm) for line in lines] == [
        (("close", "listen"), os.getpid(), my_comm()),
        (("listen", "close"), os.getpid(), my_comm()),
        (("close", "close"), None, None),
    ]


# ---------------------------------------------------------------- JSON

def test_json_records_carry_every_field(lab):
    port, mine = next_port(), Mine(lab)
    started_ns, mono_start = time.time_ns(), time.monotonic_ns()

    def workload():
        mine.closes_first(IPV4, port, 2)
        mine.closes_first(IPV6, port, 1)

    result = run_trace(workload, "--json", "--port", str(port))
    records = result.records(mine)
    assert len(records) == (2 + 2 * 10) + (2 + 10)  # a listener and 10 per connection
    fields = {"time", "timestamp_ns", "monotonic_ns", "pid", "comm", "family",
              "local_address", "local_port", "remote_address", "remote_port",
              "old_state", "old_state_code", "old_state_mib",
              "new_state", "new_state_code", "new_state_mib",
              "duration_ns", "lifetime_ns", "side", "reason", "socket_id"}
    for record in records:
        assert set(record) == fields
        # closes ended normally here (hand-off, last ACK, a listener's close)
        assert record["reason"] == ("normal" if record["new_state"] == "close" else None)
        for end in ("old", "new"):
            state = BY_NAME[record[f"{end}_state"]]
            assert record[f"{end}_state_code"] == state.kernel_code
            assert record[f"{end}_state_mib"] == state.mib_code
        assert record["family"] in FAMILY_NAMES
        assert started_ns < record["timestamp_ns"] < time.time_ns()
        assert mono_start < record["monotonic_ns"] < time.monotonic_ns()
        # one wall-clock offset: the same as ours, to within scheduling noise
        assert abs(record["timestamp_ns"] - record["monotonic_ns"]
                   - (started_ns - mono_start)) < 50_000_000
        assert record["time"].endswith("Z") and record["time"][:19] == time.strftime(
            "%Y-%m-%dT%H:%M:%S", time.gmtime(record["timestamp_ns"] // 10**9))
        assert re.fullmatch(r"[0-9a-f]{16}", record["socket_id"])
        assert (record["pid"] is None) == (record["comm"] is None)
        assert isinstance(record["local_port"], int) and isinstance(record["remote_port"], int)
        if record["duration_ns"] is not None:
            assert 0 <= record["duration_ns"] <= record["lifetime_ns"]
    v6 = [r for r in records if r["family"] == "ipv6"]
    assert len(v6) == 12 and {r["local_address"] for r in v6} == {
        lab.address(IPV6, "client"), lab.address(IPV6, "server")}
    # 3 connections, 2 listeners: an id per socket, though the kernel reuses
    # socket memory; each client's and each child's five records share one
    assert sorted(Counter(r["socket_id"] for r in records).values()) == [2, 2] + [5] * 6
    assert Counter(r["side"] for r in records) == {"client": 15, "server": 15, None: 4}
    assert all(r["side"] == "client" for r in records if r["new_state"] == "syn_sent")
    assert all(r["lifetime_ns"] == 0 and r["duration_ns"] is None
               for r in records if r["old_state"] == "close")


def test_a_port_bound_after_the_first_event_keeps_its_birth_and_owner(lab):
    """A client that connects without bind() has local port 0 in its
    CLOSE -> SYN_SENT event: the kernel picks the port just after. An
    --lport filter on that port cannot match the first event, yet the
    kernel must still record the socket's birth, entry time and owner then,
    so that its later lines carry them; a filter that never matches the
    socket prints none of its events."""
    port = next_port()
    # The client's namespace hands out these two ephemeral ports only.
    ephemeral = (41000, 41001)
    with inside(lab.client):
        saved = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        Path("/proc/sys/net/ipv4/ip_local_port_range").write_text("%d %d" % ephemeral)
    try:
        with lab.listener(IPV4, port) as listener, \
                Trace("--json", "--lport", ",".join(map(str, ephemeral))) as wanted, \
                Trace("--json", "--lport", "41002", "--rport", str(port)) as unwanted:
            client = lab.socket("client", IPV4)
            client.connect((lab.address(IPV4, "server"), port))
            client_port = client.getsockname()[1]
            server, _ = listener.accept()
            time.sleep(0.01)
            client.close()
            assert server.recv(1) == b""
            server.close()
            wanted, unwanted = wanted.stop(), unwanted.stop()
    finally:
        with inside(lab.client):
            Path("/proc/sys/net/ipv4/ip_local_port_range").write_text(saved)
    assert client_port in ephemeral
    records = [r for r in wanted.records()
               if (r["local_port"], r["remote_port"]) == (client_port, port)]
    assert [(r["old_state"], r["new_state"]) for r in records] == [
        ("syn_sent", "established"), ("established", "fin_wait1"),
        ("fin_wait1", "fin_wait2"), ("fin_wait2", "close")]
    for record in records:
        assert record["side"] == "client"
        assert record["pid"] == os.getpid() and record["comm"] == my_comm()
        assert 0 <= record["duration_ns"] <= record["lifetime_ns"]
    assert len({r["socket_id"] for r in records}) == 1
    assert not [r for r in unwanted.records() if port in (r["local_port"], r["remote_port"])]


def test_json_socket_ids_and_durations(lab):
    port, mine = next_port(), Mine(lab)
    held = 0.3

    def workload():
        with mine.listener(IPV4, port) as listener:
            client = mine.connect(IPV4, port)
            server, _ = listener.accept()
            time.sleep(held)
            client.close()
            server.recv(1)
            server.close()

    records = run_trace(workload, "--json", "--port", str(port)).records(mine)
    by_socket: dict[str, list[dict]] = {}
    for record in records:
        by_socket.setdefault(record["socket_id"], []).append(record)
    lives = sorted([(r["old_state"], r["new_state"]) for r in group]
                   for group in by_socket.values())
    assert lives == sorted([
        [("close", "listen"), ("listen", "close")],
        [("close", "syn_sent"), ("syn_sent", "established"), ("established", "fin_wait1"),
         ("fin_wait1", "fin_wait2"), ("fin_wait2", "close")],
        [("listen", "syn_recv"), ("syn_recv", "established"), ("established", "close_wait"),
         ("close_wait", "last_ack"), ("last_ack", "close")],
    ])
    by_step = {(r["old_state"], r["new_state"]): r for r in records}
    established = by_step[("established", "fin_wait1")]
    assert held * 1e9 <= established["duration_ns"] < (held + 0.2) * 1e9
    assert established["lifetime_ns"] >= established["duration_ns"]
    assert by_step[("close", "listen")]["side"] is None
    assert by_step[("listen", "syn_recv")]["side"] == "server"
    # ids are keyed per run: another run names its sockets differently
    again = run_trace(lambda: mine.refused(IPV4, port, 1), "--json", "--port", str(port))
    assert not set(by_socket) & {r["socket_id"] for r in again.records(mine)}


# ---------------------------------------------------------------- summary, stop, loss

def test_summary_matrix_equals_printed_events_on_sigterm(lab):
    port, mine = next_port(), Mine(lab)
    with Trace("--port", str(port)) as trace:
        mine.closes_first(IPV4, port, 20)
        mine.refused(IPV6, port, 5)
        result = trace.stop(signal.SIGTERM)
    assert result.returncode == 0
    assert steps(result.lines(mine)) == closes_first_steps(20) + Counter(
        {step: 5 for step in REFUSED_STEPS})
    assert_summary_matches(result)


def test_count_stops_and_summarises(lab):
    port, mine = next_port(), Mine(lab)
    with Trace("--port", str(port), "--count", "7") as trace:
        mine.closes_first(IPV4, port, 3)
        result = trace.wait()
    assert result.returncode == 0
    assert len(result.body) == 7
    assert_summary_matches(result)


def test_duration_stops_by_itself():
    with Trace("--port", str(next_port()), "--duration", "0.5") as trace:
        result = trace.wait(timeout=30)
    assert result.returncode == 0
    assert result.summary()[1] == 0


def test_lost_events_are_counted_exactly(lab):
    """A one-page ring buffer, and no drain while a burst runs: every event
    that passed the filters is either printed or counted as lost."""
    port, mine, n = next_port(), Mine(lab), 100
    client_ports = [next(_client_ports) for _ in range(n)]
    # the server children of our clients: nobody else's socket can match both
    rports = ",".join(map(str, client_ports))
    with Trace("--lport", str(port), "--rport", rports, "--ringbuf-pages", "1") as trace:
        trace.process.send_signal(signal.SIGSTOP)
        try:
            with mine.listener(IPV4, port) as listener:
                for client_port in client_ports:
                    client = lab.socket("client", IPV4)
                    client.bind((lab.address(IPV4, "client"), client_port))
                    client.connect((lab.address(IPV4, "server"), port))
                    server, _ = listener.accept()
                    client.close()
                    server.recv(1)
                    server.close()
        finally:
            trace.process.send_signal(signal.SIGCONT)
        result = trace.stop()
    printed, lost, missed, matrix = result.summary()
    assert lost > 0, "one page held the whole burst: the test proves nothing"
    assert printed == len(result.body)
    assert printed + lost == n * 5  # listen>syn_recv>established>close_wait>last_ack>close
    assert matrix == steps(result.lines())
    assert all(line.lport == port and line.rport in client_ports for line in result.lines())


def test_nothing_leaks_before_the_filters_are_written(lab):
    """bcc attaches the program as it loads it, before the filters can be
    written: meanwhile it must match nothing. A churn on another port runs
    throughout; a trace filtered on unused ports prints nothing."""
    busy, unused, unused_too = next_port(), next_port(), next_port()
    stop = threading.Event()

    refusals = []
    # bound below the ephemeral range, which would in time hit `unused` too
    client_ports = itertools.cycle(range(10000, 20000))

    def churn():
        while not stop.is_set():
            with lab.socket("client", IPV4) as client:
                client.bind((lab.address(IPV4, "client"), next(client_ports)))
                try:
                    client.connect((lab.address(IPV4, "server"), busy))
                except ConnectionRefusedError:
                    refusals.append(1)

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        results = []
        for _ in range(3):
            # both ports of one socket: no one's socket matches by chance
            with Trace("--lport", str(unused), "--rport", str(unused_too)) as trace:
                results.append(trace.stop())
    finally:
        stop.set()
        worker.join()
    assert len(refusals) > 100  # events all along
    for result in results:
        assert result.body == [] and result.summary()[:2] == (0, 0)


# ---------------------------------------------------------------- pipes

def test_closed_pipe_ends_the_trace_at_once(lab):
    """The reader of the output goes away: trace exits, though no further
    event comes to be written, and prints its summary, no traceback."""
    port, mine = next_port(), Mine(lab)
    with Trace("--port", str(port)) as trace:
        mine.closes_first(IPV4, port, 1)
        assert all(trace.process.stdout.readline() for _ in range(3))
        trace.process.stdout.close()
        trace.process.stdout = None
        assert trace.process.wait(timeout=10) == 0
        stderr = trace.process.stderr.read()
    assert "Traceback" not in stderr and "Exception" not in stderr
    assert SUMMARY.search(stderr)


def test_head_in_a_shell_pipeline(lab):
    """`tcpstate trace | head -5` ends as soon as head has its lines."""
    port, mine = next_port(), Mine(lab)
    shell = subprocess.Popen(
        ["bash", "-c", f"{TCPSTATE} trace --port {port} | head -5; "
                       "echo \"status ${PIPESTATUS[*]}\" >&2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # events until the pipeline is over, however long trace takes to start
        while shell.poll() is None and time.monotonic() < deadline:
            mine.refused(IPV4, port, 1)
            time.sleep(0.1)
        stdout, stderr = shell.communicate(timeout=10)
    finally:
        if shell.poll() is None:
            shell.kill()
    assert len(stdout.splitlines()) == 5
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert "status 0 0" in stderr
