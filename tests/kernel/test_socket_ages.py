"""Ages in state and `tcpstate sockets`, with real sockets left in
CLOSE-WAIT on loopback: the gauge histogram files them in the right
buckets, sockets that predate serve are counted apart as of unknown age,
and `tcpstate sockets` finds them in serve's table (handed over its query
socket) with their owner and addresses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import pytest

from tracer import metrics as m

from .exporter import TCPSTATE, Exporter, free_port
from .netlab import scaled

AGE = m.SOCKET_STATE_AGE
UNKNOWN = m.SOCKET_STATE_AGE_UNKNOWN


def close_wait_pair(family: int, address: str, port: int):
    """A client socket left in CLOSE-WAIT: its peer (the accepted socket)
    closed, the client did not. Returns (listener, client)."""
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((address, port))
    listener.listen(8)
    client = socket.create_connection((address, port))
    accepted, _ = listener.accept()
    accepted.close()  # FIN to the client: it enters CLOSE-WAIT
    deadline = time.monotonic() + scaled(5)
    while time.monotonic() < deadline and not _in_close_wait(client):
        time.sleep(0.01)
    assert _in_close_wait(client)
    return listener, client


def _in_close_wait(sock: socket.socket) -> bool:
    TCP_INFO_STATE = 0  # first byte of struct tcp_info
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[TCP_INFO_STATE] == 8


def sockets_json(query_socket: str, *args: str) -> list[dict]:
    result = subprocess.run([TCPSTATE, "sockets", "--query-socket", query_socket, "--json",
                             *args], capture_output=True, text=True, timeout=scaled(60))
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.fixture
def ports():
    return free_port(), free_port()


def test_close_wait_ages_and_tcpstate_sockets(tmp_path, ports):
    aged_port, early_port = ports
    query = str(tmp_path / "run" / "serve.sock")
    # left in CLOSE-WAIT before serve starts: its entry time is never seen
    early = close_wait_pair(socket.AF_INET, "127.0.0.1", early_port)
    with Exporter("--query-socket", query, service_ports=[aged_port, early_port]) as exporter:
        assert oct(os.stat(query).st_mode & 0o777) == "0o600"
        v4 = close_wait_pair(socket.AF_INET, "127.0.0.1", aged_port)
        v6 = close_wait_pair(socket.AF_INET6, "::1", aged_port)
        time.sleep(1.2)
        scrape = exporter.scrape()
        for family in ("ipv4", "ipv6"):
            labels = dict(family=family, state="close_wait", port=str(aged_port))
            assert scrape.value(f"{AGE}_gcount", **labels) == 1, scrape.text
            assert scrape.value(f"{AGE}_bucket", **labels, le="+Inf") == 1
            # in CLOSE-WAIT for 1.2 s at least: above every bucket up to 2**30 ns
            assert scrape.value(f"{AGE}_bucket", **labels, le="1.073741824") == 0
            assert scrape.value(f"{AGE}_bucket", **labels, le="549.755813888") == 1
            assert scrape.value(f"{AGE}_gsum", **labels) >= 1.2
            assert scrape.value(UNKNOWN, **labels) == 0
        # the one that predates serve: an unknown age, never a 0 s one
        early_labels = dict(family="ipv4", state="close_wait", port=str(early_port))
        assert scrape.value(UNKNOWN, **early_labels) == 1
        assert (f"{AGE}_gcount", frozenset(early_labels.items())) not in scrape

        listed = sockets_json(query, "--state", "close_wait", "--older-than", "1s")
        ours = {(item["local"], item["local_port"]): item for item in listed
                if item["remote_port"] == aged_port}
        for client, address in ((v4[1], "127.0.0.1"), (v6[1], "::1")):
            item = ours[(address, client.getsockname()[1])]
            assert item["pid"] == os.getpid() and item["command"]
            assert item["remote"] == address and item["state"] == "close_wait"
            assert item["netns"] == os.stat("/proc/self/ns/net").st_ino
            assert 1.2 <= item["age_seconds"] < scaled(60)
            assert item["lifetime_seconds"] >= item["age_seconds"]
        # not in the table: serve never saw its entry into CLOSE-WAIT
        assert not [item for item in listed if item["remote_port"] == early_port]
        ages = [item["age_seconds"] for item in listed]
        assert ages == sorted(ages, reverse=True)  # oldest first
        assert not [item for item in sockets_json(query, "--older-than", "1h")
                    if item["remote_port"] == aged_port]
        by_pid = sockets_json(query, "--pid", str(os.getpid()), "--port", str(aged_port))
        assert {item["state"] for item in by_pid} >= {"close_wait", "listen"}
        text = subprocess.run([TCPSTATE, "sockets", "--query-socket", query, "--port",
                               str(aged_port)], capture_output=True, text=True,
                              timeout=scaled(60))
        assert text.returncode == 0 and f"127.0.0.1:{aged_port}" in text.stdout, text.stderr
        for sock in (*v4, *v6):
            sock.close()
    for sock in early:
        sock.close()
    # serve is gone: one line, non-zero
    gone = subprocess.run([TCPSTATE, "sockets", "--query-socket", query],
                          capture_output=True, text=True, timeout=scaled(60))
    assert gone.returncode == 10 and gone.stdout == ""
    assert gone.stderr.startswith("tcpstate: no tcpstate serve is running")
    assert len(gone.stderr.splitlines()) == 1


def test_bad_older_than_is_one_line_and_exit_2():
    for bad in ("10", "1x", "-5m", "m", ""):
        result = subprocess.run([TCPSTATE, "sockets", "--older-than", bad],
                                capture_output=True, text=True, timeout=scaled(60))
        assert result.returncode == 2, (bad, result.stderr)
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
