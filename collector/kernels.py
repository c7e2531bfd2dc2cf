"""Debian kernels fetched into memcgscope's cache, never installed.

`ensure_kernel("6.12")` (a family, an upstream version such as `5.10.262`,
or an exact `uname -r` such as `6.12.117+deb12-amd64`) downloads the
kernel's image, modules and headers with `apt-get download` from a private
apt configuration in the cache, unpacks them with `dpkg-deb -x` and lays
them out for virtme-ng and bcc. `ensure_host_headers()` gives bcc headers
for the running kernel the same way (setup.sh). Nothing here installs a
package, writes /boot, /lib/modules or /etc/apt, or touches apt's and
dpkg's state: every apt call gets its own sources, lists, cache and status
file (`Apt.base_argv`).

Stdlib only: scripts/setup.sh runs this file with /usr/bin/python3 before
any virtual environment exists (`python3 collector/kernels.py host-headers`).

Cache layout (`MEMCGSCOPE_CACHE`, default /var/cache/memcgscope):

    apt/                   sources.list, apt.conf, lists/, cache/, index.json
    debs/                  downloads in flight (deleted once unpacked)
    kernels/<rel>/         boot/{vmlinuz,config,System.map}-<rel>, lib/modules/<rel>/
    headers/<rel>/         the unpacked header packages of one release (shared)
    kheaders/<rel>/        one merged header tree for bcc (probes/detect.py reads it)
    manifests/<rel>.json   what was fetched for <rel> and every path it created

Layout decision: a guest sees the host's /usr and /lib, but its /var/cache,
/tmp and /mnt are fresh tmpfs (virtme-ng 1.42 virtme-init mounts tmpfs on
/var/cache). Rather than copying ~0.2-1 GB of modules per kernel into the
host's /lib/modules (package-manager territory, where a later
`apt install linux-image-<rel>` would collide with them), everything stays
in the cache and `KernelFiles.vng_args()` maps the cache read-only into the
guest at the same path (`--rodir=CACHE`), plus the kernel's own boot/ as the
guest's /boot (doctor reads /boot/config-<rel>). vng finds the modules by
walking up from the image (kernels/<rel>/boot/vmlinuz-<rel> ->
kernels/<rel>/lib/modules/<rel>) and links /lib/modules/<rel> in the guest
to that path, so `build`/`source` there (relative links into headers/<rel>)
resolve for bcc. Nothing is written outside the cache.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

__all__ = ["KernelError", "KernelFiles", "HeadersTree", "Package", "Index", "Resolution", "Cache", "Apt",
           "ensure_kernel", "ensure_host_headers", "lookup", "resolve", "remove", "fetched",
           "compare_versions", "parse_spec", "add_parser", "run", "main"]

DEFAULT_CACHE = "/var/cache/memcgscope"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"

# Where each Debian kernel line lives (seen in the archive, December 2026):
# 5.10 in bullseye(-security); 6.1 in bookworm, and newer 6.1 ABIs in
# bookworm-security (linux-image-amd64 6.1.192-3 -> 6.1.0-57) and
# bullseye-security (6.1.0-0.deb11.N); 6.12.117+deb12 only in
# bookworm-security (6.12.117-1~deb12u1; bookworm-backports stops at 6.12.95);
# 6.12 in trixie(-security); 6.16-7.3 in trixie-backports; 7.2 in sid.
SUITES = ("bullseye", "bullseye-security", "bookworm", "bookworm-security", "bookworm-backports",
          "trixie", "trixie-security", "trixie-backports", "sid")

# Package families the index keeps (everything else in the Packages lists is dropped).
_INDEX_RE = re.compile(rb"^Package: linux-(?:image|headers|binary|modules|base|kbuild)-", re.M)
# A real kernel release starts with three numbers (5.10.0-46-amd64, 6.12.117+deb12-amd64);
# the meta packages linux-image-amd64 / linux-image-6.1-amd64 do not.
_RELEASE_RE = re.compile(r"^\d+\.\d+\.\d+[-+.~]")
INDEX_SCHEMA = 1
MANIFEST_SCHEMA = 1


class KernelError(Exception):
    """A one-line error naming the thing, the place and the fix."""


# --- Debian versions ----------------------------------------------------------

def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    # dpkg's lib/dpkg/version.c verrevcmp, character for character
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e)
    upstream, _, revision = v.rpartition("-")
    if not upstream:
        upstream, revision = revision, ""
    return epoch, upstream, revision


def compare_versions(a: str, b: str) -> int:
    """<0, 0, >0 as Debian orders versions a and b (dpkg --compare-versions)."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


class _V:
    """Sort key for Debian versions."""
    __slots__ = ("v",)

    def __init__(self, v: str):
        self.v = v

    def __lt__(self, other: "_V") -> bool:
        return compare_versions(self.v, other.v) < 0

    def __eq__(self, other) -> bool:
        return compare_versions(self.v, other.v) == 0


def upstream_of(version: str) -> str:
    """5.10.262-1 -> 5.10.262; 6.12.117-1~deb12u1 -> 6.12.117; 7.3.4-1~bpo13+1 -> 7.3.4."""
    return _split_version(version)[1]


def family_of(upstream: str) -> str:
    m = re.match(r"^(\d+)\.(\d+)", upstream)
    return f"{m.group(1)}.{m.group(2)}" if m else upstream


def _num(family: str) -> int:
    major, minor = family.split(".")[:2]
    return int(major) * 1000 + int(minor)


def _patch(upstream: str) -> int:
    m = re.match(r"^\d+\.\d+\.(\d+)", upstream)
    return int(m.group(1)) if m else 0


# --- the index ----------------------------------------------------------------

@dataclass(frozen=True)
class Package:
    name: str
    version: str
    suite: str
    depends: str = ""
    size: int = 0
    sha256: str = ""
    filename: str = ""
    architecture: str = ""

    @property
    def spec(self) -> str:
        return f"{self.name}={self.version}"

    def deps(self) -> list[tuple[str, str | None, str | None]]:
        """Every alternative of every Depends entry as (name, op, version)."""
        out = []
        for entry in self.depends.split(","):
            for alt in entry.split("|"):
                m = re.match(r"\s*([^\s(]+)\s*(?:\(\s*([<>=]+)\s*([^)\s]+)\s*\))?", alt)
                if m and m.group(1):
                    out.append((m.group(1).split(":")[0], m.group(2), m.group(3)))
        return out


def _satisfies(version: str, op: str | None, want: str | None) -> bool:
    if not op:
        return True
    c = compare_versions(version, want)
    return {"=": c == 0, ">=": c >= 0, "<=": c <= 0, ">>": c > 0, "<<": c < 0}.get(op, False)


def parse_packages(data: bytes, suite: str) -> list[Package]:
    """The kernel-related stanzas of one Packages file."""
    out = []
    for m in _INDEX_RE.finditer(data):
        end = data.find(b"\n\n", m.start())
        stanza = data[m.start():end if end >= 0 else len(data)].decode("utf-8", "replace")
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] in (" ", "\t") or ":" not in line:
                continue
            k, v = line.split(":", 1)
            fields[k] = v.strip()
        try:
            out.append(Package(fields["Package"], fields["Version"], suite, fields.get("Depends", ""),
                               int(fields.get("Size", "0") or 0), fields.get("SHA256", ""),
                               fields.get("Filename", ""), fields.get("Architecture", "")))
        except KeyError:
            continue
    return out


