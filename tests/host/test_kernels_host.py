"""collector/kernels.py against the real Debian archive (root, network):
one real fetch of one kernel's headers into a temporary cache, verified by
the installed Debian keyring, with /etc/apt, apt's and dpkg's state, /boot
and /lib/modules untouched; and the real apt errors for a suite the keyring
cannot verify and for a mirror that cannot be reached."""

from __future__ import annotations

import os
import subprocess

import pytest

from memcgscope.collector.kernels import Apt, Cache, Fetcher, KernelError

WATCHED = ("/etc/apt", "/var/lib/apt", "/var/cache/apt", "/var/lib/dpkg", "/boot", "/lib/modules", "/vmlinuz",
           "/usr/src")


def _snapshot() -> dict[str, tuple]:
    """Every path under WATCHED with its type, size, mtime and link target."""
    out = {}
    for top in WATCHED:
        if not os.path.lexists(top):
            out[top] = ("absent",)
            continue
        for d, dirs, files in os.walk(top):
            for name in [""] + dirs + files:
                p = os.path.join(d, name) if name else d
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                link = os.readlink(p) if os.path.islink(p) else None
                out[p] = (st.st_mode, st.st_size, st.st_mtime_ns, link)
    return out


def _packages() -> str:
    return subprocess.run(["dpkg-query", "-W", "-f", "${Package} ${Version} ${Status}\n"],
                          capture_output=True, text=True, check=True).stdout


def _fetcher(workdir, **apt_kw) -> Fetcher:
    cache = Cache(str(workdir / "cache"))
    return Fetcher(cache, Apt(cache, **apt_kw), log=lambda m: None)


def test_real_headers_fetch_leaves_the_system_alone(workdir):
    before, pkgs = _snapshot(), _packages()
    f = _fetcher(workdir)
    # the smallest real thing: Debian 5.10's headers (about 12 MB), unpacked and merged
    t = f.ensure_host_headers("5.10.0-46-amd64")
    assert t.kind == "matching" and t.path == f"{workdir}/cache/kheaders/5.10.0-46-amd64"
    source = open(os.path.join(t.path, ".memcgscope-source")).read()
    assert source.startswith("linux-headers-5.10.0-46-amd64 5.10.") and source.rstrip().endswith(", matching")
    assert os.path.isfile(os.path.join(t.path, "include/linux/memcontrol.h"))       # from -common
    assert os.path.isfile(os.path.join(t.path, "include/generated/autoconf.h"))    # from the arch part
    # every suite's Release was verified by the installed keyring (apt refuses otherwise)
    lists = os.listdir(f"{workdir}/cache/apt/lists")
    for suite in f.apt.suites:
        assert any(f"_dists_{suite}_InRelease" in name for name in lists), (suite, lists)
    assert os.listdir(f"{workdir}/cache/debs") == []
    assert f.manifests()[0]["outside_cache"] == []

    assert _packages() == pkgs
    after = _snapshot()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert changed == [], changed[:20]
    # a second call finds it and touches nothing
    again = _fetcher(workdir, mirror="http://nonexistent.invalid/debian")
    assert again.ensure_host_headers("5.10.0-46-amd64").path == t.path


def test_a_suite_the_keyring_cannot_verify_is_refused_with_the_fix(workdir):
    # a keyring holding only Debian 11's archive key cannot verify trixie-backports
    gnupg = workdir / "gnupg"
    gnupg.mkdir(mode=0o700)
    keyring = workdir / "bullseye-only.gpg"
    with open(keyring, "wb") as out:
        subprocess.run(["gpg", "--homedir", str(gnupg), "--no-default-keyring", "--keyring",
                        "/usr/share/keyrings/debian-archive-keyring.gpg", "--export",
                        "A7236886F3CCCAAD148A27F80E98404D386FA1D9"], stdout=out, check=True,
                       stderr=subprocess.DEVNULL)
    f = _fetcher(workdir, suites=("trixie-backports",), keyring=str(keyring))
    with pytest.raises(KernelError) as e:
        f.index(refresh=True)
    msg = str(e.value)
    assert "\n" not in msg and "Release file of trixie-backports" in msg and "NO_PUBKEY" not in msg
    assert str(keyring) in msg and "debian-archive-keyring" in msg and "MEMCGSCOPE_KERNEL_SUITES" in msg


def test_an_unreachable_mirror_is_a_one_line_error(workdir):
    f = _fetcher(workdir, suites=("bookworm",), mirror="http://nonexistent.invalid/debian")
    with pytest.raises(KernelError) as e:
        f.ensure_kernel("6.1")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot reach http://nonexistent.invalid/debian")
    assert "nonexistent.invalid" in msg and "MEMCGSCOPE_DEBIAN_MIRROR" in msg
