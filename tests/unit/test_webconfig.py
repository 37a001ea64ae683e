"""--web.config.file: the exporter-toolkit format is read strictly, every
mistake is one line and exit 2, and TLS, client certificates and basic auth
are enforced by the HTTP server (here on a registry with no BPF)."""

from __future__ import annotations

import base64
import http.client
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import bcrypt
import pytest
from prometheus_client import CollectorRegistry, Counter

from tracer.errors import EXIT_USAGE, UsageError
from tracer.http_server import bind
from tracer.webconfig import load_web_config

from .pki import make_pki

TCPSTATE = str(Path(sys.executable).with_name("tcpstate"))
PASSWORD = "correct horse"
# cost 4, the least bcrypt allows: these tests check logic, not bcrypt's cost
HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "web.yml"
    path.write_text(text)
    return path


def tls_section(pki, extra: str = "") -> str:
    return (f"tls_server_config:\n  cert_file: {pki.server_cert}\n"
            f"  key_file: {pki.server_key}\n{extra}")


def test_full_config_loads(tmp_path, pki):
    config = load_web_config(str(write(tmp_path, tls_section(
        pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"
             "  min_version: TLS13\n")
        + f"basic_auth_users:\n  alice: '{HASH}'\n"
        + "http_server_config:\n  http2: false\n  headers:\n    X-Frame-Options: deny\n")))
    assert config.scheme == "https"
    assert config.tls.verify_mode == ssl.CERT_REQUIRED
    assert config.tls.minimum_version == ssl.TLSVersion.TLSv1_3
    assert set(config.auth.users) == {"alice"}
    assert config.headers == {"X-Frame-Options": "deny"}


def test_paths_are_relative_to_the_file(tmp_path, pki):
    (tmp_path / "conf").mkdir()
    for source in (pki.server_cert, pki.server_key):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    path = tmp_path / "conf" / "web.yml"
    path.write_text(f"tls_server_config:\n  cert_file: ../{pki.server_cert.name}\n"
                    f"  key_file: ../{pki.server_key.name}\n")
    assert load_web_config(str(path)).tls is not None


def test_empty_file_means_plain_http_without_auth(tmp_path):
    config = load_web_config(str(write(tmp_path, "")))
    assert config.tls is None and config.auth is None and config.scheme == "http"


MALFORMED = [
    ("tls_server_config: [\n", "line 2"),
    ("- just\n- a list\n", "top level: expected a mapping"),
    ("tls_server_cofnig: {}\n", "'tls_server_cofnig' is not supported"),
    ("tls_server_config:\n  cert_file: /nonexistent.pem\n  key_file: /nonexistent.key\n",
     "'/nonexistent.pem' is not a readable file"),
    ("basic_auth_users:\n  alice: plaintext\n", "expected a bcrypt hash"),
    ("basic_auth_users:\n  'a:b': '$2y$10$mDwo.lAisC94iLAyP81MCesa29IzH37oigHC/42V2pdJlUprsJPze'\n",
     "not a valid user name"),
    ("basic_auth_users: 7\n", "basic_auth_users: expected a mapping"),
    ("http_server_config:\n  headers:\n    X-Evil: 1\n", "'X-Evil' is not supported"),
    ("http_server_config:\n  http2: maybe\n", "http2: expected true or false"),
    ("rate_limit:\n  burst: 1\n", "'rate_limit' is not supported"),
]


@pytest.mark.parametrize("text, message", MALFORMED)
def test_malformed_config_is_a_usage_error(tmp_path, text, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("$", r"\$")):
        load_web_config(str(write(tmp_path, text)))


@pytest.mark.parametrize("extra, message", [
    ("  client_auth_type: RequireAndVerifyClientCert\n", "needs client_ca_file"),
    ("  client_auth_type: RequestClientCert\n", "unverified certificates"),
    ("  client_auth_type: Sometimes\n", "'Sometimes' is not one of"),
    ("  min_version: TLS9\n", "'TLS9' is not one of"),
    ("  cipher_suites: [TLS_AES_128_GCM_SHA256]\n", "forward-secret AEAD suites only"),
    ("  cipher_suites: [TLS_RSA_WITH_AES_128_GCM_SHA256]\n", "forward-secret AEAD suites only"),
    ("  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA]\n", "forward-secret AEAD suites only"),
    ("  cipher_suites: []\n", "expected a list of suite names"),
])
def test_malformed_tls_section(tmp_path, pki, extra, message):
    with pytest.raises(UsageError, match=message):
        load_web_config(str(write(tmp_path, tls_section(pki, extra))))


def test_ca_without_a_policy_and_key_mismatch(tmp_path, pki):
    with pytest.raises(UsageError, match="client_auth_type is NoClientCert"):
        load_web_config(str(write(tmp_path, tls_section(pki, f"  client_ca_file: {pki.ca}\n"))))
    swapped = (f"tls_server_config:\n  cert_file: {pki.server_cert}\n"
               f"  key_file: {pki.client_key}\n")
    with pytest.raises(UsageError, match="cannot use the certificate or key"):
        load_web_config(str(write(tmp_path, swapped)))


