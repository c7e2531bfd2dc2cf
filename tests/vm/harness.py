"""The VM test harness: the guest table (data) over collector/guest.py,
which boots a kernel from memcgscope's cache under QEMU with virtme-ng and
runs one command in it (the product's `validate --vm` uses the same).

Guest configurations are data: a kernel (anything `memcgscope kernels
fetch` takes), a cgroup layout and the model profile series the kernel is
expected to follow. A newer Debian kernel is one more line in GUESTS, and
scripts/setup-tests.sh fetches every kernel listed here
(`python tests/vm/harness.py --kernels`).

    python tests/vm/harness.py --run debian-7.3-v2 'uname -r'     # one boot, by hand
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from memcgscope.collector import guest as _guest
from memcgscope.collector import kernels
from memcgscope.collector.guest import GuestError, V1_MEMORY_MOUNT  # noqa: F401 (re-exported)

__all__ = ["Guest", "GUESTS", "GuestResult", "GuestError", "run_in_guest", "find_kernel",
           "preflight", "accel", "REPO"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(REPO, ".venv", "bin")


@dataclass(frozen=True)
class Guest:
    name: str
    kernel: str    # a kernels.py spec: family (6.1), upstream version (5.10.262) or uname -r
    cgroup: str    # "v1": memory controller mounted as v1; "v2": +memory in cgroup2
    profile: str   # the model profile series this kernel is expected to follow

    @property
    def id(self) -> str:
        return self.name

    @property
    def series(self) -> str:
        # the field's older name
        return self.profile


# Debian's 6.12 and newer builds have CONFIG_MEMCG_V1 off (their shipped
# configs): no v1 memory controller there. 6.1 is the ABI Debian's bookworm
# linux-image-amd64 points to (the newest 6.1); 6.12.117 is pinned to its
# bookworm build (+deb12, bookworm-security), not trixie's +deb13.
GUESTS = (
    Guest("debian-5.10-v1", "5.10.262", "v1", "5.10"),
    Guest("debian-5.10-v2", "5.10.262", "v2", "5.10"),
    Guest("debian-6.1-v1", "6.1", "v1", "6.1"),
    Guest("debian-6.1-v2", "6.1", "v2", "6.1"),
    Guest("debian-6.12-v2", "6.12.117+deb12-amd64", "v2", "6.12"),
    Guest("debian-6.18-v2", "6.18.15", "v2", "6.18"),
    Guest("debian-7.3-v2", "7.3.4", "v2", "7.3"),
)


@dataclass
class GuestResult:
    guest: Guest
    kernel: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    accel: str = "tcg"

    def __str__(self) -> str:
        return (f"{self.guest.name} ({self.kernel}, {self.accel}): exit {self.returncode} in {self.seconds:.0f}s\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr[-4000:]}")


def find_kernel(guest: Guest) -> kernels.KernelFiles:
    """The fetched kernel of `guest` (no network); GuestError when it is not fetched."""
    try:
        kf = kernels.lookup(guest.kernel)
    except kernels.KernelError as e:
        raise GuestError(f"guest {guest.name}: {e}") from e
    if kf is None:
        cache = kernels.Cache().root
        raise GuestError(f"kernel {guest.kernel} of guest {guest.name} is not fetched into {cache}; "
                         f"run scripts/setup-tests.sh (or: memcgscope kernels fetch {guest.kernel})")
    return kf


def preflight(guest: Guest) -> kernels.KernelFiles:
    """The guest's kernel files; raises GuestError naming what is missing."""
    _guest._preflight()
    return find_kernel(guest)


def accel(kf: kernels.KernelFiles | None = None) -> tuple[str, str]:
    return _guest.accel(_guest.GuestKernel(kf.release, kf.vng_args(), kf) if kf else None)


def run_in_guest(guest: Guest, command: str, *, timeout: float = 600, memory: str = "2G",
                 cpus: int = 2, rwdir: str | None = None, page_cache: bool = False) -> GuestResult:
    """Boots `guest`, runs `command` (sh) as root after the cgroup prelude
    and in the checkout, returns its output and status."""
    kf = preflight(guest)
    r = _guest.run_in_guest(_guest.GuestKernel(kf.release, kf.vng_args(), kf), command, cgroup=guest.cgroup,
                            timeout=timeout, memory=memory, cpus=cpus, rwdir=rwdir, cwd=REPO,
                            page_cache=page_cache)
    return GuestResult(guest, r.kernel, r.returncode, r.stdout, r.stderr, r.seconds, r.accel)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the VM test harness: list the guest kernels, or boot guests by hand")
    ap.add_argument("--kernels", action="store_true", help="print each guest kernel spec once (setup-tests.sh)")
    ap.add_argument("--run", metavar="NAMES", help="boot these guests (comma-separated names, or 'all')")
    ap.add_argument("command", nargs="?", default="uname -a")
    ap.add_argument("--timeout", type=float, default=600)
    args = ap.parse_args(argv)
    if args.kernels:
        for spec in dict.fromkeys(g.kernel for g in GUESTS):
            print(spec)
        return 0
    if not args.run:
        ap.error("give --kernels or --run NAMES")
    by_name = {g.name: g for g in GUESTS}
    names = list(by_name) if args.run == "all" else args.run.split(",")
    status = 0
    for name in names:
        if name not in by_name:
            ap.error(f"no guest {name!r}; guests: {', '.join(by_name)}")
        try:
            r = run_in_guest(by_name[name], args.command, timeout=args.timeout)
        except GuestError as e:
            print(f"== {name}: {e}", flush=True)
            status = 1
            continue
        print(f"== {name} ({r.kernel}, {r.accel}): exit {r.returncode} in {r.seconds:.1f}s", flush=True)
        print(r.stdout.rstrip() or r.stderr[-2000:], flush=True)
        status |= 1 if r.returncode else 0
    return status


if __name__ == "__main__":
    sys.exit(main())
