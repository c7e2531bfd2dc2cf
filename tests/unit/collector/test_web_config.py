"""The web configuration file (exporter-toolkit format) and --listen parsing."""

from __future__ import annotations

import ssl

import pytest

from memcgscope.collector.web import (ListenError, WebConfig, WebConfigError, load_web_config, parse_listen,
                                      parse_web_config)

pytestmark = pytest.mark.unit


def write(tmp_path, text: str):
    p = tmp_path / "web.yml"
    p.write_text(text)
    return str(p)


def test_empty_file_means_plain_http_without_auth(tmp_path):
    c = load_web_config(write(tmp_path, ""))
    assert not c.tls and not c.basic_auth_users and not c.headers
    assert c == WebConfig(path=str(tmp_path / "web.yml"))


def test_full_good_file_relative_paths_resolve_against_the_file(tmp_path, certs, user_hash):
    user, _, hashed = user_hash
    for name in ("server.pem", "server.key", "ca.pem"):
        (tmp_path / name).write_bytes((certs.dir / name).read_bytes())
    c = load_web_config(write(tmp_path, f"""
tls_server_config:
  cert_file: server.pem
  key_file: server.key
  client_auth_type: RequireAndVerifyClientCert
  client_ca_file: ca.pem
  min_version: TLS13
  prefer_server_cipher_suites: false
http_server_config:
  http2: false
  headers:
    X-Frame-Options: deny
    x-content-type-options: nosniff
    Strict-Transport-Security: max-age=31536000
    Content-Security-Policy: ""
basic_auth_users:
  {user}: {hashed}
"""))
    assert c.tls and c.cert_file == str(tmp_path / "server.pem") and c.key_file == str(tmp_path / "server.key")
    assert c.client_ca_file == str(tmp_path / "ca.pem")
    assert c.client_auth_type == "RequireAndVerifyClientCert" and c.min_version == "TLS13"
    assert c.prefer_server_cipher_suites is False
    # names canonicalised; a blank value means "unset", as in the toolkit
    assert dict(c.headers) == {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff",
                               "Strict-Transport-Security": "max-age=31536000"}
    assert dict(c.basic_auth_users) == {user: hashed.encode()}
    ctx = c.ssl_context()
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3 and ctx.verify_mode == ssl.CERT_REQUIRED


def test_verify_if_given_maps_to_optional(tmp_path, certs):
    c = parse_web_config(f"""
tls_server_config: {{cert_file: {certs.server_cert}, key_file: {certs.server_key},
  client_auth_type: VerifyClientCertIfGiven, client_ca_file: {certs.ca}}}
""", str(tmp_path / "web.yml"))
    assert c.ssl_context().verify_mode == ssl.CERT_OPTIONAL
    plain = parse_web_config(f"tls_server_config: {{cert_file: {certs.server_cert}, key_file: {certs.server_key}}}")
    ctx = plain.ssl_context()
    assert ctx.verify_mode == ssl.CERT_NONE and ctx.minimum_version == ssl.TLSVersion.TLSv1_2