@dataclass
class Index:
    """Kernel packages of every configured suite, from the signed Packages lists."""
    packages: list[Package]
    suites: tuple[str, ...] = SUITES
    updated: float = 0.0
    arch: str = "amd64"

    def __post_init__(self):
        self._by_name: dict[str, list[Package]] = {}
        rank = {s: i for i, s in enumerate(self.suites)}
        seen = set()
        for p in sorted(self.packages, key=lambda p: rank.get(p.suite, len(rank))):
            if (p.name, p.version) in seen:
                continue  # the same build in two suites: keep the first suite listed
            seen.add((p.name, p.version))
            self._by_name.setdefault(p.name, []).append(p)

    def versions(self, name: str) -> list[Package]:
        return list(self._by_name.get(name, []))

    def names(self) -> list[str]:
        return list(self._by_name)

    def find(self, name: str, op: str | None = None, want: str | None = None,
             prefer_suite: str | None = None) -> Package | None:
        cands = [p for p in self._by_name.get(name, []) if _satisfies(p.version, op, want)]
        if not cands:
            return None
        return max(cands, key=lambda p: (p.suite == prefer_suite, _V(p.version)))

    def to_json(self) -> dict:
        return {"schema": INDEX_SCHEMA, "updated": self.updated, "suites": list(self.suites), "arch": self.arch,
                "packages": [dataclasses.astuple(p) for p in self.packages]}

    @classmethod
    def from_json(cls, d: dict) -> "Index":
        return cls([Package(*p) for p in d["packages"]], tuple(d["suites"]), d["updated"], d.get("arch", "amd64"))

    # kernels: one candidate per linux-image-<release> build
    def kernels(self, flavour: str | None = None) -> list["Candidate"]:
        flavour = flavour or self.arch
        out = []
        for name, versions in self._by_name.items():
            if not name.startswith("linux-image-"):
                continue
            release = name[len("linux-image-"):]
            if not _RELEASE_RE.match(release) or release.endswith(("-dbg", "-unsigned")):
                continue
            for p in versions:
                out.append(Candidate(release, upstream_of(p.version), p, _flavour(release) == flavour))
        return out

    def header_releases(self, flavour: str | None = None) -> list["Candidate"]:
        flavour = flavour or self.arch
        out = []
        for name, versions in self._by_name.items():
            if not name.startswith("linux-headers-"):
                continue
            release = name[len("linux-headers-"):]
            if not _RELEASE_RE.match(release) or _flavour(release) != flavour:
                continue
            for p in versions:
                if any(d[0].startswith("linux-headers-") and d[0].endswith("-common") for d in p.deps()):
                    out.append(Candidate(release, upstream_of(p.version), p, True))
        return out


def _flavour(release: str) -> str:
    # 6.12.117+deb12-cloud-amd64 -> cloud-amd64; 5.10.0-46-amd64 -> amd64
    m = re.match(r"^\d+\.\d+\.\d+(?:[-+.~][0-9a-z.~+]*?\d+)*-(.+)$", release)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class Candidate:
    release: str
    upstream: str
    package: Package
    default_flavour: bool

    @property
    def family(self) -> str:
        return family_of(self.upstream)


# --- resolution ---------------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str]:
    """("family" | "upstream" | "release", spec)."""
    s = spec.strip()
    if re.fullmatch(r"\d+\.\d+", s):
        return "family", s
    if re.fullmatch(r"\d+\.\d+\.\d+", s):
        return "upstream", s
    if _RELEASE_RE.match(s) and re.fullmatch(r"[0-9A-Za-z.+~-]+", s):
        return "release", s
    raise KernelError(f"kernel {spec!r} is not a family (6.12), an upstream version (6.12.117) or a "
                      f"uname -r (6.12.117+deb12-amd64); give one of those")


@dataclass
class Resolution:
    spec: str
    release: str
    upstream: str
    version: str          # the Debian package version, e.g. 5.10.262-1
    suite: str
    image: list[Package]  # what holds vmlinuz, modules, config
    headers: list[Package]
    headers_kind: str     # "matching" | "nearest"
    headers_release: str
    note: str             # how the spec was resolved, for people

    @property
    def family(self) -> str:
        return family_of(self.upstream)


def _codename_rank(suite: str, prefer: str | None) -> int:
    return 1 if prefer and suite.split("-")[0] == prefer else 0


def _pick(cands: list[Candidate], prefer_codename: str | None) -> Candidate:
    # newest upstream; for one upstream built twice (6.12.117+deb12 in bookworm-security,
    # +deb13 in trixie) the build for this host's Debian release, then the newest Debian version
    return max(cands, key=lambda c: (_V(c.upstream), _codename_rank(c.package.suite, prefer_codename),
                                     _V(c.package.version), c.release))


def resolve_in(index: Index, spec: str, prefer_codename: str | None = None, *,
               headers: bool = True) -> Resolution:
    """Resolve `spec` against `index` (no network)."""
    kind, s = parse_spec(spec)
    kernels = index.kernels()
    where = ", ".join(index.suites)
    if kind == "family":
        cands = [c for c in kernels if c.default_flavour and c.family == s]
        if not cands:
            fams = sorted({c.family for c in kernels if c.default_flavour}, key=_num)
            raise KernelError(f"no Debian kernel of family {s} in {where} (families there: {', '.join(fams)}); "
                              f"pick one of those, or run 'kernels.py update' if {s} is new")
        c = _pick(cands, prefer_codename)
        note = f"{s} -> {c.upstream} ({c.release}, {c.package.version} in {c.package.suite}), the newest {s}"
    elif kind == "upstream":
        cands = [c for c in kernels if c.default_flavour and c.upstream == s]
        if not cands:
            same = sorted({c.upstream for c in kernels if c.default_flavour and c.family == family_of(s)}, key=_V)
            have = f"{family_of(s)} has {', '.join(same)}" if same else f"no {family_of(s)} kernel at all"
            raise KernelError(f"no Debian kernel {s} in {where} ({have}); pick one of those or the family "
                              f"{family_of(s)}, or run 'kernels.py update' if {s} is new")
        c = _pick(cands, prefer_codename)
        others = sorted({x.release for x in cands} - {c.release})
        note = f"{s} -> {c.release} ({c.package.version} in {c.package.suite})" + (
            f"; also built as {', '.join(others)}" if others else "")
    else:
        cands = [c for c in kernels if c.release == s]
        if not cands:
            near = sorted({c.release for c in kernels if c.default_flavour and c.family == family_of(s)}, key=_V)
            hint = f" ({family_of(s)} there: {', '.join(near[-4:])})" if near else ""
            raise KernelError(f"no Debian package linux-image-{s} in {where}{hint}; give a release from "
                              f"'kernels.py list --available', or run 'kernels.py update' if it is new")
        c = max(cands, key=lambda c: _V(c.package.version))
        note = f"{s} ({c.package.version} in {c.package.suite}, upstream {c.upstream})"
    image = image_packages(index, c)
    hdrs, hkind, hrel = ([], "none", "")
    if headers:
        hdrs, hkind, hrel = header_packages(index, c.release, c.upstream, c.package.version, c.package.suite,
                                            prefer_codename)
        if hkind == "nearest":
            note += f"; Debian has no headers for it, using the nearest: {hrel}"
    return Resolution(spec, c.release, c.upstream, c.package.version, c.package.suite, image, hdrs, hkind,
                      hrel, note)


