"""The web configuration file (exporter-toolkit format) and --listen.

TLS and basic auth follow the Prometheus exporter-toolkit web configuration
file (`--web.config.file`, docs/web-configuration.md in
prometheus/exporter-toolkit), so a Prometheus already set up for
node_exporter scrapes memcgscope the same way.

Differences from the toolkit, each refused with a one-line error rather
than silently ignored: inline `cert`/`key`/`client_ca`, `cipher_suites`,
`curve_preferences`, `client_allowed_sans`, `rate_limit`, and the client
auth types Python's ssl module cannot express (RequestClientCert,
RequireAnyClientCert). The file is read once at start, not per request.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml

__all__ = ["WebConfig", "WebConfigError", "ListenError", "load_web_config", "parse_web_config", "parse_listen"]


class WebConfigError(ValueError):
    """A bad web configuration file; str() is one line: file, key, fix."""


class ListenError(ValueError):
    """A bad --listen value; str() is one line with the accepted forms."""


# --- the web configuration file -----------------------------------------

# Header names and, where the toolkit restricts them, their allowed values
# (exporter-toolkit web/handler.go, extraHTTPHeaders).
_HEADERS: dict[str, tuple[str, ...] | None] = {
    "Strict-Transport-Security": None,
    "X-Content-Type-Options": ("nosniff",),
    "X-Frame-Options": ("deny", "sameorigin"),
    "X-XSS-Protection": None,
    "Content-Security-Policy": None,
}

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}

_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}

_TLS_KEYS = {"cert_file", "key_file", "client_auth_type", "client_ca_file",
             "min_version", "max_version", "prefer_server_cipher_suites"}
_HTTP_KEYS = {"headers", "http2"}
_TOP_KEYS = {"tls_server_config", "http_server_config", "basic_auth_users"}

# Toolkit keys we know but do not implement: key -> what to do instead.
_UNSUPPORTED = {
    "tls_server_config.cert": "not supported by memcgscope; put the PEM in a file and use cert_file",
    "tls_server_config.key": "not supported by memcgscope; put the PEM in a file and use key_file",
    "tls_server_config.client_ca": "not supported by memcgscope; put the PEM in a file and use client_ca_file",
    "tls_server_config.cipher_suites": "not supported by memcgscope (Go cipher names); remove it to use OpenSSL's defaults",
    "tls_server_config.curve_preferences": "not supported by memcgscope; remove it to use OpenSSL's defaults",
    "tls_server_config.client_allowed_sans": "not supported by memcgscope; remove it and restrict clients with client_ca_file",
    "rate_limit": "not supported by memcgscope; remove it",
}

_BCRYPT_HINT = ("give a bcrypt hash, e.g. from htpasswd -nBC 10 \"\" | tr -d ':\\n' or "
                "python3 -c 'import bcrypt; print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())'")


@dataclass(frozen=True)
class WebConfig:
    """A parsed web configuration; the default (no file) is plain HTTP, no auth."""

    path: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_auth_type: str = "NoClientCert"
    client_ca_file: str | None = None
    min_version: str = "TLS12"
    max_version: str = "TLS13"
    prefer_server_cipher_suites: bool = True
    headers: Mapping[str, str] = field(default_factory=dict)
    basic_auth_users: Mapping[str, bytes] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def ssl_context(self) -> ssl.SSLContext:
        """A server context; raises WebConfigError when files do not load."""
        name = _short(self.path)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = _TLS_VERSIONS[self.min_version]
        ctx.maximum_version = _TLS_VERSIONS[self.max_version]
        if self.prefer_server_cipher_suites:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        for key, what in (("cert_file", "certificate"), ("key_file", "private key"),
                          ("client_ca_file", "CA certificate")):
            file = getattr(self, key)
            if file is not None and not os.path.isfile(file):
                raise WebConfigError(f"{name}: tls_server_config.{key}: {file}: no such file; "
                                     f"give the path of a PEM {what}")
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
        except (ssl.SSLError, OSError) as e:
            raise WebConfigError(f"{name}: tls_server_config.cert_file/key_file: {self.cert_file}, {self.key_file}: "
                                 f"cannot load ({_ssl_reason(e)}); give a PEM certificate and its matching "
                                 "unencrypted private key") from None
        ctx.verify_mode = _CLIENT_AUTH[self.client_auth_type]
        if self.client_ca_file:
            try:
                ctx.load_verify_locations(cafile=self.client_ca_file)
            except (ssl.SSLError, OSError) as e:
                raise WebConfigError(f"{name}: tls_server_config.client_ca_file: {self.client_ca_file}: "
                                     f"cannot load ({_ssl_reason(e)}); give the path of a PEM CA certificate") from None
        return ctx


def _short(path: str | None) -> str:
    return os.path.basename(path) if path else "web config"


def _ssl_reason(e: Exception) -> str:
    return getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e)


def load_web_config(path: str) -> WebConfig:
    """Read and check a web configuration file (exporter-toolkit format)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise WebConfigError(f"{path}: cannot read ({e.strerror}); give the path of the web configuration YAML "
                             "to --web.config.file") from None
    return parse_web_config(text, path)