# Each bad file -> the exact one-line message (file, key, fix).
BAD = [
    ("tls_server_config:\n  key_file: k.pem\n",
     "web.yml: tls_server_config.cert_file: missing; give the path of a PEM certificate"),
    ("tls_server_config:\n  cert_file: c.pem\n",
     "web.yml: tls_server_config.key_file: missing; give the path of the certificate's PEM private key"),
    ("tls_server_config:\n  cert_file: nope.pem\n  key_file: nope.key\n",
     "web.yml: tls_server_config.cert_file: {tmp}/nope.pem: no such file; give the path of a PEM certificate"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: nope.key\n",
     "web.yml: tls_server_config.key_file: {tmp}/nope.key: no such file; give the path of a PEM private key"),
    ("tls_server_config: {{cert_file: {cert}, key_file: {key}, client_auth_type: RequireAndVerifyClientCert, "
     "client_ca_file: ca-nope.pem}}\n",
     "web.yml: tls_server_config.client_ca_file: {tmp}/ca-nope.pem: no such file; "
     "give the path of a PEM CA certificate"),
    ("tls_server_configs: {{}}\n",
     "web.yml: tls_server_configs: unknown key; use one of basic_auth_users, http_server_config, "
     "tls_server_config"),
    ("tls_server_config:\n  cert_file: c\n  key_file: k\n  certfile: c\n",
     "web.yml: tls_server_config.certfile: unknown key; use one of cert_file, client_auth_type, client_ca_file, "
     "key_file, max_version, min_version, prefer_server_cipher_suites"),
    ("tls_server_config:\n  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
     "web.yml: tls_server_config.cipher_suites: not supported by memcgscope (Go cipher names); "
     "remove it to use OpenSSL's defaults"),
    ("tls_server_config:\n  cert: |\n    -----BEGIN CERTIFICATE-----\n",
     "web.yml: tls_server_config.cert: not supported by memcgscope; put the PEM in a file and use cert_file"),
    ("rate_limit: {{interval: 1s, burst: 5}}\n", "web.yml: rate_limit: not supported by memcgscope; remove it"),
    ("tls_server_config: {{cert_file: c, key_file: k, client_auth_type: Bogus}}\n",
     "web.yml: tls_server_config.client_auth_type: 'Bogus' is not supported; use one of NoClientCert, "
     "VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
    ("tls_server_config: {{cert_file: c, key_file: k, client_auth_type: RequireAnyClientCert}}\n",
     "web.yml: tls_server_config.client_auth_type: 'RequireAnyClientCert' is not supported; Python's ssl module "
     "cannot request a client certificate without verifying it; use one of NoClientCert, "
     "VerifyClientCertIfGiven, RequireAndVerifyClientCert"),
    ("tls_server_config: {{cert_file: c, key_file: k, client_ca_file: ca.pem}}\n",
     "web.yml: tls_server_config.client_ca_file: set but client_auth_type is NoClientCert; "
     "set client_auth_type: RequireAndVerifyClientCert (or remove client_ca_file)"),
    ("tls_server_config: {{cert_file: c, key_file: k, client_auth_type: RequireAndVerifyClientCert}}\n",
     "web.yml: tls_server_config.client_ca_file: missing, needed by client_auth_type RequireAndVerifyClientCert; "
     "give the path of the PEM CA that signs client certificates"),
    ("tls_server_config: {{cert_file: c, key_file: k, min_version: TLS1.3}}\n",
     "web.yml: tls_server_config.min_version: unknown TLS version 'TLS1.3'; use one of TLS10, TLS11, TLS12, TLS13"),
    ("tls_server_config: {{cert_file: c, key_file: k, min_version: TLS13, max_version: TLS12}}\n",
     "web.yml: tls_server_config.min_version: TLS13 is above max_version TLS12; lower min_version or raise "
     "max_version"),
    ("tls_server_config: {{cert_file: c, key_file: k, prefer_server_cipher_suites: yes please}}\n",
     "web.yml: tls_server_config.prefer_server_cipher_suites: expected true or false, got 'yes please'"),
    ("tls_server_config: [a, b]\n",
     "web.yml: tls_server_config: expected a mapping; give cert_file and key_file below it"),
    ("tls_server_config: {{cert_file: 3, key_file: k}}\n",
     "web.yml: tls_server_config.cert_file: expected a file name, got 3; give a path"),
    ("http_server_config:\n  headers:\n    Server: nginx\n",
     "web.yml: http_server_config.headers.Server: header not allowed; use one of Strict-Transport-Security, "
     "X-Content-Type-Options, X-Frame-Options, X-XSS-Protection, Content-Security-Policy"),
    ("http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
     "web.yml: http_server_config.headers.X-Frame-Options: invalid value 'allow'; use one of deny, sameorigin"),
    ("http_server_config:\n  headers: [a]\n",
     "web.yml: http_server_config.headers: expected a mapping of header name to value"),
    ("http_server_config:\n  http2: maybe\n",
     "web.yml: http_server_config.http2: expected true or false, got 'maybe'"),
    ("http_server_config:\n  compression: true\n",
     "web.yml: http_server_config.compression: unknown key; use one of headers, http2"),
    ("basic_auth_users:\n  alice: hunter2\n",
     "web.yml: basic_auth_users.alice: not a bcrypt hash; give a bcrypt hash, e.g. from "
     "htpasswd -nBC 10 \"\" | tr -d ':\\n' or python3 -c 'import bcrypt; "
     "print(bcrypt.hashpw(b\"PASSWORD\", bcrypt.gensalt()).decode())'"),
    ("basic_auth_users:\n  'a:b': '$2b$04$abcdefghijklmnopqrstuv0123456789ABCDEFGHIJKLMNOPQRSTU'\n",
     "web.yml: basic_auth_users.a:b: a user name cannot contain ':' (basic auth splits on it); rename the user"),
    ("basic_auth_users: [alice]\n",
     "web.yml: basic_auth_users: expected a mapping of user name to bcrypt hash"),
    ("- a\n- b\n",
     "web.yml: top level: expected a mapping, got list; give keys tls_server_config, http_server_config, "
     "basic_auth_users"),
    ("tls_server_config:\n  cert_file: a: b\n",
     "web.yml: line 2: mapping values are not allowed here; fix the YAML syntax"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m.split(": ")[1] for _, m in BAD])
def test_bad_files_give_one_line_errors(tmp_path, certs, text, message):
    fmt = {"cert": certs.server_cert, "key": certs.server_key, "tmp": tmp_path}
    with pytest.raises(WebConfigError) as e:
        load_web_config(write(tmp_path, text.format(**fmt)))
    assert str(e.value) == message.format(**fmt)
    assert "\n" not in str(e.value)


def test_key_that_does_not_match_the_certificate(tmp_path, certs):
    path = write(tmp_path, f"tls_server_config: {{cert_file: {certs.server_cert}, key_file: {certs.other_key}}}\n")
    with pytest.raises(WebConfigError) as e:
        load_web_config(path)
    msg = str(e.value)
    assert msg.startswith(f"web.yml: tls_server_config.cert_file/key_file: {certs.server_cert}, {certs.other_key}: "
                          "cannot load (")
    assert msg.endswith("); give a PEM certificate and its matching unencrypted private key") and "\n" not in msg


def test_a_file_that_is_not_pem(tmp_path, certs):
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    path = write(tmp_path, f"tls_server_config: {{cert_file: junk.pem, key_file: {certs.server_key}}}\n")
    with pytest.raises(WebConfigError, match=r"^web\.yml: tls_server_config\.cert_file/key_file: .*junk\.pem"):
        load_web_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(WebConfigError) as e:
        load_web_config(str(tmp_path / "absent.yml"))
    assert str(e.value) == (f"{tmp_path}/absent.yml: cannot read (No such file or directory); "
                            "give the path of the web configuration YAML to --web.config.file")


@pytest.mark.parametrize("text,expected", [
    ("127.0.0.1:9100", ("127.0.0.1", 9100)),
    ("localhost:0", ("localhost", 0)),
    ("[::1]:9100", ("::1", 9100)),
    ("[::]:65535", ("::", 65535)),
    (":9100", ("", 9100)),
])
def test_parse_listen_good(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text,why", [
    ("9100", "no port"),
    ("127.0.0.1", "no port"),
    ("::1:9100", "an IPv6 address needs brackets"),
    ("[::1]9100", "an IPv6 address needs brackets and a port"),
    ("[::1:9100", "an IPv6 address needs brackets and a port"),
    ("[nothost]:9100", "'nothost' is not an IPv6 address"),
    ("127.0.0.1:http", "port 'http' is not a number from 0 to 65535"),
    ("127.0.0.1:65536", "port '65536' is not a number from 0 to 65535"),
    ("127.0.0.1:", "port '' is not a number from 0 to 65535"),
    ("my host:9100", "'my host' is not a host name or address"),
])
def test_parse_listen_bad(text, why):
    with pytest.raises(ListenError) as e:
        parse_listen(text)
    assert str(e.value) == f"--listen {text!r}: {why}; use HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9100"