def image_packages(index: Index, c: Candidate) -> list[Package]:
    """The packages that carry vmlinuz, modules and config of one kernel build.

    Up to 6.x linux-image-<rel> holds the files itself (6.18: plus
    linux-base-<rel>, config and modules.builtin). From 6.19 on Debian's
    linux-image-<rel> is a meta package: vmlinuz in linux-binary-<rel>,
    modules in linux-modules-<rel>, config in linux-base-<rel> (7.3.4-1~bpo13+1,
    trixie-backports)."""
    img = c.package
    parts = []
    for name, op, ver in img.deps():
        if name in (f"linux-binary-{c.release}", f"linux-modules-{c.release}", f"linux-base-{c.release}"):
            p = index.find(name, op, ver, prefer_suite=img.suite)
            if p is None and name.startswith("linux-base-"):
                # linux-image-6.18.15+deb13-amd64 6.18.15-1~bpo13+1 depends on a
                # linux-base-6.18.15+deb13-amd64 that trixie-backports does not carry
                # (December 2026); it only adds config and modules.builtin, which the
                # 6.18 image package has itself
                continue
            if p is None:
                raise KernelError(f"linux-image-{c.release} {img.version} needs {name} ({op or ''} {ver or ''}), "
                                  f"which no suite in the index has; run 'kernels.py update' and retry")
            if p not in parts:
                parts.append(p)
    if any(p.name.startswith("linux-binary-") for p in parts):
        return parts  # the meta package itself holds no files
    return [img] + parts


def header_packages(index: Index, release: str, upstream: str, version: str, suite: str,
                    prefer_codename: str | None) -> tuple[list[Package], str, str]:
    """(packages, "matching" | "nearest", headers release) for a kernel."""
    exact = index.find(f"linux-headers-{release}", "=", version) or index.find(f"linux-headers-{release}")
    if exact is not None:
        return _header_set(index, exact), "matching", release
    cands = index.header_releases()
    if not cands:
        raise KernelError(f"no linux-headers-* packages in {', '.join(index.suites)} at all; "
                          f"run 'kernels.py update' (the index may be empty)")
    want_f, want_p = _num(family_of(upstream)), _patch(upstream)

    def cost(c: Candidate):
        # minor versions away (a newer one costs double: its headers may name
        # things the running kernel lacks), then patch levels away, then this
        # host's Debian release, then the newest build
        d = want_f - _num(c.family)
        fam = d if d >= 0 else -2 * d + 1
        dp = want_p - _patch(c.upstream) if d == 0 else 0
        pat = dp if dp >= 0 else -2 * dp + 1
        return (fam, pat, -_codename_rank(c.package.suite, prefer_codename), _Neg(_V(c.package.version)))
    best = min(cands, key=cost)
    return _header_set(index, best.package), "nearest", best.release


class _Neg:
    __slots__ = ("k",)

    def __init__(self, k):
        self.k = k

    def __lt__(self, other):
        return other.k < self.k

    def __eq__(self, other):
        return self.k == other.k


def _header_set(index: Index, arch: Package) -> list[Package]:
    # linux-headers-<rel> (arch part) + its -common + linux-kbuild-*; gcc,
    # linux-base and the image alternatives it also depends on are not headers
    out = [arch]
    for name, op, ver in arch.deps():
        if (name.startswith("linux-headers-") and name.endswith("-common")) or name.startswith("linux-kbuild-"):
            p = index.find(name, op, ver, prefer_suite=arch.suite)
            if p is None:
                raise KernelError(f"{arch.name} {arch.version} needs {name} ({op or ''} {ver or ''}), which no "
                                  f"suite in the index has; run 'kernels.py update' and retry")
            if p not in out:
                out.append(p)
    if not any(p.name.endswith("-common") for p in out):
        raise KernelError(f"{arch.name} {arch.version} ({arch.suite}) names no linux-headers-*-common package; "
                          f"it cannot be used as a header tree; report this Debian package layout")
    return out


# --- apt, privately -----------------------------------------------------------

def host_arch() -> str:
    try:
        return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                              check=True).stdout.strip() or "amd64"
    except (OSError, subprocess.CalledProcessError):
        return "amd64"


def host_codename(os_release: str = "/etc/os-release") -> str | None:
    try:
        with open(os_release) as f:
            for line in f:
                if line.startswith("VERSION_CODENAME="):
                    return line.split("=", 1)[1].strip().strip('"') or None
    except OSError:
        pass
    return None


