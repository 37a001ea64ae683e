"""The lean daemon: a loader process compiles and attaches, the server only
holds descriptors. The server maps no compiler, counts after the loader has
gone on both attach paths, and no kill leaves a program behind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess

from tracer import metrics as m
from tracer.program import possible_cpus
from tracer.serve_maps import map_bytes

from .conftest import SERVICE_PORTS
from .exporter import TCPSTATE, Exporter, free_port, prog_ids_of
from .netlab import wait_for
from .test_serve import delta, transitions_of
from .workload import client_closes_first

COMPILER_LIBRARIES = ("libbcc", "libLLVM", "libclang")


def mapped_libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as maps:
        return {os.path.basename(line.split()[-1]) for line in maps
                if len(line.split()) >= 6 and ".so" in line.split()[-1]}


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def program_ids() -> set[int]:
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "-j"], check=True,
                                      capture_output=True, text=True).stdout)
    return {prog["id"] for prog in shown}


def held_program_ids() -> set[int]:
    """Programs some process holds a descriptor of (a program's or a link's)."""
    held = set()
    for pid in (entry for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            held |= prog_ids_of(int(pid))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return held


def leaked_since(first_id: int) -> set[int]:
    """Programs loaded since `first_id` that still exist though no process
    holds them: attached by nobody's leave."""
    return {i for i in program_ids() if i >= first_id} - held_program_ids()


def test_the_server_maps_no_compiler_and_counts_after_the_loader_left(exporters, lab):
    port = SERVICE_PORTS[4]
    before = {path: e.scrape() for path, e in exporters.items()}
    for path, exporter in exporters.items():
        pid = exporter.process.pid
        libraries = mapped_libraries(pid)
        assert not [name for name in libraries if name.startswith(COMPILER_LIBRARIES)], \
            (path, sorted(libraries))
        assert children_of(pid) == [], f"{path}: the loader is still there"
    expected = client_closes_first(lab, socket.AF_INET, port, 50)
    for path, exporter in exporters.items():
        assert wait_for(lambda: delta(transitions_of(exporter.scrape(), "ipv4", port),
                                      transitions_of(before[path], "ipv4", port)) == expected)
        build = exporter.scrape().series(m.BUILD_INFO)
        assert [labels["attach"] for labels in build] == [path]


def test_sigkill_of_the_server_during_the_compile_leaves_nothing():
    """The loader dies with the server (PR_SET_PDEATHSIG): killed while the
    loader compiles, neither process nor program is left."""
    server = subprocess.Popen([TCPSTATE, "serve", "--web.listen-address",
                               f"127.0.0.1:{free_port()}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def compiling() -> list[int]:
            return [child for child in children_of(server.pid)
                    if any(name.startswith("libbcc") for name in _libraries_or_none(child))]

        first_id = max(program_ids(), default=0) + 1
        assert wait_for(lambda: compiling() != [], timeout=60, interval=0.01)
        (loader,) = compiling()
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert wait_for(lambda: _dead(loader), timeout=10)
        assert wait_for(lambda: not leaked_since(first_id), timeout=10), leaked_since(first_id)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def _dead(pid: int) -> bool:
    """Gone, or a zombie: pytest is a subreaper (tests/hygiene.py), so an
    orphan's exit leaves it to be reaped here."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                return False
    except OSError:
        return True
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return True


def _libraries_or_none(pid: int) -> set[str]:
    try:
        return mapped_libraries(pid)
    except OSError:
        return set()


def test_sigkill_of_the_running_server_detaches_on_both_paths():
    for attach in ("raw_tracepoint", "tracepoint"):
        exporter = Exporter("--attach", attach).start()
        try:
            held = prog_ids_of(exporter.process.pid)
            assert len(held) == 1
            exporter.process.send_signal(signal.SIGKILL)
            exporter.process.wait(10)
            assert wait_for(lambda: not (held & program_ids()), timeout=10), attach
        finally:
            exporter.stop()


def test_the_maps_cost_what_the_formula_says(exporter):
    """map_bytes() is what README and the DaemonSet budget the maps at: it
    agrees with what the kernel charges (bpftool's bytes_memlock)."""
    (prog_id,) = prog_ids_of(exporter.process.pid)
    shown = json.loads(subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "-j"],
                                      check=True, capture_output=True, text=True).stdout)
    charged = 0
    for map_id in shown["map_ids"]:
        info = json.loads(subprocess.run(["bpftool", "map", "show", "id", str(map_id), "-j"],
                                         check=True, capture_output=True, text=True).stdout)
        charged += info["bytes_memlock"]
    capacity = exporter.scrape().value(m.SOCKET_TABLE_CAPACITY)
    expected = map_bytes(possible_cpus(), 1 + len(SERVICE_PORTS), int(capacity))
    assert abs(charged - expected) <= 0.001 * expected, (charged, expected)
