"""The one resolver (model.profiles.resolve_profile): the real upstream
version from uname -v / version_signature / uname -r; recordings replay
under the profile recorded with them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from memcgscope.model.profiles import get_profile, resolve_profile, upstream_version
from memcgscope.probes.sysroot import SysRoot

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parent / "data"
DEB510 = "#1 SMP Debian 5.10.262-1 (2026-07-31)"


@pytest.mark.parametrize("release,version,signature,profile,upstream,exact", [
    # Debian 5.10: uname -r carries the ABI (46), uname -v the sublevel
    ("5.10.0-46-amd64", DEB510, None, "5.10", "5.10.262", True),
    ("5.10.0-46-amd64", None, None, "5.10", None, False),     # sublevel unknown: newest 5.10 form, warned
    ("6.1.0-57-amd64", "#1 SMP PREEMPT_DYNAMIC Debian 6.1.192-3 (2026-05-01)", None, "6.1", "6.1.192", True),
    ("6.1.0-57-amd64", None, None, "6.1", None, False),       # three 6.1 ranges: newest, warned
    ("6.12.117+deb12-amd64", None, None, "6.12", "6.12.117", True),
    ("6.18.15+deb13-amd64", None, None, "6.18", "6.18.15", True),
    ("7.3.4+deb13-amd64", None, None, "7.3", "7.3.4", True),
    ("7.2.13+deb14-amd64", None, None, "7.2", "7.2.13", True),
    ("7.4.1", None, None, "7.3", "7.4.1", False),             # newer than every profile: nearest older
    ("6.19.6+deb13-amd64", None, None, "6.18.51", "6.19.6", False),   # between 6.18 and 7.2
    ("5.15.0-91-generic", "#101-Ubuntu SMP", "Ubuntu 5.15.0-91.101-generic 5.15.131", "5.15", "5.15.131", True),
    ("6.8.0-45-generic", None, None, "6.6", "6.8", False),
    ("5.10.13", None, None, "5.10.0", "5.10.13", True),
    # 5.10.60-79: no try_charge change in the Debian changelog before 5.10.80
    ("5.10.70", None, None, "5.10.0", "5.10.70", True),
    ("5.10.79", None, None, "5.10.0", "5.10.79", True),
    ("5.10.80", None, None, "5.10", "5.10.80", True),
])
def test_resolution(release, version, signature, profile, upstream, exact):
    r = resolve_profile(release, version, signature=signature)
    assert (r.profile.name, r.upstream, r.exact) == (profile, upstream, exact)
    assert r.reason
    if not exact:
        assert "--profile" in r.warning and "\n" not in r.warning


def test_refusals_are_one_line():
    with pytest.raises(ValueError, match="older than every model profile") as e:
        resolve_profile("4.19.0-20-amd64")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no version"):
        resolve_profile("weird")
    # an explicit --profile is taken exactly or refused, never guessed
    assert resolve_profile("7.3.4+deb13-amd64", override="6.12").profile.name == "6.12"
    with pytest.raises(ValueError, match="unknown kernel profile '9.9'"):
        resolve_profile("6.1.0-1-amd64", override="9.9")
    with pytest.raises(ValueError, match="unknown kernel profile '6.19.6'"):
        get_profile("6.19.6")      # get_profile takes no nearest-older guess either


@pytest.mark.parametrize("family,ranges", [
    ("6.1", [(0, "6.1.0"), (55, "6.1.0"), (56, "6.1.56"), (187, "6.1.56"), (188, "6.1"), (192, "6.1")]),
    ("6.12", [(0, "6.12.0"), (108, "6.12.0"), (109, "6.12.109"), (116, "6.12.109"), (117, "6.12"),
              (300, "6.12")]),
    ("6.18", [(0, "6.18"), (15, "6.18"), (35, "6.18"), (36, "6.18.36"), (44, "6.18.36"), (49, "6.18.36"),
              (50, "6.18.50"), (51, "6.18.51"), (99, "6.18.51")]),
    ("7.2", [(0, "7.2.0"), (3, "7.2.0"), (4, "7.2.4"), (5, "7.2"), (13, "7.2")]),
    ("7.3", [(0, "7.3.0"), (3, "7.3.0"), (4, "7.3"), (9, "7.3")]),
])
def test_stable_ranges_meet_without_gaps(family, ranges):
    for sub, name in ranges:
        r = resolve_profile(f"{family}.{sub}")
        assert (r.profile.name, r.exact) == (name, True), (family, sub)
        assert get_profile(f"{family}.{sub}") is r.profile


def test_upstream_from_captured_guests():
    for name, want in (("debian-6.1-v1", (6, 1, 192)), ("debian-6.12-v2", (6, 12, 117))):
        root = SysRoot(str(DATA / "sysroots" / name))
        assert upstream_version(root.kernel_release(), root.kernel_version())[0] == want


def replay_json(path, capsys, *extra):
    from memcgscope.collector import replay_cmd
    ap = argparse.ArgumentParser()
    replay_cmd.add_parser(ap.add_subparsers())
    args = ap.parse_args(["replay", "--json", *extra, str(path)])
    rc = args.func(args)
    return rc, json.loads(capsys.readouterr().out)


def with_header(tmp_path, **fields):
    src = DATA / "recordings" / "debian-6.1-v1-kprobe.jsonl"
    lines = src.read_text().splitlines()
    h = json.loads(lines[0])
    for k, v in fields.items():
        if v is None:
            h.pop(k, None)
        else:
            h[k] = v
    p = tmp_path / "rec.jsonl"
    p.write_text("\n".join([json.dumps(h)] + lines[1:]) + "\n")
    return p


def test_replay_takes_the_recorded_profile(tmp_path, capsys):
    # recorded on Debian 5.10 by a memcgscope that resolved "5.10": uname -r
    # alone would have said 5.10.0
    p = with_header(tmp_path, kernel="5.10.0-46-amd64", kernel_version=DEB510, profile="5.10")
    assert replay_json(p, capsys)[1]["profile"] == "5.10"
    p = with_header(tmp_path, kernel="5.10.0-46-amd64", kernel_version=DEB510, profile=None)
    assert replay_json(p, capsys)[1]["profile"] == "5.10"       # older recording: the resolver on uname -v
    p = with_header(tmp_path, kernel="6.1.0-56-amd64", profile="6.12")
    assert replay_json(p, capsys)[1]["profile"] == "6.12"       # what run used, not what uname -r says


def test_replay_of_a_newer_kernel_warns_instead_of_refusing(tmp_path, capsys):
    p = with_header(tmp_path, kernel="7.4.1", profile=None, kernel_version=None)
    rc, summary = replay_json(p, capsys)
    assert summary["profile"] == "7.3"
    assert any("nearest older" in w for w in summary["warnings"])
