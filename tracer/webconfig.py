"""`--web.config.file`: TLS and basic auth in the format of the Prometheus
exporter-toolkit (docs/web-configuration.md there), so that one file serves
every exporter of a host.

Supported: tls_server_config (cert_file, key_file, client_auth_type,
client_ca_file, min_version, max_version, cipher_suites), http_server_config
(headers; http2 is accepted and ignored: tcpstate speaks HTTP/1.1) and
basic_auth_users (bcrypt hashes of cost 4 to 14). Anything else in the file,
a key given twice included, is an error, not silently ignored: a setting an
operator believes in must be in force. Relative paths are relative to the
file's directory, as in the toolkit. The file is read at start and again on
SIGHUP (tracer.http_server swaps it in whole, or keeps the old one).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import UsageError

FLAG = "--web.config.file"

# Python's ssl verifies every client certificate it asks for, so the two
# toolkit policies that accept unverified certificates cannot be offered.
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
UNVERIFIED_CLIENT_AUTH = ("RequestClientCert", "RequireAnyClientCert")
TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
TLS_KEYS = ("cert_file", "key_file", "client_auth_type", "client_ca_file",
            "min_version", "max_version", "cipher_suites")
TLS_FILE_KEYS = ("cert_file", "key_file", "client_ca_file")
# The toolkit's (Go's) names of the TLS 1.2 suites offered: forward-secret
# (ECDHE) and AEAD only; static-RSA and CBC suites are refused by name.
# TLS 1.3 suites are all forward-secret and not configurable, as in Go.
CIPHER_SUITES = {
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
DEFAULT_CIPHERS = ":".join(CIPHER_SUITES.values())
HEADER_KEYS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
               "X-XSS-Protection", "Strict-Transport-Security")
# The toolkit's allowed values, where it has a list (compared without case).
HEADER_VALUES = {"X-Frame-Options": ("deny", "sameorigin"), "X-Content-Type-Options": ("nosniff",)}
# Visible ASCII and inner spaces: what every HTTP client reads the same way.
HEADER_VALUE = re.compile(r"^[!-~]+( +[!-~]+)*$")
BCRYPT_HASH = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# bcrypt's cost doubles per step: 14 is ~1 s a check on a server core; a
# `$2b$31$` hash would make every login take days and must not load.
MIN_COST, MAX_COST = 4, 14
SUCCESS_CACHE_SIZE = 64
FAILURE_CACHE_SIZE = 1024


def _fail(where: str, problem: str) -> UsageError:
    return UsageError(f"{FLAG}: {where}: {problem}")


class _TakingTurns:
    """One bcrypt check at a time (a check is ~60 ms of a core at cost 10).
    Sources take turns: a source that queues many checks delays another
    source by one check, not by its whole queue."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._queues: OrderedDict[str, deque] = OrderedDict()
        self._granted: object | None = None
        self.checking = 0       # checks running now (0 or 1)
        self.most_checking = 0  # the most ever at once

    def acquire(self, source: str) -> None:
        with self._cond:
            if self._busy or self._queues:
                ticket = object()
                self._queues.setdefault(source, deque()).append(ticket)
                while self._granted is not ticket:
                    self._cond.wait()
                self._granted = None
            self._busy = True
            self.checking += 1
            self.most_checking = max(self.most_checking, self.checking)

    def release(self) -> None:
        with self._cond:
            self.checking -= 1
            if not self._queues:
                self._busy = False
                return
            source, queue = next(iter(self._queues.items()))
            self._granted = queue.popleft()
            if queue:
                self._queues.move_to_end(source)  # the next source goes first next time
            else:
                del self._queues[source]
            self._cond.notify_all()


class _Remembered:
    """A bounded set of credential digests, least recently used out first."""

    def __init__(self, size: int):
        self.size = size
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self.evicted = 0

    def __contains__(self, key: bytes) -> bool:
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        return False

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, key: bytes) -> None:
        self._keys[key] = None
        self._keys.move_to_end(key)
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)
            self.evicted += 1


