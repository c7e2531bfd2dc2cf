"""Boot a Debian guest kernel under QEMU with virtme-ng, run one command in
it, return its output and exit status, and always stop it.

The guest sees the host's root filesystem copy-on-write over 9p (so this
checkout, its .venv and bcc are there at the same paths) and writes back
only to `rwdir`. Guest kernels are not installed: collector/kernels.py
fetches them into memcgscope's cache, and `KernelFiles.vng_args()` maps
that cache (modules, headers) and the kernel's boot/ into the guest.

Guest configurations are data: a kernel (anything `memcgscope kernels
fetch` takes), a cgroup layout and the model profile series the kernel is
expected to follow. A newer Debian kernel is one more line in GUESTS, and
scripts/setup-tests.sh fetches every kernel listed here
(`python tests/vm/harness.py --kernels`).

    python tests/vm/harness.py --run debian-7.3-v2 'uname -r'     # one boot, by hand
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from memcgscope.collector import kernels

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


# Debian's 6.12 and newer builds have CONFIG_MEMCG_V1 off (kernel-versions.md
# §3.6): no v1 memory controller there. 6.1 is the ABI Debian's bookworm
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

# Where the v1 memory hierarchy is mounted in a v1 guest.
V1_MEMORY_MOUNT = "/run/memcg-v1"

_PRELUDE = {
    # v1 memory can be mounted while cgroup2 (the guest init's) does not use it
    "v1": f"mkdir -p {V1_MEMORY_MOUNT} && mount -t cgroup -o memory memory {V1_MEMORY_MOUNT}",
    "v2": "echo +memory > /sys/fs/cgroup/cgroup.subtree_control",
}


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


class GuestError(Exception):
    pass


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
    if os.geteuid() != 0:
        raise GuestError("tests/vm needs root (vng loads modules and boots QEMU as root)")
    if not os.path.exists(os.path.join(VENV_BIN, "vng")):
        raise GuestError(f"virtme-ng is not installed in {VENV_BIN}; run scripts/setup-tests.sh")
    for tool in ("qemu-system-x86_64", "busybox"):
        if not shutil.which(tool):
            raise GuestError(f"{tool} not found; run scripts/setup-tests.sh")
    if not (os.path.exists("/usr/lib/systemd/systemd-udevd") or os.path.exists("/lib/systemd/systemd-udevd")):
        # without udevd in the guest vng has no script I/O ports: no output, exit 255
        raise GuestError("systemd-udevd not found (vng's guest init needs it for the command's I/O); "
                         "run scripts/setup-tests.sh (apt-get install udev)")
    return find_kernel(guest)


# --- KVM or TCG -----------------------------------------------------------------

KVM_PROBE_TIMEOUT = 25.0  # a KVM boot to a shell takes a few seconds; TCG ~10-20 s


def accel(kf: kernels.KernelFiles | None = None) -> tuple[str, str]:
    """("kvm" | "tcg", why). MEMCGSCOPE_VM_ACCEL=kvm|tcg decides outright.
    Otherwise a probe boots `kf` once with KVM and a trivial command: KVM is
    used only when that prints its marker and exits 0 within
    KVM_PROBE_TIMEOUT (on these machines /dev/kvm exists but KVM boots hang or
    abort, real-kernels.md §2). The answer is kept per host boot and QEMU
    build in the cache, so the probe costs at most once per boot."""
    forced = os.environ.get("MEMCGSCOPE_VM_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced, f"MEMCGSCOPE_VM_ACCEL={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is missing or not accessible"
    if kf is None:
        return "tcg", "no kernel to probe KVM with"
    key = _accel_key(kf)
    path = os.path.join(kernels.Cache().root, "vm-accel.json")
    try:
        with open(path) as f:
            known = json.load(f)
        if known.get("key") == key:
            return known["accel"], known["why"] + " (probed earlier this boot)"
    except (OSError, ValueError, KeyError):
        pass
    result, why = _probe_kvm(kf)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"key": key, "accel": result, "why": why}, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass
    return result, why


def _accel_key(kf) -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    qemu = shutil.which("qemu-system-x86_64") or ""
    qstat = os.stat(qemu) if qemu else None
    raw = f"{boot} {qemu} {qstat.st_mtime if qstat else ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _probe_kvm(kf) -> tuple[str, str]:
    marker = "memcgscope-kvm-ok"
    argv = _vng_argv(kf, "kvm", f"echo {marker}", "1G", 1, None)
    start = time.monotonic()
    try:
        rc, out, _err = _run_group(argv, KVM_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "tcg", f"a KVM boot of {kf.release} did not finish in {KVM_PROBE_TIMEOUT:.0f}s"
    secs = time.monotonic() - start
    if rc == 0 and marker in out:
        return "kvm", f"a KVM boot of {kf.release} ran a command in {secs:.1f}s"
    return "tcg", f"a KVM boot of {kf.release} failed (exit {rc} after {secs:.1f}s)"


# --- booting ---------------------------------------------------------------------

def _vng_argv(kf, acceleration: str, script: str, memory: str, cpus: int, rwdir: str | None) -> list[str]:
    argv = [os.path.join(VENV_BIN, "vng")] + kf.vng_args() + [
        "--busybox", shutil.which("busybox") or "/bin/busybox", "--force-9p", "-m", memory, "--cpus", str(cpus)]
    if acceleration != "kvm":
        argv.append("--disable-kvm")
    if rwdir:
        argv += ["--rwdir", rwdir]
    return argv + ["--exec", script]


def _run_group(argv: list[str], timeout: float) -> tuple[int, str, str]:
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    # </dev/null: without it a run printed nothing (real-kernels.md §2)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        e.stdout, e.stderr = proc.communicate()
        raise
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    return proc.returncode, stdout, stderr


def run_in_guest(guest: Guest, command: str, *, timeout: float = 600, memory: str = "2G",
                 cpus: int = 2, rwdir: str | None = None) -> GuestResult:
    """Boots `guest`, runs `command` (sh) as root after the cgroup prelude,
    returns its output and status. The guest is killed on timeout or error."""
    kf = preflight(guest)
    acceleration, _why = accel(kf)
    script = f"set -e; {_PRELUDE[guest.cgroup]}; set +e; cd {REPO}; {command}"
    argv = _vng_argv(kf, acceleration, script, memory, cpus, rwdir)
    start = time.monotonic()
    try:
        rc, stdout, stderr = _run_group(argv, timeout)
    except subprocess.TimeoutExpired as e:
        raise GuestError(f"{guest.name}: no exit after {timeout:.0f}s; guest killed\n"
                         f"{(e.stdout or '')[-2000:]}\n{(e.stderr or '')[-2000:]}") from None
    return GuestResult(guest, kf.release, rc, stdout, stderr, time.monotonic() - start, acceleration)


def _kill_group(proc: subprocess.Popen) -> None:
    # vng runs QEMU as a child: end the whole group we started, and nothing else.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


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