@pytest.mark.parametrize("text", ["tls_server_config: [\n", "basic_auth_users:\n  a: b\n",
                                  "\x00\x01binary"])
def test_cli_malformed_file_one_line_exit_2(tmp_path, text):
    result = subprocess.run([TCPSTATE, "serve", "--web.config.file", str(write(tmp_path, text))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--web.config.file" in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_file(tmp_path):
    result = subprocess.run([TCPSTATE, "serve", "--web.config.file", str(tmp_path / "nope.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE
    assert result.stderr.count("\n") == 1 and "No such file or directory" in result.stderr


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_basic_auth_checks(tmp_path):
    auth = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n"))).auth
    assert auth.allows(basic("alice", PASSWORD))
    assert auth.allows(basic("alice", PASSWORD))  # from the cache
    for header in (basic("alice", "wrong"), basic("bob", PASSWORD), basic("alice", ""),
                   "Basic !!!", "Bearer abc", "", None, "Basic " + base64.b64encode(b"alice").decode(),
                   basic("alice", PASSWORD + "x" * 100)):
        assert not auth.allows(header), header


# ---- the HTTP server with a web config, on a plain registry -------------
@pytest.fixture
def server_for(tmp_path):
    servers = []

    def start(text: str):
        registry = CollectorRegistry()
        Counter("probe_requests", "a metric to find", registry=registry).inc()
        config = load_web_config(str(write(tmp_path, text)))
        server = bind("127.0.0.1:0", registry, "/metrics", config)
        threading.Thread(target=server.serve_until_stopped,
                         daemon=True).start()
        servers.append(server)
        return server.server_address[1]

    yield start
    for server in servers:
        server.stop()
        server.server_close()


def get(port: int, context: ssl.SSLContext | None = None, headers=None):
    if context is None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    else:
        connection = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    try:
        connection.request("GET", "/metrics", headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        connection.close()


def client_context(pki, cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert:
        context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


def test_mutual_tls(server_for, pki):
    port = server_for(tls_section(
        pki, f"  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {pki.ca}\n"))
    status, body, _ = get(port, client_context(pki))
    assert status == 200 and "probe_requests_total 1.0" in body
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, client_context(pki, cert=False))
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(pki.server_cert, pki.server_key)  # signed, but for a server
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, stranger)


def test_server_cert_checked_by_clients(server_for, pki):
    port = server_for(tls_section(pki))
    with pytest.raises(ssl.SSLCertVerificationError):
        get(port, ssl.create_default_context(cafile=str(pki.other_ca)))
    assert get(port, client_context(pki, cert=False))[0] == 200


def test_auth_and_headers_over_plain_http(server_for):
    port = server_for(f"basic_auth_users:\n  alice: '{HASH}'\n"
                      "http_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n")
    status, body, headers = get(port)
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic")
    assert "probe_requests" not in body
    assert get(port, headers={"Authorization": basic("alice", "nope")})[0] == 401
    status, body, headers = get(port, headers={"Authorization": basic("alice", PASSWORD)})
    assert status == 200 and "probe_requests_total 1.0" in body
    assert headers["X-Content-Type-Options"] == "nosniff"


# ---- hardening (issue 15) ---------------------------------------------------
@pytest.mark.parametrize("text, line", [
    ("tls_server_config: {}\nbasic_auth_users: {}\ntls_server_config:\n", 3),
    (f"basic_auth_users:\n  alice: '{HASH}'\n  alice: '{HASH}'\n", 3),
    ("http_server_config:\n  headers:\n    X-Frame-Options: deny\n    X-Frame-Options: deny\n", 4),
])
def test_a_key_given_twice_is_an_error(tmp_path, text, line):
    with pytest.raises(UsageError, match=f"line {line}: duplicate key"):
        load_web_config(str(write(tmp_path, text)))


@pytest.mark.parametrize("name, value, message", [
    ("Content-Security-Policy", "default-src 'sélf'", "visible ASCII"),
    ("Content-Security-Policy", "a\tb", "visible ASCII"),
    ("X-Frame-Options", "allowall", "not one of deny, sameorigin"),
    ("X-Content-Type-Options", "sniff", "not one of nosniff"),
])
def test_header_values_are_visible_ascii_and_allowed(tmp_path, name, value, message):
    with pytest.raises(UsageError, match=message):
        load_web_config(str(write(tmp_path, f"http_server_config:\n  headers:\n"
                                            f"    {name}: \"{value}\"\n")))


def test_header_values_the_toolkit_allows_load(tmp_path):
    config = load_web_config(str(write(tmp_path, (
        "http_server_config:\n  headers:\n    X-Frame-Options: SAMEORIGIN\n"
        "    Content-Security-Policy: \"default-src 'self'; frame-ancestors 'none'\"\n"
        "    Strict-Transport-Security: max-age=31536000; includeSubDomains\n"))))
    assert config.headers["Content-Security-Policy"] == "default-src 'self'; frame-ancestors 'none'"


@pytest.mark.parametrize("cost", [3, 15, 31])
def test_bcrypt_cost_outside_4_to_14_is_refused(tmp_path, cost):
    hashed = HASH.replace("$04$", f"${cost:02d}$", 1)
    with pytest.raises(UsageError, match=f"bcrypt cost {cost} is outside 4-14"):
        load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n")))


def test_cli_bcrypt_cost_31_exits_2(tmp_path):
    hashed = HASH.replace("$04$", "$31$", 1)
    result = subprocess.run([TCPSTATE, "serve", "--web.config.file",
                             str(write(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n"))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == EXIT_USAGE and "bcrypt cost 31" in result.stderr


class _CheckSpy:
    """Wraps the real bcrypt.checkpw: how many checks ran, at once at most,
    and with which hashes."""

    def __init__(self, monkeypatch):
        self.real = bcrypt.checkpw
        self.lock = threading.Lock()
        self.running = self.most = self.calls = 0
        self.hashes: list[bytes] = []
        monkeypatch.setattr(bcrypt, "checkpw", self)

    def __call__(self, password, hashed):
        with self.lock:
            self.running += 1
            self.calls += 1
            self.most = max(self.most, self.running)
            self.hashes.append(hashed)
        try:
            return self.real(password, hashed)
        finally:
            with self.lock:
                self.running -= 1


def test_one_bcrypt_check_at_a_time(tmp_path, monkeypatch):
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(8)).decode()  # ~15 ms a check
    auth = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{hashed}'\n"))).auth
    spy = _CheckSpy(monkeypatch)
    start = threading.Barrier(16)

    def guess(i):
        start.wait()
        assert not auth.allows(basic("alice", f"guess {i}"), source=f"10.0.0.{i % 3}")

    threads = [threading.Thread(target=guess, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert spy.calls == 16 and spy.most == 1


def test_failures_are_cached_and_never_evict_successes(tmp_path, monkeypatch):
    auth = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n"))).auth
    spy = _CheckSpy(monkeypatch)
    assert auth.allows(basic("alice", PASSWORD))
    assert not auth.allows(basic("alice", "wrong"))
    assert not auth.allows(basic("alice", "wrong"))  # remembered: no second check
    assert spy.calls == 2
    for i in range(auth.failures.size + 50):  # a flood of new wrong passwords
        assert not auth.allows(basic("alice", f"wrong {i}"))
    assert len(auth.failures) == auth.failures.size and auth.failures.evicted == 51
    calls = spy.calls
    assert auth.allows(basic("alice", PASSWORD))  # still remembered
    assert spy.calls == calls and len(auth.successes) == 1


def test_cache_is_keyed_by_the_stored_hash_too(tmp_path):
    auth = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n"))).auth
    assert auth.allows(basic("alice", PASSWORD))
    auth.users["alice"] = bcrypt.hashpw(b"new password", bcrypt.gensalt(4))
    assert not auth.allows(basic("alice", PASSWORD))


def test_unknown_users_are_checked_at_the_highest_configured_cost(tmp_path, monkeypatch):
    cheap = bcrypt.hashpw(b"x", bcrypt.gensalt(4)).decode()
    dear = bcrypt.hashpw(b"y", bcrypt.gensalt(9)).decode()
    auth = load_web_config(str(write(
        tmp_path, f"basic_auth_users:\n  alice: '{cheap}'\n  bob: '{dear}'\n"))).auth
    spy = _CheckSpy(monkeypatch)
    assert not auth.allows(basic("mallory", "guess"))
    assert spy.hashes == [spy.hashes[0]] and spy.hashes[0].startswith(b"$2b$09$")


def test_non_ascii_authorization_is_refused_not_raised(tmp_path):
    auth = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n"))).auth
    assert not auth.allows("Basic ééé")
    assert not auth.allows("Basic " + base64.b64encode("alice:é".encode("latin-1")).decode())


def test_tls_12_offers_forward_secret_aead_suites_only(tmp_path, pki):
    for extra, expected in (("", None),
                            ("  cipher_suites: [TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384]\n",
                             {"ECDHE-RSA-AES256-GCM-SHA384"})):
        context = load_web_config(str(write(tmp_path, tls_section(pki, extra)))).tls
        tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
        assert tls12 and all(name.startswith("ECDHE-") and ("GCM" in name or "CHACHA" in name)
                             for name in tls12), tls12
        if expected:
            assert tls12 == expected


def test_a_tls_12_client_offering_only_cbc_suites_cannot_connect(server_for, pki):
    """(The test PKI's keys are ECDSA: static-RSA suites could not be chosen
    with it anyway; their absence is checked on the context above.)"""
    port = server_for(tls_section(pki))
    old = client_context(pki, cert=False)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES256-SHA384")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        get(port, old)
    modern = client_context(pki, cert=False)
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    assert get(port, modern)[0] == 200


def test_basic_auth_without_tls_is_warned_about(tmp_path, pki):
    plain = load_web_config(str(write(tmp_path, f"basic_auth_users:\n  alice: '{HASH}'\n")))
    assert len(plain.warnings()) == 1 and "without TLS" in plain.warnings()[0]
    secured = load_web_config(str(write(tmp_path, tls_section(pki)
                                        + f"basic_auth_users:\n  alice: '{HASH}'\n")))
    assert secured.warnings() == []
