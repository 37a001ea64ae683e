"""Each network namespace is read once, through /proc/PID/net of a process
in it (no privilege), or, for an `ip netns` namespace no process is in,
from inside with setns (CAP_SYS_ADMIN): tracer/netns.py.

Lab namespaces of this test (netlab's `tcpst-<pid>-` names, removed even when
a test fails) hold TIME-WAIT sockets made on their own loopback; the counts
read each way are compared namespace by namespace, so other sessions'
traffic on the host does not matter.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time

import pytest

from tracer import netns

from .netlab import PREFIX, run
from .test_least_privilege import NOBODY

_serial = itertools.count()

# Run inside a namespace: `count` connections on its loopback that the
# client closes first, so each leaves one TIME-WAIT socket (for 60 s).
MAKE_TIME_WAIT = """
import socket, sys, time
count = int(sys.argv[1])
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(count)
for _ in range(count):
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    client.close()
    time.sleep(0.01)  # the FIN arrives
    accepted.close()
server.close()
"""


class Namespace:
    """A named lab namespace with its loopback up, and `holders` processes
    in it (none: only its /run/netns file holds it)."""

    def __init__(self, holders: int):
        self.name = f"{PREFIX}{os.getpid()}-ns{next(_serial)}"
        run("ip", "netns", "add", self.name)
        self.processes: list[subprocess.Popen] = []
        try:
            run("ip", "-n", self.name, "link", "set", "lo", "up")
            for _ in range(holders):
                self.processes.append(subprocess.Popen(
                    ["ip", "netns", "exec", self.name, "sleep", "300"]))
            for process in self.processes:
                _wait_until_inside(process.pid, self.inode())
        except BaseException:
            self.close()
            raise

    def inode(self) -> int:
        return os.stat(f"/run/netns/{self.name}").st_ino

    def sockstat_inode(self) -> int:
        """namespace_id() inside the namespace."""
        return int(self.run_python("import os; print(os.stat("
                                   "'/proc/thread-self/net/sockstat').st_ino)"))

    def run_python(self, code: str, *args: str) -> str:
        return run("ip", "netns", "exec", self.name, sys.executable, "-c", code, *args)

    def make_time_wait(self, count: int) -> None:
        self.run_python(MAKE_TIME_WAIT, str(count))

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


def _wait_until_inside(pid: int, inode: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, f"process {pid} did not enter its namespace"
        time.sleep(0.02)


@pytest.fixture
def namespaces():
    made: list[Namespace] = []

    def make(holders: int) -> Namespace:
        made.append(Namespace(holders))
        return made[-1]

    yield make
    for namespace in made:
        namespace.close()


def _through_setns() -> dict[int, int]:
    """TIME-WAIT by namespace_id, each namespace entered with setns."""
    return dict(netns.in_every_namespace(lambda: (netns.namespace_id(), netns.read_time_wait())))


def _proc_ids() -> set[int]:
    """namespace_id of every process's namespace."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.add(netns.namespace_id(f"/proc/{pid}/net"))
        except OSError:
            continue
    return found


def _reads() -> tuple[dict[int, int], dict[int, list[str]]]:
    """each_namespace's TIME-WAIT counts, and where it read each namespace."""
    where: dict[int, list[str]] = {}

    def read(net_dir: str) -> int:
        where.setdefault(netns.namespace_id(net_dir), []).append(net_dir)
        return netns.read_time_wait(net_dir)

    return netns.each_namespace(read), where


def test_time_wait_through_proc_equals_the_setns_walk_in_each_namespace(namespaces):
    labs = [namespaces(holders=1), namespaces(holders=2)]
    for count, lab in zip((3, 5), labs):
        lab.make_time_wait(count)
    ids = [lab.sockstat_inode() for lab in labs]
    through_proc, where = _reads()
    through_setns = _through_setns()
    assert [through_proc[i] for i in ids] == [through_setns[i] for i in ids] == [3, 5]
    for lab, inode in zip(labs, ids):  # through a process in it, not entered
        (net_dir,) = where[inode]
        assert net_dir in {f"/proc/{process.pid}/net" for process in lab.processes}


def test_a_namespace_of_many_processes_is_read_once(namespaces):
    lab = namespaces(holders=4)
    lab_id = lab.sockstat_inode()
    holders = {f"/proc/{process.pid}/net" for process in lab.processes}
    # every holder's sockstat has the namespace's inode, and no other does
    assert {netns.namespace_id(path) for path in holders} == {lab_id}
    assert netns.namespace_id("/proc/self/net") != lab_id
    _, where = _reads()
    assert all(len(dirs) == 1 for dirs in where.values()), "a namespace was read twice"
    assert where[lab_id][0] in holders


def test_a_namespace_only_ip_netns_holds_is_entered_with_setns(namespaces):
    lab = namespaces(holders=0)
    lab.make_time_wait(4)
    lab_id = lab.sockstat_inode()
    assert lab_id not in _proc_ids()  # no process is in it
    counts, where = _reads()
    assert where[lab_id] == [netns.OWN_NET]  # read from inside
    assert counts[lab_id] == 4 == _through_setns()[lab_id]


# Without CAP_SYS_ADMIN: TIME-WAIT by namespace, as JSON, warnings on stderr.
READ_AS_OTHER_USER = (
    "import json, logging; logging.basicConfig(); from tracer import netns; "
    "print(json.dumps(netns.each_namespace(netns.read_time_wait))); "
    "print(json.dumps(netns.each_namespace(netns.read_time_wait)))")


def test_without_privilege_held_namespaces_are_read_and_ip_netns_ones_left_out_once(
        namespaces, staged):
    held, named_only = namespaces(holders=1), namespaces(holders=0)
    held.make_time_wait(2)
    named_only.make_time_wait(3)
    python = staged.root / "venv" / "bin" / "python"
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
         "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs",
         str(python), "-c", READ_AS_OTHER_USER],
        capture_output=True, text=True, timeout=120, cwd="/")
    assert result.returncode == 0, result.stderr
    first, second = ({int(k): v for k, v in json.loads(line).items()}
                     for line in result.stdout.splitlines())
    assert first[held.sockstat_inode()] == second[held.sockstat_inode()] == 2
    assert named_only.sockstat_inode() not in first
    assert result.stderr.count("cannot enter the network namespace") == 1, result.stderr
    assert "Operation not permitted" in result.stderr and "left out" in result.stderr
    assert "Traceback" not in result.stderr
