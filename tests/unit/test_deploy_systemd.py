"""deploy/systemd: the unit passes `systemd-analyze verify` (offline; it
needs no running systemd), rendered by install.sh with an ExecStart that
exists, and its defaults and web config are what `memcgscope run` takes."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess

import pytest

from memcgscope.collector.cli import build_parser
from memcgscope.collector.run_cmd import DEFAULT_LISTEN
from memcgscope.collector.web import WebConfigError, load_web_config

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
SYSTEMD = os.path.join(ROOT, "deploy", "systemd")
INSTALL = os.path.join(SYSTEMD, "install.sh")


def _fake_bin(tmp_path) -> str:
    b = tmp_path / "bin" / "memcgscope"
    b.parent.mkdir()
    b.write_text("#!/bin/sh\nexit 0\n")
    b.chmod(b.stat().st_mode | stat.S_IXUSR)
    return str(b)


def render(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", INSTALL, "--print", *args], capture_output=True, text=True, timeout=30)


def verify(unit_text: str, tmp_path) -> str:
    """systemd-analyze verify's complaints ('' when none). It exits 0 on
    many (an unknown key, a bad value: 'ignoring'), so any output counts."""
    exe = shutil.which("systemd-analyze")
    assert exe, "systemd-analyze is missing; run scripts/setup-tests.sh (Debian package systemd)"
    d = tmp_path / "units"
    d.mkdir(exist_ok=True)
    unit = d / "memcgscope.service"
    unit.write_text(unit_text)
    r = subprocess.run([exe, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and not out:
        out = f"exit status {r.returncode}"
    return out


@pytest.fixture
def unit(tmp_path) -> str:
    r = render(tmp_path, "--bin", _fake_bin(tmp_path))
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_unit_verifies(unit, tmp_path):
    assert verify(unit, tmp_path) == ""


@pytest.mark.parametrize("old, new, complaint", [
    ("Restart=on-failure", "Restart=sometimes", "Failed to parse service restart specifier"),
    ("Type=exec", "Tpye=exec", "Unknown key"),
    ("[Service]", "[Servic]", "Unknown section"),
])
def test_verify_catches_a_bad_unit(unit, tmp_path, old, new, complaint):
    assert old in unit
    assert complaint in verify(unit.replace(old, new, 1), tmp_path)


def test_verify_catches_a_missing_executable(unit, tmp_path):
    line = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    bad = unit.replace(line, "ExecStart=/nonexistent/memcgscope run")
    assert "is not executable" in verify(bad, tmp_path)


def test_render_points_execstart_at_the_binary(unit, tmp_path):
    exec_start = next(x for x in unit.splitlines() if x.startswith("ExecStart="))
    argv = exec_start.split("=", 1)[1].split()
    assert argv[0] == str(tmp_path / "bin" / "memcgscope")
    assert argv[1:] == ["run", "--web.config.file", "/etc/memcgscope/web.yml", "$MEMCGSCOPE_ARGS"]
    assert "/opt/memcgscope" not in unit


def test_install_refuses_bad_binaries(tmp_path):
    r = render(tmp_path, "--bin", "relative/memcgscope")
    assert r.returncode != 0 and "give an absolute path" in r.stderr
    r = render(tmp_path, "--bin", str(tmp_path / "missing"))
    assert r.returncode != 0 and "is not executable" in r.stderr
    r = render(tmp_path, "--bogus")
    assert r.returncode != 0 and "unknown argument '--bogus'" in r.stderr


def test_capabilities_are_the_ones_documented(unit):
    line = next(x for x in unit.splitlines() if x.startswith("CapabilityBoundingSet="))
    assert line.split("=", 1)[1].split() == ["CAP_BPF", "CAP_PERFMON", "CAP_SYS_ADMIN"]


def _default_args() -> list[str]:
    text = open(os.path.join(SYSTEMD, "memcgscope.default")).read()
    m = re.search(r"^MEMCGSCOPE_ARGS=(.*)$", text, re.M)
    assert m, "memcgscope.default sets no MEMCGSCOPE_ARGS"
    # systemd splits an unquoted $VAR at whitespace and interprets no quotes
    assert '"' not in m.group(1) and "'" not in m.group(1)
    return m.group(1).split()


def test_default_args_are_run_flags_and_listen_on_runs_port():
    args = build_parser().parse_args(["run", "--web.config.file", "/etc/memcgscope/web.yml", *_default_args()])
    assert args.listen == ":" + DEFAULT_LISTEN.rsplit(":", 1)[1]


def test_default_args_check_fails_on_a_bad_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", *_default_args(), "--listne", ":1"])


def test_installed_web_config_loads(tmp_path):
    config = load_web_config(os.path.join(SYSTEMD, "web.yml"))
    assert config is not None
    bad = tmp_path / "web.yml"
    bad.write_text("tls_server_config:\n  cert_file: /x\n")   # a cert without its key
    with pytest.raises(WebConfigError):
        load_web_config(str(bad))


def test_install_script_parses():
    assert subprocess.run(["sh", "-n", INSTALL]).returncode == 0
