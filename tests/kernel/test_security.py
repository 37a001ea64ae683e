"""Who may read the metrics, with what privileges the daemon runs, and what
it tells: TLS and basic auth from --web.config.file (checked by hand and by
a real Prometheus), --run-as dropping root and every capability while the
program keeps counting, and an exposition of bounded, address-free labels.
Service ports 47320-47339.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import urllib.parse
import time
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from tracer import metrics as m
from tracer.reasons import REASONS
from tracer.states import FAMILIES, SIDES, STATES
from tracer.collector import BUCKET_LABELS

from ..unit.pki import make_pki
from ..unit.test_series_bound import real_bound
from .exporter import Exporter, free_port, prog_ids_of
from .netlab import ADDRESSES, wait_for
from .test_serve import delta, transitions_of
from .workload import client_closes_first, reset

USER, PASSWORD = "prometheus", "s3cret-scrape"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """An exporter with TLS and basic auth (bcrypt cost 10, as operators use)."""
    directory = tmp_path_factory.mktemp("web")
    pki = make_pki(directory)
    config = directory / "web.yml"
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(10)).decode()
    config.write_text(f"tls_server_config:\n  cert_file: {pki.server_cert.name}\n"
                      f"  key_file: {pki.server_key.name}\n"
                      f"basic_auth_users:\n  {USER}: '{hashed}'\n")
    context = ssl.create_default_context(cafile=str(pki.ca))
    with Exporter("--web.config.file", str(config), service_ports=(47320,),
                  ssl_context=context, headers=basic(USER, PASSWORD)) as exporter:
        yield exporter, pki, context


def request(port: int, path: str = "/metrics", context: ssl.SSLContext | None = None,
            headers: dict | None = None, method: str = "GET") -> tuple[int, str]:
    connection = (http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
                  if context else http.client.HTTPConnection("127.0.0.1", port, timeout=10))
    try:
        connection.request(method, path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_plain_http_is_refused_when_tls_is_on(secured):
    exporter, _, _ = secured
    status, body = request(exporter.port, headers=basic(USER, PASSWORD))
    assert status == 400 and "HTTPS" in body and "tcpstate_" not in body


def test_basic_auth_wrong_password_401_right_one_metrics(secured):
    exporter, _, context = secured
    for headers in ({}, basic(USER, "wrong"), basic("root", PASSWORD)):
        for path in ("/metrics", "/-/healthy", "/"):
            status, body = request(exporter.port, path, context, headers)
            assert status == 401 and "tcpstate_" not in body, (headers, path)
    status, body = request(exporter.port, "/metrics", context, basic(USER, PASSWORD))
    assert status == 200 and m.TRANSITIONS in body
    assert request(exporter.port, "/-/healthy", context, basic(USER, PASSWORD)) == (200, "OK\n")


def prometheus_query(url: str, expr: str) -> list[dict]:
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}),
                                timeout=5) as answer:
        return json.load(answer)["data"]["result"]


def test_real_prometheus_scrapes_over_tls_with_basic_auth(secured, tmp_path):
    exporter, pki, _ = secured
    binary = shutil.which("prometheus")
    assert binary, "Debian's prometheus is not installed (make setup-test)"
    target = f"127.0.0.1:{exporter.port}"

    def job(name: str, password: str) -> dict:
        return {"job_name": name, "scheme": "https", "static_configs": [{"targets": [target]}],
                "tls_config": {"ca_file": str(pki.ca)},
                "basic_auth": {"username": USER, "password": password}}

    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [job("tcpstate", PASSWORD), job("intruder", "guess")],
    }))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(tmp_path / "prometheus.log", "w") as log:
        prometheus = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            def up(job_name: str) -> list:
                try:
                    return prometheus_query(url, f'up{{job="{job_name}"}}')
                except OSError:
                    return []

            assert wait_for(lambda: [r["value"][1] for r in up("tcpstate")] == ["1"],
                            timeout=60), (tmp_path / "prometheus.log").read_text()[-2000:]
            assert wait_for(lambda: bool(prometheus_query(
                url, f'{m.BUILD_INFO}{{job="tcpstate"}}')), timeout=30)
            assert wait_for(lambda: [r["value"][1] for r in up("intruder")] == ["0"],
                            timeout=30)
            assert not prometheus_query(url, f'{m.BUILD_INFO}{{job="intruder"}}')
            with urllib.request.urlopen(f"{url}/api/v1/targets", timeout=5) as answer:
                targets = json.load(answer)["data"]["activeTargets"]
            (intruder,) = [t for t in targets if t["labels"]["job"] == "intruder"]
            assert "401" in intruder["lastError"]  # turned away by basic auth, not by TLS
        finally:
            prometheus.terminate()
            prometheus.wait(30)


def status_of(pid: int | str) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as lines:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_run_as_drops_root_and_every_capability_and_keeps_counting(lab):
    """After the drop, the maps are read through memory mapped as root (no
    bpf() call, no capability), and counts stay exact; the TIME-WAIT count
    too, through /proc/PID/net."""
    port = 47321
    exporter = Exporter("--run-as", "nobody", service_ports=(port,)).start()
    try:
        pid = exporter.process.pid
        status = status_of(pid)
        assert status["Uid"].split() == ["65534"] * 4
        assert status["Gid"].split() == ["65534"] * 4
        assert status["Groups"] == ""
        for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[capabilities], 16) == 0, capabilities
        assert status["NoNewPrivs"] == "1"
        for task in os.listdir(f"/proc/{pid}/task"):  # threads started after the drop too
            task_status = status_of(f"{pid}/task/{task}")
            assert all(int(task_status[c], 16) == 0 for c in ("CapPrm", "CapEff", "CapBnd"))
        (prog_id,) = prog_ids_of(pid)

        before = transitions_of(exporter.scrape(), "ipv4", port)
        expected = (client_closes_first(lab, socket.AF_INET, port, 100)
                    + reset(lab, socket.AF_INET, port, 20))
        assert wait_for(lambda: delta(transitions_of(exporter.scrape(), "ipv4", port), before)
                        == expected)
        scrape = exporter.scrape()
        assert scrape.value(m.SCRAPE_SUCCESS, collector="bpf") == 1
        # no CAP_SYS_ADMIN: the lab's namespaces, which no process is in,
        # are left out of the TIME-WAIT count (one warning); the rest is in
        assert scrape.value(m.SCRAPE_SUCCESS, collector="time_wait") == 1
        assert [s for s in scrape.series(m.SOCKETS) if s["state"] == "time_wait"]
        assert exporter.stop(signal.SIGTERM) == 0
        # the kernel frees a detached program after a grace period
        assert wait_for(lambda: subprocess.run(["bpftool", "prog", "show", "id", str(prog_id)],
                                               capture_output=True).returncode != 0, timeout=10)
        log = exporter.log()
        assert "running as nobody with no capabilities" in log
        assert "failed" not in log and "Traceback" not in log
    finally:
        exporter.stop()


ALLOWED_LABELS = {
    m.TRANSITIONS: {"family", "old_state", "new_state", "port"},
    m.CLOSES: {"family", "old_state", "reason", "port"},
    m.STATE_DURATION: {"family", "old_state", "new_state", "port", "le"},
    m.CONNECTION_DURATION: {"family", "side", "port", "le"},
    m.SOCKETS: {"family", "state", "port"},
    m.SOCKET_STATE_AGE: {*m.SOCKET_STATE_AGE_LABELS, "port", "le"},
    m.SOCKET_STATE_AGE_UNKNOWN: {*m.SOCKET_STATE_AGE_LABELS, "port"},
    m.STATE_INFO: set(m.STATE_INFO_LABELS),
    m.BUILD_INFO: set(m.BUILD_INFO_LABELS),
    m.SCRAPE_SUCCESS: {"collector"},
    m.SCRAPE_DURATION: {"collector"},
}


def family_of(sample: str) -> str:
    for suffix in ("_bucket", "_count", "_sum", "_gcount", "_gsum"):
        if sample.endswith(suffix) and sample[: -len(suffix)] in ALLOWED_LABELS:
            return sample[: -len(suffix)]
    return sample


def test_exposes_only_bounded_labels_no_addresses_no_process_names(lab):
    ports = (47322, 47323)
    with Exporter(service_ports=ports) as exporter:
        client_closes_first(lab, socket.AF_INET, ports[0], 50)
        client_closes_first(lab, socket.AF_INET6, ports[1], 50)
        scrape = exporter.scrape()
        text = scrape.text
        port = exporter.port
        # nothing but metrics, the health check and a landing page
        assert request(port, "/-/healthy") == (200, "OK\n")
        assert request(port, "/")[0] == 200
        for path in ("/debug/pprof", "/api/v1/targets", "/metrics/../etc/passwd", "/config",
                     "/-/reload", "/proc/self/environ"):
            assert request(port, path)[0] == 404, path
        assert request(port, "/metrics", method="POST")[0] == 501
        assert request(port, "/-/quit", method="PUT")[0] == 501

    states = {s.name for s in STATES}
    values = {
        "family": set(FAMILIES) | {""},
        "old_state": states, "new_state": states, "state": states,
        "port": {"other", "", *map(str, ports)},
        "side": set(SIDES) - {""},
        "le": set(BUCKET_LABELS),
        "collector": {"bpf", "time_wait"},
        "reason": set(REASONS),
    }
    for (name, labels) in scrape:
        family = family_of(name)
        labels = dict(labels)
        assert family in ALLOWED_LABELS or not labels, name
        assert set(labels) <= ALLOWED_LABELS.get(family, set()), (name, labels)
        for label, value in labels.items():
            if label in values:
                assert value in values[label], (name, label, value)
    # no address of the lab, of loopback, no pid or command of ours
    for family_addresses in ADDRESSES.values():
        for address in family_addresses[:2]:
            assert address not in text
    assert "127.0.0.1" not in text and f'"{os.getpid()}"' not in text
    with open(f"/proc/{os.getpid()}/comm") as comm:
        assert f'"{comm.read().strip()}"' not in text
    assert len(scrape) <= real_bound(len(ports))
    build = scrape.series(m.BUILD_INFO)
    assert len(build) == 1 and build[0]["kernel"] == os.uname().release


# ---- a hostile neighbour (issue 15) ------------------------------------------
def _plain_auth_config(directory, users: dict[str, str], cost: int = 10):
    config = directory / "web.yml"
    config.write_text("basic_auth_users:\n" + "".join(
        f"  {user}: '{bcrypt.hashpw(password.encode(), bcrypt.gensalt(cost)).decode()}'\n"
        for user, password in users.items()))
    return config


def _wrong_password_flood(port: int, clients: int, stop) -> list:
    """`clients` threads, each sending a new wrong password per request
    (nothing to cache) over a kept-alive connection until `stop` is set."""
    def flood(i: int) -> None:
        n = 0
        while not stop.is_set():
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                while not stop.is_set():
                    n += 1
                    connection.request("GET", "/metrics", headers=basic(USER, f"guess {i}.{n}"))
                    connection.getresponse().read()
            except (OSError, http.client.HTTPException):
                time.sleep(0.05)

    import threading

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_during_a_wrong_password_flood_stops_it_exit_0(tmp_path, sig):
    """140 clients keep bcrypt busy; the signal may land on any thread. The
    exporter must stop at all (bench figure 8 times stopping)."""
    import threading

    config = _plain_auth_config(tmp_path, {USER: PASSWORD})
    exporter = Exporter("--web.config.file", str(config), service_ports=(47324,),
                        headers=basic(USER, PASSWORD)).start()
    stop = threading.Event()
    threads = _wrong_password_flood(exporter.port, 140, stop)
    try:
        time.sleep(3)
        assert exporter.process.poll() is None
        exporter.process.send_signal(sig)
        try:
            code = exporter.process.wait(30)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
        exporter.stop()
    assert code == 0, f"{signal.Signals(sig).name} during the flood: {code}\n{exporter.log()}"
    assert "Traceback" not in exporter.log() and "Fatal Python error" not in exporter.log()


def test_sighup_reloads_the_web_config_and_a_bad_one_keeps_the_old(tmp_path):
    config = _plain_auth_config(tmp_path, {"alice": PASSWORD}, cost=4)
    with Exporter("--web.config.file", str(config), service_ports=(47325,),
                  headers=basic("alice", PASSWORD)) as exporter:
        assert "basic auth without TLS" in exporter.log()  # warned at start
        assert request(exporter.port, headers=basic("alice", PASSWORD))[0] == 200
        _plain_auth_config(tmp_path, {"bob": PASSWORD}, cost=4)
        exporter.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: request(exporter.port, headers=basic("bob", PASSWORD))[0] == 200)
        assert request(exporter.port, headers=basic("alice", PASSWORD))[0] == 401
        config.write_text("basic_auth_users:\n  bob: x\n  bob: y\n")
        exporter.process.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload of" in exporter.log())
        failed = [line for line in exporter.log().splitlines() if "reload of" in line]
        assert len(failed) == 1 and "previous configuration stays" in failed[0]
        assert request(exporter.port, headers=basic("bob", PASSWORD))[0] == 200
        assert exporter.process.poll() is None


def test_run_as_names_the_web_config_files_a_reload_could_not_read():
    """A reload (SIGHUP) rereads the file and its certificates as the
    --run-as user: one warning at start names those it cannot read."""
    directory = Path(tempfile.mkdtemp(prefix="tcpstate-web-", dir="/tmp"))
    try:
        directory.chmod(0o755)  # reachable by the user; the files decide
        pki = make_pki(directory)
        config = directory / "web.yml"
        config.write_text(f"tls_server_config:\n  cert_file: {pki.server_cert.name}\n"
                          f"  key_file: {pki.server_key.name}\n")
        for path, mode in ((config, 0o644), (pki.server_cert, 0o644), (pki.server_key, 0o600)):
            path.chmod(mode)
        command = Exporter("--run-as=nobody", "--web.config.file", str(config),
                           "--dry-run").command

        def start() -> subprocess.CompletedProcess:
            result = subprocess.run(command, capture_output=True, text=True, timeout=180)
            assert result.returncode == 0, result.stderr
            return result

        warned = [line for line in start().stderr.splitlines() if "a reload" in line]
        assert len(warned) == 1, warned
        assert f"nobody cannot read {pki.server_key}:" in warned[0]
        assert str(pki.server_cert) not in warned[0] and str(config) not in warned[0]
        pki.server_key.chmod(0o644)
        assert "a reload" not in start().stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)