def parse_web_config(text: str, path: str | None = None) -> WebConfig:
    """Parse the YAML text of a web configuration; `path` names it in errors
    and anchors relative file names (the toolkit resolves them against the
    file's directory)."""
    name = _short(path)

    def err(key: str, msg: str) -> WebConfigError:
        return WebConfigError(f"{name}: {key}: {msg}")

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "YAML"
        problem = getattr(e, "problem", None) or "invalid"
        raise WebConfigError(f"{name}: {where}: {problem}; fix the YAML syntax") from None
    if doc is None:
        return WebConfig(path=path)
    if not isinstance(doc, dict):
        raise err("top level", f"expected a mapping, got {type(doc).__name__}; "
                  "give keys tls_server_config, http_server_config, basic_auth_users")
    _check_keys(doc, "", _TOP_KEYS, err)

    base = os.path.dirname(os.path.abspath(path)) if path else os.getcwd()

    def file_key(section: dict, key: str) -> str | None:
        value = section.get(key)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise err(f"tls_server_config.{key}", f"expected a file name, got {value!r}; give a path")
        return os.path.join(base, value)

    kwargs: dict[str, Any] = {"path": path}
    tls = doc.get("tls_server_config")
    if tls is not None:
        if not isinstance(tls, dict):
            raise err("tls_server_config", "expected a mapping; give cert_file and key_file below it")
        _check_keys(tls, "tls_server_config.", _TLS_KEYS, err)
        cert, key = file_key(tls, "cert_file"), file_key(tls, "key_file")
        if cert is None:
            raise err("tls_server_config.cert_file", "missing; give the path of a PEM certificate")
        if key is None:
            raise err("tls_server_config.key_file", "missing; give the path of the certificate's PEM private key")
        kwargs.update(cert_file=cert, key_file=key)
        auth = tls.get("client_auth_type", "NoClientCert") or "NoClientCert"
        if auth not in _CLIENT_AUTH:
            hint = ("Python's ssl module cannot request a client certificate without verifying it; "
                    if auth in ("RequestClientCert", "RequireAnyClientCert") else "")
            raise err("tls_server_config.client_auth_type",
                      f"{auth!r} is not supported; {hint}use one of {', '.join(_CLIENT_AUTH)}")
        ca = file_key(tls, "client_ca_file")
        # Same rules as the toolkit (https/tls_config.go): a CA without a
        # policy that uses it, or a policy that verifies without a CA, is a
        # configuration mistake.
        if ca and auth == "NoClientCert":
            raise err("tls_server_config.client_ca_file", "set but client_auth_type is NoClientCert; "
                      "set client_auth_type: RequireAndVerifyClientCert (or remove client_ca_file)")
        if auth != "NoClientCert" and not ca:
            raise err("tls_server_config.client_ca_file", f"missing, needed by client_auth_type {auth}; "
                      "give the path of the PEM CA that signs client certificates")
        kwargs.update(client_auth_type=auth, client_ca_file=ca)
        for key_name in ("min_version", "max_version"):
            if key_name in tls:
                v = tls[key_name]
                if v not in _TLS_VERSIONS:
                    raise err(f"tls_server_config.{key_name}", f"unknown TLS version {v!r}; use one of "
                              f"{', '.join(_TLS_VERSIONS)}")
                kwargs[key_name] = v
        lo, hi = kwargs.get("min_version", "TLS12"), kwargs.get("max_version", "TLS13")
        if _TLS_VERSIONS[lo] > _TLS_VERSIONS[hi]:
            raise err("tls_server_config.min_version", f"{lo} is above max_version {hi}; lower min_version "
                      "or raise max_version")
        if "prefer_server_cipher_suites" in tls:
            v = tls["prefer_server_cipher_suites"]
            if not isinstance(v, bool):
                raise err("tls_server_config.prefer_server_cipher_suites", f"expected true or false, got {v!r}")
            kwargs["prefer_server_cipher_suites"] = v

    http = doc.get("http_server_config")
    if http is not None:
        if not isinstance(http, dict):
            raise err("http_server_config", "expected a mapping; give headers below it")
        _check_keys(http, "http_server_config.", _HTTP_KEYS, err)
        # http2 is accepted for compatibility; this server speaks HTTP/1.1 only.
        if "http2" in http and not isinstance(http["http2"], bool):
            raise err("http_server_config.http2", f"expected true or false, got {http['http2']!r}")
        headers = http.get("headers") or {}
        if not isinstance(headers, dict):
            raise err("http_server_config.headers", "expected a mapping of header name to value")
        kwargs["headers"] = _check_headers(headers, err)

    users = doc.get("basic_auth_users")
    if users is not None:
        if not isinstance(users, dict):
            raise err("basic_auth_users", "expected a mapping of user name to bcrypt hash")
        out: dict[str, bytes] = {}
        for user, hashed in users.items():
            key = f"basic_auth_users.{user}"
            if not isinstance(user, str) or not user:
                raise err("basic_auth_users", f"user name {user!r} is not a string; quote it")
            if ":" in user:
                raise err(key, "a user name cannot contain ':' (basic auth splits on it); rename the user")
            if not isinstance(hashed, str) or not _is_bcrypt(hashed):
                raise err(key, f"not a bcrypt hash; {_BCRYPT_HINT}")
            out[user] = hashed.encode()
        kwargs["basic_auth_users"] = out

    config = WebConfig(**kwargs)
    if config.tls:
        config.ssl_context()  # load the files now so a bad one stops start-up, not the first scrape
    return config


