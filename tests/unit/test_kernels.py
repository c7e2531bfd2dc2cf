"""collector/kernels.py without the network: version order, Packages
parsing, resolution (family -> newest, exact versions, the 7.x meta-package
split, 6.18's nearest headers, 5.10's upstream version), the one-line
errors, and the whole fetch/lay-out/remove cycle with .deb files built here
by dpkg-deb and an apt that only copies them."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import textwrap

import pytest

from memcgscope.collector import cli, kernels
from memcgscope.collector.kernels import (Apt, Cache, Fetcher, Index, KernelError, compare_versions,
                                          parse_packages, parse_spec, resolve_in, upstream_of)

# --- the fake archive --------------------------------------------------------

R510, R61, R612_12, R612_13, R612_118 = ("5.10.0-46-amd64", "6.1.0-57-amd64", "6.12.117+deb12-amd64",
                                         "6.12.117+deb13-amd64", "6.12.118+deb13-amd64")
R618, R73, R72 = "6.18.15+deb13-amd64", "7.3.4+deb13-amd64", "7.2.13+deb14-amd64"

# (suite, package, version, depends, files): the shapes of the real packages
# (the December 2026 archive); files: path -> content, or
# "->target" for a symlink
ARCHIVE = [
    # 5.10: the image in bullseye-security; kbuild is versioned >=, and an older one is there too
    ("bullseye-security", f"linux-image-{R510}", "5.10.262-1", "kmod, linux-base (>= 4.3~)",
     {f"boot/vmlinuz-{R510}": "vmlinuz 5.10", f"boot/config-{R510}": "CONFIG_MEMCG=y\n",
      f"lib/modules/{R510}/modules.builtin": "", f"lib/modules/{R510}/modules.order": ""}),
    ("bullseye-security", "linux-image-5.10.0-45-amd64", "5.10.259-1", "kmod", None),
    ("bullseye-security", f"linux-headers-{R510}", "5.10.262-1",
     "linux-headers-5.10.0-46-common (= 5.10.262-1), linux-kbuild-5.10 (>= 5.10.262-1), linux-compiler-gcc-10-x86",
     {f"usr/src/linux-headers-{R510}/include/generated/autoconf.h": "#define CONFIG_MEMCG 1\n",
      f"usr/src/linux-headers-{R510}/scripts": "->../../lib/linux-kbuild-5.10/scripts",
      f"lib/modules/{R510}/build": f"->/usr/src/linux-headers-{R510}"}),
    ("bullseye-security", "linux-headers-5.10.0-46-common", "5.10.262-1", "",
     {"usr/src/linux-headers-5.10.0-46-common/include/linux/memcontrol.h": "/* 5.10 */\n"}),
    ("bullseye-security", "linux-kbuild-5.10", "5.10.262-1", "",
     {"usr/lib/linux-kbuild-5.10/scripts/Makefile.build": ""}),
    ("bullseye", "linux-kbuild-5.10", "5.10.223-1", "", None),
    ("bullseye-security", "linux-image-amd64", "5.10.262-1", f"linux-image-{R510} (= 5.10.262-1)", None),
    # 6.1: the newest ABI is in bookworm-security; bullseye-security has an older 6.1 backport
    ("bookworm", "linux-image-6.1.0-50-amd64", "6.1.176-1", "kmod", None),
    ("bookworm-security", f"linux-image-{R61}", "6.1.192-3", "kmod",
     {f"boot/vmlinuz-{R61}": "vmlinuz 6.1", f"boot/config-{R61}": "CONFIG_MEMCG=y\n",
      f"lib/modules/{R61}/modules.order": ""}),
    ("bookworm-security", f"linux-headers-{R61}", "6.1.192-3",
     "linux-headers-6.1.0-57-common (= 6.1.192-3), linux-kbuild-6.1 (>= 6.1.192-3)",
     {f"usr/src/linux-headers-{R61}/include/generated/autoconf.h": "#define CONFIG_MEMCG 1\n",
      f"lib/modules/{R61}/build": f"->/usr/src/linux-headers-{R61}",
      f"lib/modules/{R61}/source": "->/usr/src/linux-headers-6.1.0-57-common"}),
    ("bookworm-security", "linux-headers-6.1.0-57-common", "6.1.192-3", "",
     {"usr/src/linux-headers-6.1.0-57-common/include/linux/memcontrol.h": "/* 6.1 */\n"}),
    ("bookworm-security", "linux-kbuild-6.1", "6.1.192-3", "", {"usr/lib/linux-kbuild-6.1/scripts/x": ""}),
    ("bullseye-security", "linux-image-6.1.0-0.deb11.52-amd64", "6.1.180-1~deb11u1", "kmod", None),
    ("bullseye-security", "linux-image-6.1-amd64", "6.1.180-1~deb11u1",
     "linux-image-6.1.0-0.deb11.52-amd64 (= 6.1.180-1~deb11u1)", None),
    # 6.12.117 built for bookworm (bookworm-security) and trixie; 6.12.118 only for trixie
    ("bookworm-security", f"linux-image-{R612_12}", "6.12.117-1~deb12u1", "kmod", None),
    ("bookworm-security", "linux-image-6.12.117+deb12-cloud-amd64", "6.12.117-1~deb12u1", "kmod", None),
    ("bookworm-security", f"linux-headers-{R612_12}", "6.12.117-1~deb12u1",
     f"linux-base (>= 4.12~), linux-headers-6.12.117+deb12-common (= 6.12.117-1~deb12u1), linux-image-{R612_12} "
     f"(= 6.12.117-1~deb12u1) | linux-image-{R612_12}-unsigned (= 6.12.117-1~deb12u1), "
     f"linux-kbuild-6.12.117+deb12, gcc-12",
     {f"usr/src/linux-headers-{R612_12}/include/generated/autoconf.h": "#define CONFIG_MEMCG 1\n",
      f"usr/src/linux-headers-{R612_12}/arch/x86/include/generated/asm/x.h": "",
      f"usr/src/linux-headers-{R612_12}/scripts": "->../../lib/linux-kbuild-6.12.117+deb12/scripts",
      f"lib/modules/{R612_12}/build": f"->/usr/src/linux-headers-{R612_12}",
      f"lib/modules/{R612_12}/source": "->/usr/src/linux-headers-6.12.117+deb12-common"}),
    ("bookworm-security", "linux-headers-6.12.117+deb12-common", "6.12.117-1~deb12u1", "",
     {"usr/src/linux-headers-6.12.117+deb12-common/include/linux/memcontrol.h": "/* 6.12 */\n",
      "usr/src/linux-headers-6.12.117+deb12-common/scripts": "->../../lib/linux-kbuild-6.12.117+deb12/scripts"}),
    ("bookworm-security", "linux-kbuild-6.12.117+deb12", "6.12.117-1~deb12u1", "",
     {"usr/lib/linux-kbuild-6.12.117+deb12/scripts/Makefile.build": ""}),
    ("trixie", f"linux-image-{R612_13}", "6.12.117-1", "kmod", None),
    ("trixie", f"linux-headers-{R612_13}", "6.12.117-1",
     "linux-headers-6.12.117+deb13-common (= 6.12.117-1), linux-kbuild-6.12.117+deb13", None),
    ("trixie", "linux-headers-6.12.117+deb13-common", "6.12.117-1", "", None),
    ("trixie", "linux-kbuild-6.12.117+deb13", "6.12.117-1", "", None),
    ("trixie-security", f"linux-image-{R612_118}", "6.12.118-1", "kmod", None),
    ("trixie-security", f"linux-headers-{R612_118}", "6.12.118-1",
     "linux-headers-6.12.118+deb13-common (= 6.12.118-1), linux-kbuild-6.12.118+deb13", None),
    ("trixie-security", "linux-headers-6.12.118+deb13-common", "6.12.118-1", "", None),
    ("trixie-security", "linux-kbuild-6.12.118+deb13", "6.12.118-1", "", None),
    # 6.18.15: one package with vmlinuz and modules (modules under /usr/lib), its
    # linux-base-<rel> dependency missing from the archive, and no headers anywhere
    ("trixie-backports", f"linux-image-{R618}", "6.18.15-1~bpo13+1",
     f"dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, kmod, "
     f"linux-base-{R618} (= 6.18.15-1~bpo13+1)",
     {f"boot/vmlinuz-{R618}": "vmlinuz 6.18", f"boot/config-{R618}": "CONFIG_MEMCG=y\n",
      f"usr/lib/modules/{R618}/modules.builtin": "", f"usr/lib/modules/{R618}/modules.order": ""}),
    # 7.3.4: linux-image-<rel> is a meta package; the files are in linux-binary/-modules/-base
    ("trixie-backports", f"linux-image-{R73}", "7.3.4-1~bpo13+1",
     f"dracut | initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool, linux-base-{R73} (= 7.3.4-1~bpo13+1), "
     f"linux-binary-{R73} (= 7.3.4-1~bpo13+1), linux-modules-{R73} (= 7.3.4-1~bpo13+1)", {}),
    ("trixie-backports", f"linux-binary-{R73}", "7.3.4-1~bpo13+1", f"linux-base-{R73} (= 7.3.4-1~bpo13+1)",
     {f"usr/lib/modules/{R73}/vmlinuz": "vmlinuz 7.3"}),
    ("trixie-backports", f"linux-modules-{R73}", "7.3.4-1~bpo13+1", f"kmod, linux-base-{R73} (= 7.3.4-1~bpo13+1)",
     {f"usr/lib/modules/{R73}/kernel/README": "no real modules here\n"}),
    ("trixie-backports", f"linux-base-{R73}", "7.3.4-1~bpo13+1", "",
     {f"usr/lib/modules/{R73}/config": "CONFIG_MEMCG=y\n", f"usr/lib/modules/{R73}/System.map": "stub\n",
      f"usr/lib/modules/{R73}/modules.builtin": "", f"usr/lib/modules/{R73}/modules.order": ""}),
    ("trixie-backports", f"linux-image-{R73}-dbg", "7.3.4-1~bpo13+1", f"linux-base-{R73} (= 7.3.4-1~bpo13+1)", None),
    ("trixie-backports", f"linux-headers-{R73}", "7.3.4-1~bpo13+1",
     f"gcc-14-for-host, linux-base (>= 4.12~), linux-base-{R73} (= 7.3.4-1~bpo13+1), "
     f"linux-headers-7.3.4+deb13-common (= 7.3.4-1~bpo13+1), linux-kbuild-7.3.4+deb13",
     {f"usr/src/linux-headers-{R73}/include/generated/autoconf.h": "#define CONFIG_MEMCG 1\n",
      f"lib/modules/{R73}/build": f"->/usr/src/linux-headers-{R73}",
      f"lib/modules/{R73}/source": "->/usr/src/linux-headers-7.3.4+deb13-common"}),
    ("trixie-backports", "linux-headers-7.3.4+deb13-common", "7.3.4-1~bpo13+1", "",
     {"usr/src/linux-headers-7.3.4+deb13-common/include/linux/memcontrol.h": "/* 7.3 */\n"}),
    ("trixie-backports", "linux-kbuild-7.3.4+deb13", "7.3.4-1~bpo13+1", "",
     {"usr/lib/linux-kbuild-7.3.4+deb13/scripts/Makefile.build": ""}),
    ("trixie-backports", "linux-image-amd64", "7.3.4-1~bpo13+1", f"linux-image-{R73} (= 7.3.4-1~bpo13+1)", None),
    # 7.2.13 in sid, same split
    ("sid", f"linux-image-{R72}", "7.2.13-1",
     f"linux-base-{R72} (= 7.2.13-1), linux-binary-{R72} (= 7.2.13-1), linux-modules-{R72} (= 7.2.13-1)", None),
    ("sid", f"linux-binary-{R72}", "7.2.13-1", "", None),
    ("sid", f"linux-modules-{R72}", "7.2.13-1", "", None),
    ("sid", f"linux-base-{R72}", "7.2.13-1", "", None),
    ("sid", f"linux-headers-{R72}", "7.2.13-1",
     "linux-headers-7.2.13+deb14-common (= 7.2.13-1), linux-kbuild-7.2.13+deb14", None),
    ("sid", "linux-headers-7.2.13+deb14-common", "7.2.13-1", "", None),
    ("sid", "linux-kbuild-7.2.13+deb14", "7.2.13-1", "", None),
    # not a kernel package: the index drops it
    ("sid", "linux-libc-dev", "7.2.13-1", "", None),
]


def _stanza(pkg, version, depends, deb=None):
    lines = [f"Package: {pkg}", "Source: linux", f"Version: {version}", "Architecture: amd64",
             "Maintainer: Debian Kernel Team <debian-kernel@lists.debian.org>"]
    if depends:
        lines.append(f"Depends: {depends}")
    lines += ["Description: a kernel package", " with a second description line: Depends: nothing"]
    if deb:
        lines += [f"Filename: pool/main/l/linux/{os.path.basename(deb)}", f"Size: {os.path.getsize(deb)}",
                  f"SHA256: {hashlib.sha256(open(deb, 'rb').read()).hexdigest()}"]
    else:
        lines += [f"Filename: pool/main/l/linux/{pkg}_{version}_amd64.deb", "Size: 1000"]
    return "\n".join(lines) + "\n"


def _build_deb(root, pool, pkg, version, files):
    d = os.path.join(root, f"{pkg}_{version}")
    os.makedirs(os.path.join(d, "DEBIAN"))
    with open(os.path.join(d, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {pkg}\nVersion: {version}\nArchitecture: amd64\nMaintainer: t <t@example.org>\n"
                f"Description: test\n")
    for path, content in files.items():
        full = os.path.join(d, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        if content.startswith("->"):
            os.symlink(content[2:], full)
        else:
            with open(full, "w") as f:
                f.write(content)
    deb = os.path.join(pool, f"{pkg}_{version.replace(':', '%3a')}_amd64.deb")
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z1", "-b", d, deb], check=True,
                   capture_output=True)
    return deb


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """{suite: Packages text} and the pool of .deb files they describe."""
    base = tmp_path_factory.mktemp("archive")
    pool = base / "pool"
    pool.mkdir()
    texts: dict[str, str] = {}
    for suite, pkg, version, depends, files in ARCHIVE:
        deb = _build_deb(str(base / "src"), str(pool), pkg, version, files) if files is not None else None
        texts[suite] = texts.get(suite, "") + _stanza(pkg, version, depends, deb) + "\n"
    return texts, str(pool)


@pytest.fixture(scope="module")
def index(archive):
    texts, _ = archive
    pkgs = [p for suite, text in texts.items() for p in parse_packages(text.encode(), suite)]
    return Index(pkgs, kernels.SUITES, 1.0, "amd64")


class FakeApt(Apt):
    """apt-get update/indextargets/cat-file/download over the fake archive;
    `update_output` replaces what `apt-get update` prints (errors)."""

    def __init__(self, cache, archive, update_output=None, update_rc=0):
        super().__init__(cache, arch="amd64")
        self.texts, self.pool = archive
        self.update_output, self.update_rc = update_output, update_rc
        self.downloads: list[str] = []
        self.updates = 0

    def _run(self, argv, cwd=None):
        assert argv[:2] == ["apt-get", "-c"] and argv[-1] == "update", argv
        self.updates += 1
        return subprocess.CompletedProcess(argv, self.update_rc, "", self.update_output or "Reading package lists...\n")

    def packages_files(self):
        return [(suite, suite) for suite in self.texts]

    def read_index(self, path):
        return self.texts[path].encode()

    def download(self, pkgs, dest):
        for p in pkgs:
            src = os.path.join(self.pool, os.path.basename(p.filename))
            if not os.path.exists(src):
                raise KernelError(f"test archive has no file for {p.spec}")
            shutil.copy(src, dest)
            self.downloads.append(p.spec)


@pytest.fixture
def fetcher(tmp_path, archive):
    cache = Cache(str(tmp_path / "cache"))
    f = Fetcher(cache, FakeApt(cache, archive), log=lambda msg: None, prefer_codename="bookworm")
    return f


# --- versions and parsing ----------------------------------------------------

@pytest.mark.parametrize("a,b,sign", [
    ("6.12.117-1~deb12u1", "6.12.117-1", -1),   # ~ sorts before everything
    ("7.3.4-1~bpo13+1", "7.3.4-1", -1),
    ("5.10.262-1", "5.10.259-1", 1),
    ("6.12.100-1", "6.12.99-1", 1),             # numerically, not as text
    ("1:1.0-1", "2.0-1", 1),                    # epoch first
    ("6.19~rc5-1~exp1", "6.19-1", -1),
    ("6.1.192-3", "6.1.192-3", 0),
    ("6.12.90-2~bpo12+1", "6.12.90-1~bpo12+1", 1),
])
def test_compare_versions_orders_as_dpkg(a, b, sign):
    c = compare_versions(a, b)
    assert (c > 0) - (c < 0) == sign
    dpkg = shutil.which("dpkg")
    if dpkg:  # and dpkg agrees
        rel = {1: "gt", 0: "eq", -1: "lt"}[sign]
        assert subprocess.run([dpkg, "--compare-versions", a, rel, b]).returncode == 0


def test_upstream_version_comes_from_the_package_version():
    # 5.10's uname -r (5.10.0-46-amd64) does not carry 5.10.262; its package version does
    assert upstream_of("5.10.262-1") == "5.10.262"
    assert upstream_of("6.12.117-1~deb12u1") == "6.12.117"
    assert upstream_of("7.3.4-1~bpo13+1") == "7.3.4"


def test_parse_packages_keeps_kernel_stanzas_with_their_fields(archive):
    texts, _ = archive
    pkgs = parse_packages(texts["sid"].encode(), "sid")
    names = {p.name for p in pkgs}
    assert f"linux-image-{R72}" in names and "linux-libc-dev" not in names
    img = next(p for p in pkgs if p.name == f"linux-image-{R72}")
    assert img.version == "7.2.13-1" and img.suite == "sid"
    assert (f"linux-binary-{R72}", "=", "7.2.13-1") in img.deps()
    assert not any(d[0] == "nothing" for d in img.deps())  # a description line is not a field


@pytest.mark.parametrize("spec,kind", [("6.12", "family"), ("5.10.262", "upstream"),
                                       ("6.12.117+deb12-amd64", "release"), ("5.10.0-46-amd64", "release")])
def test_parse_spec(spec, kind):
    assert parse_spec(spec) == (kind, spec)


# --- resolution --------------------------------------------------------------

def test_family_resolves_to_its_newest_and_says_so(index):
    r = resolve_in(index, "6.1", "bookworm")
    # the bookworm-security ABI, newer than bookworm's 6.1.176 and bullseye-security's 6.1.180
    assert (r.release, r.upstream, r.version, r.suite) == (R61, "6.1.192", "6.1.192-3", "bookworm-security")
    assert "newest 6.1" in r.note and "6.1.192" in r.note
    assert resolve_in(index, "6.12", "bookworm").release == R612_118
    assert resolve_in(index, "7.2", "bookworm").release == R72


def test_5_10_release_and_upstream_version(index):
    r = resolve_in(index, "5.10", "bookworm")
    assert (r.release, r.upstream, r.family) == (R510, "5.10.262", "5.10")
    assert resolve_in(index, "5.10.262", "bookworm").release == R510
    assert resolve_in(index, R510, "bookworm").upstream == "5.10.262"
    # linux-kbuild-5.10 (>= 5.10.262-1): not bullseye's older 5.10.223-1
    kbuild = next(p for p in r.headers if p.name == "linux-kbuild-5.10")
    assert kbuild.version == "5.10.262-1"


def test_one_upstream_built_twice_prefers_this_hosts_debian_release(index):
    r12 = resolve_in(index, "6.12.117", "bookworm")
    assert r12.release == R612_12 and R612_13 in r12.note
    assert resolve_in(index, "6.12.117", "trixie").release == R612_13
    assert resolve_in(index, R612_13, "bookworm").release == R612_13   # an exact release is exact
    # other flavours are only taken when named
    assert "cloud" not in resolve_in(index, "6.12.117", "bookworm").release
    assert resolve_in(index, "6.12.117+deb12-cloud-amd64", "bookworm").release == "6.12.117+deb12-cloud-amd64"


def test_7x_meta_package_resolves_to_binary_modules_base_and_kbuild(index):
    r = resolve_in(index, "7.3", "bookworm")
    assert r.release == R73
    assert [p.name for p in r.image] == [f"linux-base-{R73}", f"linux-binary-{R73}", f"linux-modules-{R73}"]
    assert [p.name for p in r.headers] == [f"linux-headers-{R73}", "linux-headers-7.3.4+deb13-common",
                                           "linux-kbuild-7.3.4+deb13"]
    assert r.headers_kind == "matching"


def test_6_18_uses_the_nearest_headers_and_tolerates_the_missing_linux_base(index):
    r = resolve_in(index, "6.18.15", "bookworm")
    assert [p.name for p in r.image] == [f"linux-image-{R618}"]
    assert (r.headers_kind, r.headers_release) == ("nearest", R612_12)
    assert [p.name for p in r.headers] == [f"linux-headers-{R612_12}", "linux-headers-6.12.117+deb12-common",
                                           "linux-kbuild-6.12.117+deb12"]
    assert "nearest" in r.note


def test_nearest_headers_prefer_older_over_newer(index):
    # 6.15 is 3 minors above 6.12 and 57 below 7.2: 6.12; 7.1 is 1 below 7.2 and 1 above 7.0 (none): 7.2
    hdrs, kind, rel = kernels.header_packages(index, "6.15.1-custom", "6.15.1", "", "", "bookworm")
    assert (kind, rel) == ("nearest", R612_12)
    hdrs, kind, rel = kernels.header_packages(index, "7.1.1-custom", "7.1.1", "", "", "bookworm")
    assert rel == R72


def test_unknown_family_is_a_one_line_error_naming_the_families(index):
    with pytest.raises(KernelError) as e:
        resolve_in(index, "4.19", "bookworm")
    msg = str(e.value)
    assert "\n" not in msg and "family 4.19" in msg and "bullseye" in msg and "sid" in msg
    assert "5.10, 6.1, 6.12, 6.18, 7.2, 7.3" in msg and "kernels.py update" in msg


def test_version_in_no_suite_is_a_one_line_error_naming_what_there_is(index):
    with pytest.raises(KernelError) as e:
        resolve_in(index, "6.12.999", "bookworm")
    msg = str(e.value)
    assert "\n" not in msg and "6.12.999" in msg and "6.12.117, 6.12.118" in msg and "family 6.12" in msg
    with pytest.raises(KernelError) as e:
        resolve_in(index, "6.12.999+deb12-amd64", "bookworm")
    assert "linux-image-6.12.999+deb12-amd64" in str(e.value) and "list --available" in str(e.value)


def test_a_spec_that_is_no_kernel_is_a_one_line_error():
    with pytest.raises(KernelError) as e:
        parse_spec("latest")
    assert "'latest'" in str(e.value) and "6.12.117+deb12-amd64" in str(e.value) and "\n" not in str(e.value)


# --- apt's configuration and errors --------------------------------------------

def test_private_apt_configuration_keeps_apt_off_the_system(tmp_path):
    apt = Apt(Cache(str(tmp_path)), arch="amd64")
    conf, sources = apt.conf_text(), apt.sources_text()
    for key in ("Dir::Etc::SourceList", "Dir::Etc::SourceParts", "Dir::State::Lists", "Dir::State::status",
                "Dir::Cache", "Dir::Log"):
        line = next(line for line in conf.splitlines() if line.startswith(key + " "))
        assert str(tmp_path) in line, line
    assert "#clear APT::Update::Post-Invoke-Success;" in conf and "#clear DPkg::Post-Invoke;" in conf
    assert len(sources.splitlines()) == len(kernels.SUITES)
    assert all(f"signed-by={kernels.KEYRING}" in line for line in sources.splitlines())
    assert "trusted=yes" not in sources
    assert "debian-security bookworm-security main" in sources and "/debian sid main" in sources


GPG_OUTPUT = textwrap.dedent("""\
    Get:1 http://deb.debian.org/debian trixie-backports InRelease [54.0 kB]
    Err:1 http://deb.debian.org/debian trixie-backports InRelease
      The following signatures couldn't be verified because the public key is not available: NO_PUBKEY 6ED0E7B82643E131 NO_PUBKEY 78DBA3BC47EF2265
    Reading package lists...
    W: GPG error: http://deb.debian.org/debian trixie-backports InRelease: The following signatures couldn't be verified because the public key is not available: NO_PUBKEY 6ED0E7B82643E131 NO_PUBKEY 78DBA3BC47EF2265
    E: The repository 'http://deb.debian.org/debian trixie-backports InRelease' is not signed.
    """)  # noqa: E501  (apt-get update 2.6, a keyring with only the 11/bullseye key)

DNS_OUTPUT = textwrap.dedent("""\
    Err:1 http://deb.debian.org/debian bullseye InRelease
      Temporary failure resolving 'deb.debian.org'
    Reading package lists...
    W: Failed to fetch http://deb.debian.org/debian/dists/bullseye/InRelease  Temporary failure resolving 'deb.debian.org'
    W: Some index files failed to download. They have been ignored, or old ones used instead.
    """)  # noqa: E501


def test_a_suite_signed_by_a_key_the_keyring_lacks_is_a_one_line_error(fetcher, archive):
    fetcher.apt.update_output, fetcher.apt.update_rc = GPG_OUTPUT, 100
    with pytest.raises(KernelError) as e:
        fetcher.ensure_kernel("7.3")
    msg = str(e.value)
    assert "\n" not in msg and "trixie-backports" in msg and "6ED0E7B82643E131 78DBA3BC47EF2265" in msg
    assert kernels.KEYRING in msg and "debian-archive-keyring" in msg and "MEMCGSCOPE_KERNEL_SUITES" in msg


def test_no_network_is_a_one_line_error_naming_the_mirror_and_the_fix(fetcher):
    fetcher.apt.update_output = DNS_OUTPUT  # apt-get update exits 0 here
    with pytest.raises(KernelError) as e:
        fetcher.ensure_kernel("6.1")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("cannot reach http://deb.debian.org/debian")
    assert "Temporary failure resolving 'deb.debian.org'" in msg and "proxy" in msg
    assert not os.path.exists(fetcher.cache.p("apt", "index.json"))


def test_a_missing_keyring_is_a_one_line_error(tmp_path):
    apt = Apt(Cache(str(tmp_path)), keyring=str(tmp_path / "none.gpg"), arch="amd64")
    with pytest.raises(KernelError) as e:
        apt.prepare()
    assert "none.gpg" in str(e.value) and "apt-get install debian-archive-keyring" in str(e.value)


# --- fetch, lay out, remove ------------------------------------------------------

def test_fetch_7x_lays_out_vmlinuz_modules_and_headers_for_vng_and_bcc(fetcher):
    kf = fetcher.ensure_kernel("7.3")
    cache = fetcher.cache.root
    assert (kf.release, kf.upstream, kf.headers_kind) == (R73, "7.3.4", "matching")
    # vmlinuz and config out of /usr/lib/modules/<rel> into boot/, modules in lib/modules
    assert kf.vmlinuz == f"{cache}/kernels/{R73}/boot/vmlinuz-{R73}" and open(kf.vmlinuz).read() == "vmlinuz 7.3"
    assert open(f"{cache}/kernels/{R73}/boot/config-{R73}").read() == "CONFIG_MEMCG=y\n"
    assert kf.modules_dir == f"{cache}/kernels/{R73}/lib/modules/{R73}"
    assert os.path.exists(os.path.join(kf.modules_dir, "modules.dep"))  # depmod ran
    # build/source: relative links into the shared header unpack, which resolve
    for link, target in (("build", f"usr/src/linux-headers-{R73}"),
                         ("source", "usr/src/linux-headers-7.3.4+deb13-common")):
        path = os.path.join(kf.modules_dir, link)
        assert not os.readlink(path).startswith("/")
        assert os.path.realpath(path) == os.path.realpath(f"{cache}/headers/{R73}/{target}")
    assert os.path.isfile(os.path.join(kf.headers_dir, "include/generated/autoconf.h"))
    # the packages' absolute links into the host's /usr/src are gone
    assert not os.path.lexists(f"{cache}/headers/{R73}/lib")
    # vng boots it with the cache mapped at its own path and its boot/ as /boot
    assert kf.vng_args() == ["-r", kf.vmlinuz, f"--rodir={cache}", f"--rodir=/boot={cache}/kernels/{R73}/boot"]
    # nothing left in flight, nothing outside the cache
    assert os.listdir(fetcher.cache.p("debs")) == []
    m = fetcher.manifests()[0]
    assert m["outside_cache"] == [] and all(p.startswith(cache + "/") for p in m["paths"])
    assert [p["name"] for p in m["kernel"]["packages"]] == [f"linux-base-{R73}", f"linux-binary-{R73}",
                                                           f"linux-modules-{R73}"]


def test_a_second_fetch_downloads_nothing_and_needs_no_network(fetcher, archive):
    fetcher.ensure_kernel("7.3.4")
    n, updates = len(fetcher.apt.downloads), fetcher.apt.updates
    again = Fetcher(fetcher.cache, FakeApt(fetcher.cache, archive, update_output=DNS_OUTPUT),
                    log=lambda m: None, prefer_codename="bookworm")
    for spec in ("7.3.4", R73, "7.3"):
        assert again.ensure_kernel(spec).release == R73
    assert again.apt.downloads == [] and again.apt.updates == 0
    assert len(fetcher.apt.downloads) == n and fetcher.apt.updates == updates
    assert kernels.lookup("7.3", cache=fetcher.cache.root).release == R73


def test_fetch_6_18_builds_a_nearest_header_tree_where_probes_look(fetcher):
    kf = fetcher.ensure_kernel("6.18.15")
    cache = fetcher.cache.root
    tree = f"{cache}/kheaders/{R618}"
    assert (kf.headers_kind, kf.headers_dir) == ("nearest", tree)
    assert open(f"{tree}/.memcgscope-source").read() == \
        f"linux-headers-{R612_12} 6.12.117-1~deb12u1, nearest\n"
    # one tree: -common's include/linux and the arch part's include/generated
    assert open(f"{tree}/include/linux/memcontrol.h").read() == "/* 6.12 */\n"
    assert os.path.isfile(f"{tree}/include/generated/autoconf.h")
    # the arch part's relative scripts link still leads to linux-kbuild's scripts
    assert os.path.isfile(f"{tree}/scripts/Makefile.build")
    assert not os.path.lexists(os.path.join(kf.modules_dir, "build"))  # no pretence of matching headers
    assert os.path.isfile(f"{cache}/kernels/{R618}/boot/vmlinuz-{R618}")
    assert os.path.isdir(kf.modules_dir) and not os.path.exists(f"{cache}/kernels/{R618}/usr/lib/modules/{R618}")


def test_host_headers_share_the_unpack_and_remove_takes_only_what_nobody_uses(fetcher):
    fetcher.ensure_kernel("6.18.15")
    n = len(fetcher.apt.downloads)
    t = fetcher.ensure_host_headers("6.18.44-fc-v669")
    cache = fetcher.cache.root
    assert (t.kind, t.path) == ("nearest", f"{cache}/kheaders/6.18.44-fc-v669")
    assert len(fetcher.apt.downloads) == n  # the 6.12.117+deb12 headers were unpacked already
    assert fetcher.ensure_host_headers("6.18.44-fc-v669").path == t.path
    # a Debian release gets its own headers, "matching"
    assert fetcher.ensure_host_headers(R61).kind == "matching"

    removed = fetcher.remove("6.18.15")
    assert f"{cache}/kernels/{R618}" in removed and f"{cache}/kheaders/{R618}" in removed
    assert os.path.isdir(f"{cache}/headers/{R612_12}")  # the host tree still uses it
    removed = fetcher.remove("6.18.44-fc-v669")
    assert f"{cache}/headers/{R612_12}" in removed and not os.path.exists(t.path)
    assert [m["release"] for m in fetcher.manifests()] == [R61]


def test_remove_of_something_not_fetched_is_a_one_line_error(fetcher):
    fetcher.ensure_kernel("5.10")
    with pytest.raises(KernelError) as e:
        fetcher.remove("6.12")
    msg = str(e.value)
    assert "'6.12'" in msg and fetcher.cache.root in msg and R510 in msg and "\n" not in msg


def test_a_download_that_does_not_match_the_signed_index_is_refused(fetcher, archive, tmp_path):
    texts, pool = archive
    bad_pool = tmp_path / "badpool"
    shutil.copytree(pool, bad_pool)
    deb = next(bad_pool.glob(f"linux-image-{R510}_*.deb"))
    with open(deb, "ab") as f:
        f.write(b"tampered")
    fetcher.apt.pool = str(bad_pool)
    with pytest.raises(KernelError) as e:
        fetcher.ensure_kernel("5.10.262")
    assert "SHA256" in str(e.value) and deb.name in str(e.value)
    assert fetcher.lookup("5.10.262") is None


# --- command line ------------------------------------------------------------------

def test_cli_wires_kernels_and_errors_are_one_line(tmp_path, capsys):
    assert "kernels" in cli.COMMANDS
    rc = cli.main(["kernels", "--cache", str(tmp_path), "remove", "6.1"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and err.startswith("memcgscope kernels: error: no fetched kernel '6.1'")
    assert cli.main(["kernels", "--cache", str(tmp_path), "list"]) == 0
    rc = kernels.main(["--cache", str(tmp_path), "fetch", "newest"])
    assert rc == 1 and "'newest' is not a family" in capsys.readouterr().err
