"""`--web.config.file`: TLS and basic auth in the format of the Prometheus
exporter-toolkit (docs/web-configuration.md there), so that one file serves
every exporter of a host.

Supported: tls_server_config (cert_file, key_file, client_auth_type,
client_ca_file, min_version, max_version), http_server_config (headers;
http2 is accepted and ignored: tcpstate speaks HTTP/1.1) and
basic_auth_users (bcrypt hashes). Anything else in the file is an error,
not silently ignored: a setting an operator believes in must be in force.
Relative paths are relative to the file's directory, as in the toolkit.
The file is read once, at start.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl
import threading
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
            "min_version", "max_version")
HEADER_KEYS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
               "X-XSS-Protection", "Strict-Transport-Security")
BCRYPT_HASH = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
# Checked against for unknown users, so that a wrong name costs the same
# time as a wrong password and does not reveal which names exist.
_DUMMY_HASH = b"$2b$10$" + b"." * 53
_CACHE_SIZE = 64


def _fail(where: str, problem: str) -> UsageError:
    return UsageError(f"{FLAG}: {where}: {problem}")


@dataclass
class BasicAuth:
    """Checks `Authorization: Basic` headers against bcrypt hashes. bcrypt
    is slow on purpose (~60 ms at cost 10): a success is remembered, keyed
    by a SHA-256 of the credentials, never by the password itself."""

    users: Mapping[str, bytes]
    _verified: set[bytes] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allows(self, header: str | None) -> bool:
        if not header or not header[:6].lower() == "basic ":
            return False
        try:
            user, sep, password = base64.b64decode(header[6:].strip(), validate=True) \
                .decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        if not sep:
            return False
        key = hashlib.sha256(f"{user}\0{password}".encode()).digest()
        with self._lock:
            if key in self._verified:
                return True
        import bcrypt

        stored = self.users.get(user)
        try:
            ok = bcrypt.checkpw(password.encode(), stored or _DUMMY_HASH) and stored is not None
        except ValueError:
            ok = False
        if ok:
            with self._lock:
                if len(self._verified) >= _CACHE_SIZE:
                    self._verified.clear()
                self._verified.add(key)
        return ok


@dataclass
class WebConfig:
    path: Path
    tls: ssl.SSLContext | None = None
    auth: BasicAuth | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


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


def _basic_auth(section: dict) -> BasicAuth | None:
    users: dict[str, bytes] = {}
    for user, hashed in section.items():
        if not isinstance(user, str) or not user or ":" in user:
            raise _fail("basic_auth_users", f"{user!r} is not a valid user name")
        if not isinstance(hashed, str) or not BCRYPT_HASH.match(hashed):
            raise _fail(f"basic_auth_users.{user}",
                        "expected a bcrypt hash ($2y$10$...), e.g. from `htpasswd -nBC 10 \"\"`")
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
        if any(c in value for c in "\r\n"):
            raise _fail(f"http_server_config.headers.{name}", "must be one line")
        if value:
            found[name] = value
    return found


def load_web_config(text: str) -> WebConfig:
    """Parse and check the file, load its certificates: every mistake is a
    UsageError with one line that names the setting."""
    import yaml

    path = Path(text)
    try:
        document = yaml.safe_load(path.read_text())
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
    return WebConfig(
        path=path,
        tls=_tls_context(tls_section, base) if tls_section else None,
        auth=_basic_auth(_mapping(top.get("basic_auth_users"), "basic_auth_users")),
        headers=_headers(_mapping(top.get("http_server_config"), "http_server_config")),
    )