class Cache:
    """Paths inside memcgscope's cache."""

    def __init__(self, root: str | None = None):
        self.root = os.path.abspath(root or os.environ.get("MEMCGSCOPE_CACHE") or DEFAULT_CACHE)

    def p(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    @property
    def apt(self) -> str:
        return self.p("apt")

    def kernel(self, rel: str) -> str:
        return self.p("kernels", rel)

    def headers(self, rel: str) -> str:
        return self.p("headers", rel)

    def kheaders(self, rel: str) -> str:
        return self.p("kheaders", rel)

    def manifest(self, rel: str) -> str:
        return self.p("manifests", rel + ".json")

    def makedirs(self, path: str) -> None:
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            raise KernelError(f"cannot create {path}: {e.strerror}; run as root or set MEMCGSCOPE_CACHE to a "
                              f"writable directory") from e


class _Lock:
    """One writer at a time per cache (two setup runs at once); re-entrant."""

    def __init__(self, cache: Cache):
        self.cache = cache
        self.depth = 0
        self.f = None

    def __enter__(self):
        if self.depth == 0:
            self.cache.makedirs(self.cache.root)
            self.f = open(self.cache.p(".lock"), "w")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            fcntl.flock(self.f, fcntl.LOCK_UN)
            self.f.close()


class Apt:
    """apt-get with a configuration of its own, kept in CACHE/apt.

    Sources, lists, package cache, state and dpkg status all point into the
    cache, so /etc/apt, /var/lib/apt and /var/cache/apt stay untouched (the
    host's apt.conf.d is still read, for proxies; its update/dpkg hooks are
    cleared). Every suite is checked against the installed Debian archive
    keyring (Signed-By), never trusted blindly."""

    def __init__(self, cache: Cache, suites: tuple[str, ...] | None = None, keyring: str | None = None,
                 mirror: str | None = None, security_mirror: str | None = None, arch: str | None = None):
        self.cache = cache
        env_suites = os.environ.get("MEMCGSCOPE_KERNEL_SUITES", "").split()
        self.suites = tuple(suites or env_suites or SUITES)
        self.keyring = keyring or os.environ.get("MEMCGSCOPE_KEYRING") or KEYRING
        self.mirror = (mirror or os.environ.get("MEMCGSCOPE_DEBIAN_MIRROR") or MIRROR).rstrip("/")
        self.security_mirror = (security_mirror or os.environ.get("MEMCGSCOPE_DEBIAN_SECURITY_MIRROR")
                                or SECURITY_MIRROR).rstrip("/")
        self.arch = arch or host_arch()
        self.dir = cache.apt

    def uri(self, suite: str) -> str:
        return self.security_mirror if suite.endswith("-security") else self.mirror

    def sources_text(self) -> str:
        return "".join(f"deb [signed-by={self.keyring} arch={self.arch} targets=Packages] {self.uri(s)} {s} main\n"
                       for s in self.suites)

    def conf_text(self) -> str:
        d = self.dir
        return "\n".join([
            "// memcgscope's private apt configuration (collector/kernels.py); /etc/apt is not used for sources",
            f'Dir::Etc::SourceList "{d}/sources.list";',
            f'Dir::Etc::SourceParts "{d}/empty";',
            f'Dir::Etc::Preferences "{d}/empty/preferences";',
            f'Dir::Etc::PreferencesParts "{d}/empty";',
            f'Dir::State "{d}/state/";',
            f'Dir::State::Lists "{d}/lists/";',
            f'Dir::State::status "{d}/status";',
            f'Dir::Cache "{d}/cache/";',
            # no binary caches: 2 x 113 MB for these 9 suites, to save ~2 s per apt-get download
            'Dir::Cache::pkgcache "";',
            'Dir::Cache::srcpkgcache "";',
            f'Dir::Log "{d}/log/";',
            'Acquire::Languages "none";',
            "#clear APT::Update::Pre-Invoke;",
            "#clear APT::Update::Post-Invoke;",
            "#clear APT::Update::Post-Invoke-Success;",
            "#clear DPkg::Pre-Invoke;",
            "#clear DPkg::Post-Invoke;",
            "#clear DPkg::Pre-Install-Pkgs;",
            "",
        ])

    def config_key(self) -> str:
        return hashlib.sha256((self.sources_text() + self.conf_text()).encode()).hexdigest()[:16]

    def prepare(self) -> None:
        if not os.path.isfile(self.keyring):
            raise KernelError(f"the Debian archive keyring {self.keyring} is missing; "
                              f"apt-get install debian-archive-keyring (or set MEMCGSCOPE_KEYRING)")
        for sub in ("lists/partial", "cache/archives/partial", "state", "log", "empty"):
            self.cache.makedirs(os.path.join(self.dir, sub))
        _write_if_changed(os.path.join(self.dir, "sources.list"), self.sources_text())
        _write_if_changed(os.path.join(self.dir, "apt.conf"), self.conf_text())
        status = os.path.join(self.dir, "status")
        if not os.path.exists(status):
            open(status, "w").close()

    def base_argv(self, tool: str = "apt-get") -> list[str]:
        return [tool, "-c", os.path.join(self.dir, "apt.conf"), "-q"]

    def _run(self, argv: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
        try:
            return subprocess.run(argv, capture_output=True, text=True, cwd=cwd,
                                  env=dict(os.environ, LC_ALL="C", DEBIAN_FRONTEND="noninteractive"))
        except FileNotFoundError as e:
            raise KernelError(f"{argv[0]} not found; this needs Debian's apt and dpkg (apt-get install apt)") from e

    def update(self) -> None:
        self.prepare()
        r = self._run(self.base_argv() + ["update"])
        _check_update(r.returncode, r.stdout + r.stderr, self)

    def packages_files(self) -> list[tuple[str, str]]:
        r = self._run(self.base_argv() + ["indextargets", "--format", "$(FILENAME)\t$(CODENAME)\t$(RELEASE)",
                                          "Identifier: Packages"])
        if r.returncode != 0:
            raise KernelError(f"apt-get indextargets failed in {self.dir}: {_first_line(r.stderr)}; "
                              f"remove {self.dir}/lists and run 'kernels.py update'")
        out = []
        for line in r.stdout.splitlines():
            parts = line.split("\t")
            if len(parts) >= 2 and os.path.exists(parts[0]):
                suite = parts[1] if parts[1] and parts[1] != "$(CODENAME)" else parts[2]
                out.append((parts[0], suite))
        return out

    def read_index(self, path: str) -> bytes:
        # the lists are kept compressed (lz4, gz, ...); apt-helper reads every format apt writes
        r = subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", path], capture_output=True)
        if r.returncode != 0:
            raise KernelError(f"cannot read {path}: {_first_line(r.stderr.decode(errors='replace'))}; "
                              f"run 'kernels.py update'")
        return r.stdout

    def download(self, pkgs: list[Package], dest: str) -> None:
        r = self._run(self.base_argv() + ["download"] + [p.spec for p in pkgs], cwd=dest)
        if r.returncode != 0:
            text = r.stdout + r.stderr
            if _NETWORK_RE.search(text):
                raise KernelError(f"cannot download {', '.join(p.name for p in pkgs)} from {self.mirror}: "
                                  f"{_network_reason(text)}; check the network or the apt proxy "
                                  f"(Acquire::http::Proxy), then rerun")
            raise KernelError(f"apt-get download {' '.join(p.spec for p in pkgs)} failed: "
                              f"{_first_line(_errors(text))}; run 'kernels.py update' and retry")


_NETWORK_RE = re.compile(r"Could not resolve|Temporary failure resolving|Could not connect|Connection "
                         r"(?:failed|timed out|refused)|Network is unreachable|No route to host|"
                         r"Failed to fetch .*(?:Connection|resolv)", re.I)
_NOPUBKEY_RE = re.compile(r"GPG error: (\S+) (\S+) (?:In)?Release: .*?((?:NO_PUBKEY [0-9A-F]+ ?)+)")
_UNSIGNED_RE = re.compile(r"The repository '(\S+) (\S+) (?:In)?Release' is not signed")


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return "(no output)"


def _errors(text: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(("E:", "W:", "Err:"))]
    return "\n".join(lines) or text


def _network_reason(text: str) -> str:
    for line in text.splitlines():
        m = _NETWORK_RE.search(line)
        if m:
            return re.sub(r"^(?:[EW]: |Err:\S+ )", "", line.strip())
    return "network error"


def _check_update(rc: int, text: str, apt: Apt) -> None:
    """One-line error for a failed `apt-get update` (rc and its whole output)."""
    m = _NOPUBKEY_RE.search(text)
    if m:
        keys = " ".join(k for k in m.group(3).split() if k != "NO_PUBKEY")
        raise KernelError(f"the Release file of {m.group(2)} ({m.group(1)}) is signed by key {keys}, which "
                          f"{apt.keyring} lacks; upgrade debian-archive-keyring (apt-get install "
                          f"debian-archive-keyring from a newer suite), or leave {m.group(2)} out with "
                          f"MEMCGSCOPE_KERNEL_SUITES")
    m = _UNSIGNED_RE.search(text)
    if m:
        raise KernelError(f"the repository {m.group(2)} ({m.group(1)}) is not signed by a key in {apt.keyring}; "
                          f"upgrade debian-archive-keyring or leave {m.group(2)} out with MEMCGSCOPE_KERNEL_SUITES")
    if _NETWORK_RE.search(text):
        raise KernelError(f"cannot reach {apt.mirror} (apt-get update: {_network_reason(text)}); check the "
                          f"network or the apt proxy (Acquire::http::Proxy), or point MEMCGSCOPE_DEBIAN_MIRROR "
                          f"at a reachable mirror, then rerun")
    if rc != 0:
        raise KernelError(f"apt-get update in {apt.dir} failed: {_first_line(_errors(text))}; "
                          f"fix that and run 'kernels.py update'")
    for line in text.splitlines():
        # apt exits 0 when a source 404s or its Release is missing
        if line.startswith(("W: Failed to fetch", "E: Failed to fetch", "W: The repository", "E: The repository")):
            raise KernelError(f"apt-get update in {apt.dir}: {line[3:].strip()}; fix the suite name or "
                              f"MEMCGSCOPE_KERNEL_SUITES and run 'kernels.py update'")


def _write_if_changed(path: str, text: str) -> None:
    try:
        with open(path) as f:
            if f.read() == text:
                return
    except OSError:
        pass
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_json(path: str, data) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


# --- the fetcher --------------------------------------------------------------

@dataclass
class KernelFiles:
    """A fetched kernel, laid out for virtme-ng and bcc."""
    release: str          # uname -r: 5.10.0-46-amd64
    upstream: str         # 5.10.262 (from the Debian version 5.10.262-1)
    version: str          # the Debian package version
    suite: str
    root: str             # CACHE/kernels/<release>: boot/ and lib/modules/<release>/
    vmlinuz: str
    config: str | None
    modules_dir: str
    headers_dir: str      # what bcc compiles against (a build tree or a merged kheaders tree)
    headers_kind: str     # "matching" | "nearest"
    headers_source: str   # the headers package and version
    cache: str
    packages: list[str] = field(default_factory=list)

    @property
    def family(self) -> str:
        return family_of(self.upstream)

    def vng_args(self) -> list[str]:
        """virtme-ng arguments that boot this kernel with its modules, headers and /boot visible.

        The guest's /var/cache is a fresh tmpfs, so the cache is mapped in
        read-only at its own path (see the module docstring)."""
        return ["-r", self.vmlinuz, f"--rodir={self.cache}", f"--rodir=/boot={os.path.join(self.root, 'boot')}"]


@dataclass
class HeadersTree:
    release: str
    path: str     # the tree bcc gets (BCC_KERNEL_SOURCE) or an installed build dir
    kind: str     # "installed" | "matching" | "nearest"
    source: str   # what it came from


class Fetcher:
    def __init__(self, cache: Cache | None = None, apt: Apt | None = None, log=None,
                 prefer_codename: str | None = "host"):
        self.cache = cache or Cache()
        self.apt = apt or Apt(self.cache)
        self.log = log or (lambda msg: print(f"memcgscope kernels: {msg}", file=sys.stderr))
        self.prefer = host_codename() if prefer_codename == "host" else prefer_codename
        self._index: Index | None = None
        self._fresh = False  # the index was updated by this process
        self.lock = _Lock(self.cache)
        self.downloaded_bytes = 0

    # index
    def index(self, refresh: bool = False) -> Index:
        path = os.path.join(self.cache.apt, "index.json")
        if not refresh and self._index is None:
            d = _read_json(path)
            if d and d.get("schema") == INDEX_SCHEMA and d.get("key") == self.apt.config_key():
                self._index = Index.from_json(d)
        if refresh or self._index is None:
            with self.lock:
                self._index = self._update_index(path)
            self._fresh = True
        return self._index

    def _update_index(self, path: str) -> Index:
        start = time.monotonic()
        self.log(f"apt-get update of {', '.join(self.apt.suites)} into {self.cache.apt} (private; /etc/apt unused)")
        self.apt.update()
        pkgs: list[Package] = []
        files = self.apt.packages_files()
        if not files:
            raise KernelError(f"apt-get update left no Packages lists in {self.cache.apt}/lists; "
                              f"check MEMCGSCOPE_KERNEL_SUITES and the mirror, then run 'kernels.py update'")
        for fname, suite in files:
            pkgs.extend(parse_packages(self.apt.read_index(fname), suite))
        idx = Index(pkgs, self.apt.suites, time.time(), self.apt.arch)
        d = idx.to_json()
        d["key"] = self.apt.config_key()
        _write_json(path, d)
        self.log(f"index: {len(pkgs)} kernel packages in {time.monotonic() - start:.1f}s")
        return idx

    def resolve(self, spec: str, *, refresh: bool = False, headers: bool = True) -> Resolution:
        try:
            return resolve_in(self.index(refresh), spec, self.prefer, headers=headers)
        except KernelError:
            if refresh or self._fresh:
                raise
            # maybe newer than our index: refresh once, then give the index's answer
            return resolve_in(self.index(True), spec, self.prefer, headers=headers)

    # fetched kernels
    def manifests(self) -> list[dict]:
        out = []
        d = self.cache.p("manifests")
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            m = _read_json(os.path.join(d, name))
            if m and m.get("schema") == MANIFEST_SCHEMA:
                out.append(m)
        return out

    def lookup(self, spec: str) -> KernelFiles | None:
        """A fetched kernel matching spec (exact release, upstream, or the newest fetched
        of a family), without the network; None when there is none."""
        kind, s = parse_spec(spec)
        found = []
        for m in self.manifests():
            k = m.get("kernel")
            if not k or not self._complete(m):
                continue
            if (kind == "release" and m["release"] == s) or (kind == "upstream" and k["upstream"] == s) or (
                    kind == "family" and family_of(k["upstream"]) == s):
                found.append(m)
        if not found:
            return None
        m = max(found, key=lambda m: (_V(m["kernel"]["upstream"]), _codename_rank(m["kernel"]["suite"], self.prefer)))
        return self._files(m)

    def _complete(self, m: dict) -> bool:
        k = m.get("kernel")
        if k and not (os.path.isfile(k["vmlinuz"]) and os.path.isdir(k["modules_dir"])
                      and os.path.isdir(os.path.join(k["headers_dir"], "include"))):
            return False
        t = m.get("kheaders")
        return not t or os.path.isfile(os.path.join(t["path"], ".memcgscope-source"))

    def _files(self, m: dict) -> KernelFiles:
        k = m["kernel"]
        return KernelFiles(m["release"], k["upstream"], k["version"], k["suite"], k["root"], k["vmlinuz"],
                           k.get("config"), k["modules_dir"], k["headers_dir"], k["headers_kind"],
                           k["headers_source"], self.cache.root, [p["spec"] for p in k["packages"]])

    def ensure_kernel(self, spec: str, *, refresh: bool = False) -> KernelFiles:
        kind, _ = parse_spec(spec)
        if not refresh:
            # an exact release or version already here needs no index; a family needs
            # the index to know its newest, unless there is no index yet and one is fetched
            have_index = os.path.exists(os.path.join(self.cache.apt, "index.json"))
            if kind != "family" or not have_index:
                kf = self.lookup(spec)
                if kf:
                    return kf
        res = self.resolve(spec, refresh=refresh)
        self.log(res.note)
        with self.lock:
            m = _read_json(self.cache.manifest(res.release))
            if m and m.get("kernel") and m["kernel"]["version"] == res.version and self._complete(m):
                return self._files(m)
            return self._fetch_kernel(res, m or {})

    def _fetch_kernel(self, res: Resolution, old: dict) -> KernelFiles:
        start, downloaded = time.monotonic(), self.downloaded_bytes
        rel = res.release
        final = self.cache.kernel(rel)
        stage = self.cache.p("kernels", f".{rel}.partial")
        _rmtree(stage)
        self.cache.makedirs(stage)
        pkgs = self._download_unpack(res.image, stage)
        moddir = _normalize_kernel_tree(stage, rel)
        _depmod(stage, rel)

        hsource = f"{res.headers[0].name} {res.headers[0].version}"
        hdir = self._ensure_headers(res.headers_release, res.headers)
        info = _read_json(os.path.join(hdir, ".memcgscope-headers.json"))
        paths = [final]
        kheaders = old.get("kheaders")
        if res.headers_kind == "matching":
            # relative, so they resolve wherever the cache is seen from (host or guest)
            for link, target in (("build", info["build"]), ("source", info["source"])):
                os.symlink(os.path.relpath(os.path.join(hdir, target),
                                           os.path.join(final, "lib", "modules", rel)),
                           os.path.join(moddir, link))
            headers_dir = os.path.join(final, "lib", "modules", rel, "build")
        else:
            tree = self._make_kheaders(rel, hdir, info, f"{hsource}, nearest")
            kheaders = {"path": tree, "source": hsource, "kind": "nearest", "headers_release": res.headers_release}
            paths.append(tree)
            headers_dir = tree
        _rmtree(final)
        os.rename(stage, final)
        seconds = time.monotonic() - start
        config = os.path.join(final, "boot", f"config-{rel}")
        kernel = {
            "upstream": res.upstream, "version": res.version, "suite": res.suite, "root": final,
            "vmlinuz": os.path.join(final, "boot", f"vmlinuz-{rel}"),
            "config": config if os.path.exists(config) else None,
            "modules_dir": os.path.join(final, "lib", "modules", rel), "headers_dir": headers_dir,
            "headers_kind": res.headers_kind, "headers_source": hsource,
            "headers_release": res.headers_release, "packages": pkgs, "resolved": res.note,
            "headers_packages": [p.spec for p in res.headers],
            "seconds": round(seconds, 1), "downloaded_bytes": self.downloaded_bytes - downloaded,
        }
        manifest = dict(old, schema=MANIFEST_SCHEMA, release=rel, kernel=kernel, fetched=time.time(),
                        paths=sorted(set(old.get("paths", [])) | set(paths)), outside_cache=[])
        if kheaders:
            manifest["kheaders"] = kheaders
        self.cache.makedirs(self.cache.p("manifests"))
        _write_json(self.cache.manifest(rel), manifest)
        self.log(f"{rel}: {(self.downloaded_bytes - downloaded) / 1e6:.0f} MB downloaded, laid out in "
                 f"{seconds:.0f}s -> {final}")
        return self._files(manifest)

    def _download_unpack(self, pkgs: list[Package], dest: str) -> list[dict]:
        debs = self.cache.p("debs")
        self.cache.makedirs(debs)
        _chown_apt(debs)
        todo = []
        for p in pkgs:
            path = os.path.join(debs, os.path.basename(p.filename) or f"{p.name}_{p.version}.deb")
            if not (os.path.exists(path) and p.sha256 and _sha256(path) == p.sha256):
                todo.append(p)
        if todo:
            self.log(f"apt-get download {' '.join(p.spec for p in todo)} "
                     f"({sum(p.size for p in todo) / 1e6:.0f} MB)")
            self.apt.download(todo, debs)
            self.downloaded_bytes += sum(p.size for p in todo)
        out = []
        for p in pkgs:
            path = os.path.join(debs, os.path.basename(p.filename) or f"{p.name}_{p.version}.deb")
            if not os.path.exists(path):
                cands = [f for f in os.listdir(debs) if f.startswith(p.name + "_") and f.endswith(".deb")]
                path = os.path.join(debs, cands[0]) if len(cands) == 1 else path
            if p.sha256 and _sha256(path) != p.sha256:
                if os.path.exists(path):
                    os.unlink(path)
                raise KernelError(f"{path} does not match the SHA256 of {p.spec} in the signed index (deleted); "
                                  f"rerun, and if it repeats, 'kernels.py update' or use another mirror")
            r = subprocess.run(["dpkg-deb", "-x", path, dest], capture_output=True, text=True)
            if r.returncode != 0:
                raise KernelError(f"dpkg-deb -x {path} failed: {_first_line(r.stderr)}; delete it and rerun")
            out.append({"name": p.name, "version": p.version, "suite": p.suite, "size": p.size, "spec": p.spec})
            os.unlink(path)  # unpacked; the manifest keeps what it was
        return out

    def _ensure_headers(self, hrel: str, pkgs: list[Package]) -> str:
        """CACHE/headers/<hrel>: the header packages unpacked, shared by kernels and trees."""
        final = self.cache.headers(hrel)
        info = _read_json(os.path.join(final, ".memcgscope-headers.json"))
        want = [p.spec for p in pkgs]
        if info and info.get("packages") == want and os.path.isdir(os.path.join(final, info["build"], "include")):
            return final
        stage = self.cache.p("headers", f".{hrel}.partial")
        _rmtree(stage)
        self.cache.makedirs(stage)
        unpacked = self._download_unpack(pkgs, stage)
        build, source = _header_dirs(stage, hrel)
        # the packages' lib/modules/<rel>/{build,source} are absolute links into the
        # host's /usr/src, which has none of this: drop them, kernels/<rel> links instead
        _rmtree(os.path.join(stage, "lib"))
        _write_json(os.path.join(stage, ".memcgscope-headers.json"),
                    {"release": hrel, "packages": want, "build": build, "source": source,
                     "size": sum(p["size"] for p in unpacked)})
        _rmtree(final)
        os.rename(stage, final)
        return final

    def _make_kheaders(self, rel: str, hdir: str, info: dict, source_line: str) -> str:
        """CACHE/kheaders/<rel>: common + arch headers merged into one tree (bcc
        wants one tree; Debian splits them), with .memcgscope-source. Hard links,
        not symlinks: the same filesystem, no space (a long symlink costs a 4 KiB
        block: ~70 MB per tree), and nothing dangles if headers/ is removed."""
        tree = self.cache.kheaders(rel)
        stage = self.cache.p("kheaders", f".{rel}.partial")
        _rmtree(stage)
        self.cache.makedirs(stage)
        for sub, force in ((info["source"], ""), (info["build"], "f")):
            src = os.path.join(hdir, sub)
            r = subprocess.run(["cp", f"-rl{force}", src + "/.", stage + "/"], capture_output=True, text=True)
            if r.returncode != 0:  # another filesystem after all: symlinks then
                r = subprocess.run(["cp", f"-rs{force}", src + "/.", stage + "/"], capture_output=True, text=True)
            if r.returncode != 0:
                raise KernelError(f"merging {src} into {stage} failed: {_first_line(r.stderr)}; "
                                  f"remove {hdir} and rerun")
            _repoint_relative_links(src, stage)
        with open(os.path.join(stage, ".memcgscope-source"), "w") as f:
            f.write(source_line + "\n")
        _rmtree(tree)
        os.rename(stage, tree)
        return tree

    # host headers (scripts/setup.sh)
    def ensure_host_headers(self, release: str | None = None, *, refresh: bool = False) -> HeadersTree:
        rel = release or os.uname().release
        build = f"/lib/modules/{rel}/build"
        if release is None and os.path.isdir(os.path.join(build, "include")):
            return HeadersTree(rel, build, "installed", build)
        m = _read_json(self.cache.manifest(rel)) or {}
        t = m.get("kheaders")
        if not refresh and t and self._complete(m) and os.path.isdir(os.path.join(t["path"], "include")):
            return HeadersTree(rel, t["path"], t["kind"], t["source"])
        idx = self.index(refresh)
        hdrs, kind, hrel = self._host_header_choice(idx, rel)
        if kind == "nearest" and not self._fresh:
            idx = self.index(True)  # maybe Debian has it by now
            hdrs, kind, hrel = self._host_header_choice(idx, rel)
        with self.lock:
            hdir = self._ensure_headers(hrel, hdrs)
            info = _read_json(os.path.join(hdir, ".memcgscope-headers.json"))
            src = f"{hdrs[0].name} {hdrs[0].version}"
            line = f"{src}, {kind}"
            tree = self._make_kheaders(rel, hdir, info, line)
            m = _read_json(self.cache.manifest(rel)) or {}
            m.update(schema=MANIFEST_SCHEMA, release=rel, fetched=m.get("fetched", time.time()), outside_cache=[],
                     kheaders={"path": tree, "source": src, "kind": kind, "headers_release": hrel},
                     paths=sorted(set(m.get("paths", [])) | {tree}))
            self.cache.makedirs(self.cache.p("manifests"))
            _write_json(self.cache.manifest(rel), m)
        self.log(f"headers for {rel}: {line} -> {tree}")
        return HeadersTree(rel, tree, kind, src)

    def _host_header_choice(self, idx: Index, rel: str):
        p = idx.find(f"linux-headers-{rel}")
        if p is not None:
            return _header_set(idx, p), "matching", rel
        m = re.match(r"^(\d+\.\d+(?:\.\d+)?)", rel)
        if not m:
            raise KernelError(f"cannot tell the version of kernel {rel!r} (uname -r); give it as "
                              f"'kernels.py host-headers --release X.Y.Z'")
        upstream = m.group(1)
        # a Debian 5.10.0-46 or 6.1.0-57 release names the ABI, not the upstream version
        return header_packages(idx, rel, upstream, "", "", self.prefer)

    # removal
    def remove(self, spec: str) -> list[str]:
        with self.lock:
            kind, s = parse_spec(spec)
            ms = [m for m in self.manifests() if m["release"] == s or (
                m.get("kernel") and kind != "release" and (
                    m["kernel"]["upstream"] == s or (kind == "family" and family_of(m["kernel"]["upstream"]) == s)))]
            if not ms:
                have = ", ".join(m["release"] for m in self.manifests()) or "none"
                raise KernelError(f"no fetched kernel {spec!r} in {self.cache.root} (fetched: {have}); "
                                  f"give one of those (kernels.py list)")
            if len(ms) > 1:
                raise KernelError(f"{spec!r} matches {', '.join(m['release'] for m in ms)} in {self.cache.root}; "
                                  f"give the exact release")
            m = ms[0]
            removed = []
            for p in m.get("paths", []) + m.get("outside_cache", []):
                if os.path.lexists(p):
                    _rmtree(p)
                    removed.append(p)
            os.unlink(self.cache.manifest(m["release"]))
            removed.append(self.cache.manifest(m["release"]))
            # shared header unpacks nobody refers to any more
            used = set()
            for other in self.manifests():
                for part in (other.get("kernel") or {}, other.get("kheaders") or {}):
                    if part.get("headers_release"):
                        used.add(part["headers_release"])
            hroot = self.cache.p("headers")
            for h in sorted(os.listdir(hroot)) if os.path.isdir(hroot) else []:
                if h not in used and not h.startswith("."):
                    _rmtree(os.path.join(hroot, h))
                    removed.append(os.path.join(hroot, h))
            return removed


def _repoint_relative_links(src: str, dest: str) -> None:
    # the packages' relative links (linux-headers-<rel>/scripts ->
    # ../../lib/linux-kbuild-<v>/scripts) dangle once copied elsewhere:
    # point them at what they meant
    for d, dirs, files in os.walk(src):
        for name in dirs + files:
            s = os.path.join(d, name)
            if not os.path.islink(s) or os.readlink(s).startswith("/"):
                continue
            t = os.path.join(dest, os.path.relpath(s, src))
            if os.path.islink(t) and not os.path.exists(t) and os.path.exists(s):
                os.unlink(t)
                os.symlink(os.path.realpath(s), t)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return ""
    return h.hexdigest()


def _chown_apt(path: str) -> None:
    # apt drops to _apt for downloads; without this it warns and downloads unsandboxed
    if os.geteuid() != 0:
        return
    try:
        import pwd
        pw = pwd.getpwnam("_apt")
        os.chown(path, pw.pw_uid, 0)
    except (KeyError, OSError):
        pass


def _rmtree(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def _normalize_kernel_tree(root: str, rel: str) -> str:
    """boot/{vmlinuz,config,System.map}-<rel> and lib/modules/<rel>, whatever the
    package put where (bookworm: /boot and /lib/modules; trixie-era packages:
    /usr/lib/modules/<rel>, 7.x: vmlinuz and config inside it)."""
    moddir = os.path.join(root, "lib", "modules", rel)
    usr = os.path.join(root, "usr", "lib", "modules", rel)
    if os.path.isdir(usr) and not os.path.islink(os.path.join(root, "lib")):
        if os.path.isdir(moddir):
            for name in os.listdir(usr):
                os.rename(os.path.join(usr, name), os.path.join(moddir, name))
            os.rmdir(usr)
        else:
            os.makedirs(os.path.dirname(moddir), exist_ok=True)
            os.rename(usr, moddir)
    if not os.path.isdir(moddir):
        raise KernelError(f"no lib/modules/{rel} in the unpacked packages under {root}; the Debian package "
                          f"layout changed: report it (kernels.py image_packages)")
    boot = os.path.join(root, "boot")
    os.makedirs(boot, exist_ok=True)
    for base, inside in (("vmlinuz", "vmlinuz"), ("config", "config"), ("System.map", "System.map")):
        target = os.path.join(boot, f"{base}-{rel}")
        src = os.path.join(moddir, inside)
        if not os.path.exists(target) and os.path.isfile(src):
            os.rename(src, target)
    if not os.path.isfile(os.path.join(boot, f"vmlinuz-{rel}")):
        raise KernelError(f"no vmlinuz for {rel} in the unpacked packages under {root}; the Debian package "
                          f"layout changed: report it (kernels.py image_packages)")
    return moddir


def _depmod(root: str, rel: str) -> None:
    depmod = shutil.which("depmod") or "/sbin/depmod"
    r = subprocess.run([depmod, "-a", "-b", root, rel], capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(os.path.join(root, "lib", "modules", rel, "modules.dep")):
        raise KernelError(f"depmod -b {root} {rel} failed: {_first_line(r.stderr)}; apt-get install kmod")


def _header_dirs(root: str, rel: str) -> tuple[str, str]:
    """(build, source) of unpacked headers, relative to root: the arch tree and the -common tree."""
    links = os.path.join(root, "lib", "modules", rel)
    out = []
    for name in ("build", "source"):
        t = os.path.join(links, name)
        out.append(os.readlink(t).lstrip("/") if os.path.islink(t) else None)
    build, source = out
    src = os.path.join(root, "usr", "src")
    if not build or not os.path.isdir(os.path.join(root, build)):
        build = f"usr/src/linux-headers-{rel}"
    if not source or not os.path.isdir(os.path.join(root, source)):
        commons = sorted(d for d in os.listdir(src) if d.endswith("-common")) if os.path.isdir(src) else []
        source = f"usr/src/{commons[0]}" if len(commons) == 1 else None
    if not os.path.isdir(os.path.join(root, build, "include")) or not source:
        raise KernelError(f"the header packages of {rel} unpacked in {root} have no {build}/include or no -common "
                          f"tree; the Debian package layout changed: report it (kernels.py _header_dirs)")
    return build, source


# --- module-level API ---------------------------------------------------------

def ensure_kernel(spec: str, *, cache: str | None = None, refresh: bool = False, log=None) -> KernelFiles:
    """Fetch (once) and lay out the Debian kernel `spec`; see the module docstring."""
    return Fetcher(Cache(cache), log=log).ensure_kernel(spec, refresh=refresh)


def lookup(spec: str, *, cache: str | None = None) -> KernelFiles | None:
    """An already fetched kernel, without the network."""
    return Fetcher(Cache(cache)).lookup(spec)


def resolve(spec: str, *, cache: str | None = None, refresh: bool = False, log=None) -> Resolution:
    return Fetcher(Cache(cache), log=log).resolve(spec, refresh=refresh)


def ensure_host_headers(release: str | None = None, *, cache: str | None = None, refresh: bool = False,
                        log=None) -> HeadersTree:
    return Fetcher(Cache(cache), log=log).ensure_host_headers(release, refresh=refresh)


def remove(spec: str, *, cache: str | None = None) -> list[str]:
    return Fetcher(Cache(cache)).remove(spec)


def fetched(*, cache: str | None = None) -> list[dict]:
    return Fetcher(Cache(cache)).manifests()


# --- command line -------------------------------------------------------------

def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("kernels", help="fetch Debian kernels into the cache (never installed)",
                       description="Debian kernels and headers fetched into memcgscope's cache "
                                   "(MEMCGSCOPE_CACHE, default /var/cache/memcgscope), never installed.")
    _fill_parser(p)
    return p


def _fill_parser(p: argparse.ArgumentParser) -> None:
    p.set_defaults(func=run)
    p.add_argument("--cache", help="cache directory (default $MEMCGSCOPE_CACHE or /var/cache/memcgscope)")
    s = p.add_subparsers(dest="kernels_command", metavar="ACTION")
    s.required = True
    ls = s.add_parser("list", help="fetched kernels and header trees; --available: what Debian has")
    ls.add_argument("--available", nargs="?", const="", metavar="FAMILY",
                    help="list kernels in the index (all families, or one)")
    f = s.add_parser("fetch", help="fetch KERNEL: a family (6.12), a version (6.12.117) or a uname -r")
    f.add_argument("kernel")
    f.add_argument("--refresh", action="store_true", help="apt-get update the private index first")
    f.add_argument("--json", action="store_true", help="print the result as JSON")
    r = s.add_parser("resolve", help="what fetch would get, without fetching")
    r.add_argument("kernel")
    r.add_argument("--refresh", action="store_true")
    rm = s.add_parser("remove", help="remove a fetched kernel or header tree and everything it created")
    rm.add_argument("kernel")
    s.add_parser("update", help="apt-get update the private index")
    h = s.add_parser("host-headers", help="headers for bcc for the running kernel (scripts/setup.sh)")
    h.add_argument("--release", help="another kernel release than uname -r")
    h.add_argument("--refresh", action="store_true")
    v = s.add_parser("vng-args", help="print the virtme-ng arguments that boot a fetched KERNEL")
    v.add_argument("kernel")


def run(args) -> int:
    f = Fetcher(Cache(args.cache))
    try:
        return _run(f, args)
    except KernelError as e:
        print(f"memcgscope kernels: error: {e}", file=sys.stderr)
        return 1


def _run(f: Fetcher, args) -> int:
    cmd = args.kernels_command
    if cmd == "list":
        if args.available is not None:
            idx = f.index()
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(idx.updated))
            print(f"# index of {when} ({', '.join(idx.suites)}); 'kernels.py update' refreshes it")
            rows = sorted((c for c in idx.kernels() if c.default_flavour and (not args.available or
                                                                             c.family == args.available)),
                          key=lambda c: (_num(c.family), _V(c.upstream), c.release))
            hdr = {c.release for c in idx.header_releases()}
            for c in rows:
                print(f"{c.family:6} {c.upstream:10} {c.release:28} {c.package.version:22} {c.package.suite:20} "
                      f"{'headers' if c.release in hdr else 'no headers'}")
            return 0
        for m in f.manifests():
            k, t = m.get("kernel"), m.get("kheaders")
            if k:
                print(f"{m['release']:28} kernel   {k['upstream']:10} {k['suite']:20} headers {k['headers_kind']}"
                      f" ({k['headers_source']}) {k['root']}")
            if t:
                print(f"{m['release']:28} headers  {'':10} {'':20} {t['kind']} ({t['source']}) {t['path']}")
        return 0
    if cmd == "fetch":
        kf = f.ensure_kernel(args.kernel, refresh=args.refresh)
        if args.json:
            print(json.dumps(dataclasses.asdict(kf) | {"vng_args": kf.vng_args()}, indent=1))
        else:
            print(f"{kf.release} (upstream {kf.upstream}, {kf.version} from {kf.suite}): {kf.vmlinuz}; "
                  f"modules {kf.modules_dir}; headers {kf.headers_kind}: {kf.headers_dir}")
        return 0
    if cmd == "resolve":
        res = f.resolve(args.kernel, refresh=args.refresh)
        print(res.note)
        for p in res.image + res.headers:
            print(f"  {p.spec} ({p.suite}, {p.size / 1e6:.1f} MB)")
        return 0
    if cmd == "remove":
        for p in f.remove(args.kernel):
            print(f"removed {p}")
        return 0
    if cmd == "update":
        idx = f.index(refresh=True)
        print(f"{len(idx.packages)} kernel packages in {', '.join(idx.suites)}")
        return 0
    if cmd == "host-headers":
        t = f.ensure_host_headers(args.release, refresh=args.refresh)
        print(f"{t.kind}: {t.path} ({t.source})")
        return 0
    if cmd == "vng-args":
        kf = f.lookup(args.kernel)
        if kf is None:
            raise KernelError(f"kernel {args.kernel!r} is not fetched into {f.cache.root}; "
                              f"run 'kernels.py fetch {args.kernel}'")
        print(" ".join(kf.vng_args()))
        return 0
    raise KernelError(f"unknown action {cmd!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="kernels.py", description="Debian kernels fetched into memcgscope's "
                                "cache, never installed (also: memcgscope kernels).")
    _fill_parser(p)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