class BasicAuth:
    """Checks `Authorization: Basic` headers against bcrypt hashes. bcrypt
    is slow on purpose, so: one check at a time (sources taking turns), and
    both answers remembered in two bounded caches, so that repeating a wrong
    password costs no check and a flood of new wrong ones never pushes out
    the scraper's success. Keys are a SHA-256 of (user, stored hash,
    password), never the password itself; a new configuration (a reload)
    starts with empty caches."""

    def __init__(self, users: Mapping[str, bytes]):
        self.users = dict(users)
        # Checked against for unknown users, at the highest cost configured,
        # so that a wrong name costs what a wrong password costs and does not
        # reveal which names exist.
        cost = max((_cost(hashed) for hashed in self.users.values()), default=MIN_COST)
        self._decoy = b"$2b$%02d$" % cost + b"." * 53
        self.successes = _Remembered(SUCCESS_CACHE_SIZE)
        self.failures = _Remembered(FAILURE_CACHE_SIZE)
        self._lock = threading.Lock()  # the caches
        self.turns = _TakingTurns()

    def allows(self, header: str | None, source: str = "") -> bool:
        credentials = _credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        stored = self.users.get(user)
        key = hashlib.sha256(b"\0".join((user.encode(), stored or b"", password))).digest()
        with self._lock:
            if key in self.successes:
                return True
            if key in self.failures:
                return False
        import bcrypt

        self.turns.acquire(source)
        try:
            ok = bcrypt.checkpw(password, stored or self._decoy) and stored is not None
        except ValueError:
            ok = False
        finally:
            self.turns.release()
        with self._lock:
            (self.successes if ok else self.failures).add(key)
        return ok


def _credentials(header: str | None) -> tuple[str, bytes] | None:
    """(user, password) from `Basic base64(user:password)`, else None."""
    if not header or not header[:6].lower() == "basic ":
        return None
    try:
        user, sep, password = base64.b64decode(header[6:].strip().encode("ascii"),
                                               validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeError, ValueError):  # non-ASCII too: a 401, not a crash
        return None
    return (user, password.encode()) if sep else None


def _cost(hashed: bytes) -> int:
    return int(hashed[4:6])


@dataclass
class WebConfig:
    path: Path
    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    headers: dict[str, str] = field(default_factory=dict)
    files: tuple[Path, ...] = ()  # what a reload reads again: the file, its certificates

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def warnings(self) -> list[str]:
        if self.auth is not None and self.tls is None:
            return [f"{FLAG} {self.path}: basic auth without TLS sends passwords in clear text "
                    "to anyone on the path (add tls_server_config)"]
        return []


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(where, f"expected a mapping, got {type(value).__name__}")
    return value