def _check_keys(section: dict, prefix: str, known: set[str], err) -> None:
    for key in section:
        full = f"{prefix}{key}"
        if full in _UNSUPPORTED:
            raise err(full, _UNSUPPORTED[full])
        if key not in known:
            raise err(full, f"unknown key; use one of {', '.join(sorted(known))}")


def _check_headers(headers: dict, err) -> dict[str, str]:
    out = {}
    by_lower = {h.lower(): h for h in _HEADERS}
    for name, value in headers.items():
        canonical = by_lower.get(str(name).lower())
        key = f"http_server_config.headers.{name}"
        if canonical is None:
            raise err(key, f"header not allowed; use one of {', '.join(_HEADERS)}")
        if value is None or value == "":
            continue  # blank means unset, as in the toolkit
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise err(key, f"expected a one-line string, got {value!r}")
        allowed = _HEADERS[canonical]
        if allowed is not None and value.lower() not in allowed:
            raise err(key, f"invalid value {value!r}; use one of {', '.join(allowed)}")
        out[canonical] = value
    return out


def _is_bcrypt(hashed: str) -> bool:
    # $2a$/$2b$/$2y$, two-digit cost, 53 characters of salt and hash.
    return (len(hashed) == 60 and hashed[:4] in ("$2a$", "$2b$", "$2y$") and hashed[4:6].isdigit()
            and hashed[6] == "$")


# --- --listen ------------------------------------------------------------

def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT", "[IPV6]:PORT" or ":PORT" (all interfaces) -> (host, port);
    host "" means all interfaces."""
    def bad(why: str) -> ListenError:
        return ListenError(f"--listen {text!r}: {why}; use HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9100")

    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1:end + 2] != ":":
            raise bad("an IPv6 address needs brackets and a port")
        host, port_text = text[1:end], text[end + 2:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("an IPv6 address needs brackets")
        if any(c.isspace() for c in host) or "/" in host:
            raise bad(f"{host!r} is not a host name or address")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise bad(f"port {port_text!r} is not a number from 0 to 65535")
    return host, int(port_text)
