"""Fixtures for the collector's unit tests: certificates made with the
openssl command line (no extra Python dependency), bcrypt hashes."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class Certs:
    dir: Path
    ca: Path          # CA certificate, signs server and client
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_key: Path   # a key that matches no certificate


def _ec_key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


@pytest.fixture(scope="session")
def certs(tmp_path_factory) -> Certs:
    d = tmp_path_factory.mktemp("certs")
    _ec_key("ca.key", d)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=memcgscope test CA", cwd=d)
    for who, san in (("server", "IP:127.0.0.1,IP:::1,DNS:localhost"), ("client", "DNS:prometheus")):
        _ec_key(f"{who}.key", d)
        _openssl("req", "-new", "-key", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}", cwd=d)
        (d / f"{who}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext", cwd=d)
    _ec_key("other.key", d)
    return Certs(d, d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
                 d / "other.key")


@pytest.fixture(scope="session")
def user_hash() -> tuple[str, str, str]:
    """(user, password, bcrypt hash); cost 4 keeps the tests fast."""
    password = "s3cret-pw"
    return "prom", password, bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