def _only(section: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in section:
        if key not in allowed:
            raise _fail(where, f"{key!r} is not supported (supported: {', '.join(allowed)})")


def _string(section: dict, key: str, where: str, default: str = "") -> str:
    value = section.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise _fail(f"{where}.{key}", f"expected a string, got {value!r}")
    return value


def _file(base: Path, section: dict, key: str) -> Path | None:
    text = _string(section, key, "tls_server_config")
    if not text:
        return None
    path = base / text
    if not path.is_file():
        raise _fail(f"tls_server_config.{key}", f"{str(path)!r} is not a readable file")
    return path


def _tls_context(section: dict, base: Path) -> ssl.SSLContext:
    where = "tls_server_config"
    _only(section, TLS_KEYS, where)
    cert, key = _file(base, section, "cert_file"), _file(base, section, "key_file")
    if cert is None or key is None:
        raise _fail(where, "cert_file and key_file are both required")
    policy = _string(section, "client_auth_type", where, "NoClientCert")
    if policy in UNVERIFIED_CLIENT_AUTH:
        raise _fail(f"{where}.client_auth_type",
                    f"{policy} accepts unverified certificates and is not supported: "
                    "use RequireAndVerifyClientCert or VerifyClientCertIfGiven")
    if policy not in CLIENT_AUTH:
        raise _fail(f"{where}.client_auth_type",
                    f"{policy!r} is not one of {', '.join(CLIENT_AUTH)}")
    client_ca = _file(base, section, "client_ca_file")
    if client_ca and policy == "NoClientCert":
        raise _fail(where, "client_ca_file is set but client_auth_type is NoClientCert")
    if not client_ca and policy != "NoClientCert":
        raise _fail(where, f"client_auth_type {policy} needs client_ca_file")

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers(_ciphers(section.get("cipher_suites"), f"{where}.cipher_suites"))
    for name, default, attribute in (("min_version", "TLS12", "minimum_version"),
                                     ("max_version", "TLS13", "maximum_version")):
        version = _string(section, name, where, default)
        if version not in TLS_VERSIONS:
            raise _fail(f"{where}.{name}", f"{version!r} is not one of {', '.join(TLS_VERSIONS)}")
        setattr(context, attribute, TLS_VERSIONS[version])
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(cafile=client_ca)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise _fail(where, f"cannot use the certificate or key: {exc}") from None
    context.verify_mode = CLIENT_AUTH[policy]
    return context


def _ciphers(names: Any, where: str) -> str:
    if names is None:
        return DEFAULT_CIPHERS
    if not isinstance(names, list) or not names:
        raise _fail(where, "expected a list of suite names, e.g. [TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256]")
    for name in names:
        if name not in CIPHER_SUITES:
            raise _fail(where, f"{name!r} is not supported (forward-secret AEAD suites only: "
                               f"{', '.join(CIPHER_SUITES)})")
    return ":".join(CIPHER_SUITES[name] for name in names)


def _basic_auth(section: dict) -> BasicAuth | None:
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise _fail("basic_auth_users", f"{user!r} is not a valid user name")
        match = BCRYPT_HASH.match(hashed) if isinstance(hashed, str) else None
        if not match:
            raise _fail(f"basic_auth_users.{user}",
                        "expected a bcrypt hash ($2y$10$...), e.g. from `htpasswd -nBC 10 \"\"`")
        if not MIN_COST <= int(match[1]) <= MAX_COST:
            raise _fail(f"basic_auth_users.{user}",
                        f"bcrypt cost {int(match[1])} is outside {MIN_COST}-{MAX_COST} "
                        "(each step doubles the time of every check; 10 is usual)")
        users[user] = hashed.encode()
    return BasicAuth(users) if users else None


def _headers(section: dict) -> dict[str, str]:
    _only(section, ("http2", "headers"), "http_server_config")
    if not isinstance(section.get("http2", True), bool):
        raise _fail("http_server_config.http2", "expected true or false")
    headers = _mapping(section.get("headers"), "http_server_config.headers")
    _only(headers, HEADER_KEYS, "http_server_config.headers")
    found = {}
    for name in headers:
        value = _string(headers, name, "http_server_config.headers")
        if not value:
            continue
        if not HEADER_VALUE.match(value):
            raise _fail(f"http_server_config.headers.{name}",
                        "must be visible ASCII characters and inner spaces, on one line")
        allowed = HEADER_VALUES.get(name)
        if allowed and value.lower() not in allowed:
            raise _fail(f"http_server_config.headers.{name}",
                        f"{value!r} is not one of {', '.join(allowed)}")
        found[name] = value
    return found


def _strict_loader() -> type:
    """yaml's SafeLoader, but a key given twice in one mapping is an error:
    with the last one winning, a second empty `tls_server_config:` would
    silently turn TLS off."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader reports it
                    break
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def load_web_config(text: str) -> WebConfig:
    """Parse and check the file, load its certificates: every mistake is a
    UsageError with one line that names the setting."""
    import yaml

    path = Path(text)
    try:
        document = yaml.load(path.read_text(), Loader=_strict_loader())  # noqa: S506 (safe)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{FLAG}: cannot read {text!r}: {getattr(exc, 'strerror', None) or exc}") \
            from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise UsageError(f"{FLAG}: {text}: {where}: {problem}") from None
    top = _mapping(document, "top level")
    _only(top, ("tls_server_config", "http_server_config", "basic_auth_users"), "top level")
    base = path.resolve().parent
    tls_section = _mapping(top.get("tls_server_config"), "tls_server_config")
    tls = _tls_context(tls_section, base) if tls_section else None
    certificates = [_file(base, tls_section, key) for key in TLS_FILE_KEYS] if tls else []
    return WebConfig(
        path=path.absolute(),
        files=(path.absolute(), *(found for found in certificates if found is not None)),
        tls=tls,
        auth=_basic_auth(_mapping(top.get("basic_auth_users"), "basic_auth_users")),
        headers=_headers(_mapping(top.get("http_server_config"), "http_server_config")),
    )
