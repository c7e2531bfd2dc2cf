"""Boot a kernel under QEMU with virtme-ng, run one command in it, and always
stop it (``validate --vm`` and tests/vm use this).

The guest sees the host's root filesystem copy-on-write over 9p (so the
installed memcgscope, its virtual environment and bcc are there at the same
paths) and writes back only to ``rwdir``. Kernels come from memcgscope's
cache (collector/kernels.py: fetched, never installed), whose
``KernelFiles.vng_args()`` maps that cache (modules, headers) and the
kernel's boot/ into the guest; or from a vmlinuz path, whose modules vng
then looks for in /lib/modules/<release>.

KVM is used when a trial boot works, TCG otherwise (``MEMCGSCOPE_VM_ACCEL``
decides outright).  Only the process group this module starts is ever
killed. One guest at a time per machine: a boot waits for the others'
(an flock on ``GUEST_LOCK``), because two TCG guests on a small machine
each run slower than twice as long, and their timeouts fire.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from . import kernels

__all__ = ["GuestError", "GuestResult", "GuestKernel", "prelude", "accel", "run_in_guest", "guest_kernel",
           "vng_path", "V1_MEMORY_MOUNT", "PAGE_CACHE_DIR"]

#: where the v1 memory hierarchy is mounted in a v1 guest
V1_MEMORY_MOUNT = "/run/memcg-v1"
#: a real local filesystem for page cache in the guest (its / is 9p and its
#: /tmp an overlay on tmpfs: neither is page cache a memcg reclaims)
PAGE_CACHE_DIR = "/run/memcgscope-ext4"
#: held while a guest runs (see the module's text)
GUEST_LOCK = os.environ.get("MEMCGSCOPE_GUEST_LOCK", "/run/lock/memcgscope-guest.lock")
KVM_PROBE_TIMEOUT = 25.0  # a KVM boot to a shell takes a few seconds; TCG 10-20 s


class GuestError(Exception):
    """One line: what failed, for which kernel, and the fix."""


@dataclass
class GuestResult:
    kernel: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    accel: str = "tcg"

    def __str__(self) -> str:
        return (f"{self.kernel} ({self.accel}): exit {self.returncode} in {self.seconds:.0f}s\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr[-4000:]}")


@dataclass
class GuestKernel:
    release: str
    vng_args: list
    files: kernels.KernelFiles | None = None


def prelude(cgroup: str, *, page_cache: bool = False, swap: str | None = None) -> str:
    """Shell lines that give the guest its memory hierarchy (v1: mounted;
    v2: +memory for the root's children), optionally an ext4 on a RAM disk
    for page cache and a zram swap device."""
    if cgroup == "v1":
        # v1 memory can be mounted while cgroup2 (the guest init's) does not use it
        lines = [f"mkdir -p {V1_MEMORY_MOUNT}", f"mount -t cgroup -o memory memory {V1_MEMORY_MOUNT}"]
    elif cgroup == "v2":
        lines = ["echo +memory > /sys/fs/cgroup/cgroup.subtree_control"]
    else:
        raise ValueError(f"cgroup {cgroup!r}: use v1 or v2")
    if page_cache:
        lines += ["modprobe brd rd_nr=1 rd_size=524288", "mkfs.ext4 -q -F /dev/ram0",
                  f"mkdir -p {PAGE_CACHE_DIR}", f"mount -t ext4 /dev/ram0 {PAGE_CACHE_DIR}"]
    if swap:
        lines += ["modprobe zram", f"echo {swap} > /sys/block/zram0/disksize", "mkswap /dev/zram0 >/dev/null",
                  "swapon /dev/zram0"]
    return "; ".join(lines)


def vng_path() -> str:
    """virtme-ng's `vng`, next to this Python's executable."""
    here = os.path.join(os.path.dirname(sys.executable), "vng")
    found = here if os.path.exists(here) else shutil.which("vng")
    if not found:
        raise GuestError(f"virtme-ng (vng) is not installed next to {sys.executable}; run scripts/setup.sh --vm "
                         "(pip install virtme-ng, apt-get install qemu-system-x86 busybox-static udev)")
    return found


def _preflight() -> None:
    if os.geteuid() != 0:
        raise GuestError("booting a guest needs root (vng loads modules and boots QEMU as root)")
    vng_path()
    for tool in ("qemu-system-x86_64", "busybox"):
        if not shutil.which(tool):
            raise GuestError(f"{tool} not found; run scripts/setup.sh --vm")
    if not (os.path.exists("/usr/lib/systemd/systemd-udevd") or os.path.exists("/lib/systemd/systemd-udevd")):
        # without udevd in the guest vng has no script I/O ports: no output, exit 255
        raise GuestError("systemd-udevd not found (vng's guest init needs it for the command's I/O); "
                         "run scripts/setup.sh --vm (apt-get install udev)")


def guest_kernel(spec: str, *, fetch: bool = True, log=None) -> GuestKernel:
    """A kernel to boot: a vmlinuz path, or a Debian kernel spec (family,
    upstream version or uname -r) from the cache, fetched first if missing
    and ``fetch``."""
    if os.path.sep in spec and os.path.isfile(spec):
        out = subprocess.run(["file", "-b", spec], capture_output=True, text=True).stdout
        release = out.split("version ", 1)[1].split()[0] if "version " in out else ""
        if not release:
            raise GuestError(f"{spec}: not a Linux kernel image (file(1) says {out.strip()!r}); "
                             "give a vmlinuz or a Debian kernel such as 6.12")
        if not os.path.isdir(f"/lib/modules/{release}"):
            raise GuestError(f"{spec}: its modules (/lib/modules/{release}) are missing; vng loads 9p and "
                             f"overlay from there: install them, or give a Debian kernel to fetch")
        return GuestKernel(release, ["-r", spec])
    try:
        kf = kernels.lookup(spec)
        if kf is None:
            if not fetch:
                raise GuestError(f"kernel {spec} is not fetched; run: memcgscope kernels fetch {spec}")
            kf = kernels.ensure_kernel(spec, log=log)
    except kernels.KernelError as e:
        raise GuestError(str(e)) from None
    return GuestKernel(kf.release, kf.vng_args(), kf)


# --- KVM or TCG -----------------------------------------------------------------

def accel(gk: GuestKernel | None = None) -> tuple[str, str]:
    """("kvm" | "tcg", why). MEMCGSCOPE_VM_ACCEL=kvm|tcg decides outright.
    Otherwise one trial boot with KVM and a trivial command: KVM is used
    only when that prints its marker and exits 0 within KVM_PROBE_TIMEOUT
    (on machines where /dev/kvm exists but KVM boots hang or abort, TCG is
    the way). The answer is kept per host boot and QEMU build in the cache,
    so the trial costs at most once per boot."""
    forced = os.environ.get("MEMCGSCOPE_VM_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced, f"MEMCGSCOPE_VM_ACCEL={forced}"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is missing or not accessible"
    if gk is None:
        return "tcg", "no kernel to try KVM with"
    key = _accel_key()
    path = os.path.join(kernels.Cache().root, "vm-accel.json")
    try:
        with open(path) as f:
            known = json.load(f)
        if known.get("key") == key:
            return known["accel"], known["why"] + " (tried earlier this boot)"
    except (OSError, ValueError, KeyError):
        pass
    result, why = _try_kvm(gk)
    try:
        with open(path + ".tmp", "w") as f:
            json.dump({"key": key, "accel": result, "why": why}, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass
    return result, why


def _accel_key() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    qemu = shutil.which("qemu-system-x86_64") or ""
    qstat = os.stat(qemu) if qemu else None
    raw = f"{boot} {qemu} {qstat.st_mtime if qstat else ''}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def _try_kvm(gk: GuestKernel) -> tuple[str, str]:
    marker = "memcgscope-kvm-ok"
    argv = _vng_argv(gk, "kvm", f"echo {marker}", "1G", 1, None)
    start = time.monotonic()
    try:
        rc, out, _err = _run_group(argv, KVM_PROBE_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "tcg", f"a KVM boot of {gk.release} did not finish in {KVM_PROBE_TIMEOUT:.0f}s"
    secs = time.monotonic() - start
    if rc == 0 and marker in out:
        return "kvm", f"a KVM boot of {gk.release} ran a command in {secs:.1f}s"
    return "tcg", f"a KVM boot of {gk.release} failed (exit {rc} after {secs:.1f}s)"


# --- booting ---------------------------------------------------------------------

def _vng_argv(gk: GuestKernel, acceleration: str, script: str, memory: str, cpus: int,
              rwdir: str | None) -> list[str]:
    argv = [vng_path()] + list(gk.vng_args) + [
        "--busybox", shutil.which("busybox") or "/bin/busybox", "--force-9p", "-m", memory, "--cpus", str(cpus)]
    if acceleration != "kvm":
        argv.append("--disable-kvm")
    if rwdir:
        argv += ["--rwdir", rwdir]
    return argv + ["--exec", script]


def _run_group(argv: list[str], timeout: float, on_stderr=None, cwd: str | None = None) -> tuple[int, str, str]:
    """Runs argv in its own process group; ``on_stderr(line)`` sees the
    guest's stderr as it comes. The group is killed on timeout or error."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # stdin </dev/null: without it a guest run printed nothing
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=cwd)
    err_lines: list[str] = []

    def pump_err():
        for line in proc.stderr:
            err_lines.append(line)
            if on_stderr is not None:
                on_stderr(line.rstrip("\n"))

    t = threading.Thread(target=pump_err, daemon=True)
    t.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        _kill_group(proc)
        t.join(5)
        e.stdout, e.stderr = proc.stdout.read() if proc.stdout else "", "".join(err_lines)
        raise
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    t.join(5)
    return proc.returncode, stdout, "".join(err_lines)


def run_in_guest(gk: GuestKernel, command: str, *, cgroup: str = "v2", timeout: float = 600, memory: str = "2G",
                 cpus: int = 2, rwdir: str | None = None, cwd: str | None = None, page_cache: bool = False,
                 swap: str | None = None, on_stderr=None) -> GuestResult:
    """Boots ``gk``, runs ``command`` (sh) as root after the prelude, returns
    its output and status. The guest is killed on timeout or error."""
    _preflight()
    with one_guest_at_a_time(on_stderr):
        return _run_locked(gk, command, cgroup, timeout, memory, cpus, rwdir, cwd, page_cache, swap, on_stderr)


@contextlib.contextmanager
def one_guest_at_a_time(on_wait=None):
    """Holds GUEST_LOCK; says so through ``on_wait`` when another guest has it."""
    os.makedirs(os.path.dirname(GUEST_LOCK), exist_ok=True)
    with open(GUEST_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait(f"memcgscope: another guest is running ({GUEST_LOCK} is held); waiting for it")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_locked(gk, command, cgroup, timeout, memory, cpus, rwdir, cwd, page_cache, swap, on_stderr):
    acceleration, _why = accel(gk)
    script = f"set -e; {prelude(cgroup, page_cache=page_cache, swap=swap)}; set +e; " \
             + (f"cd {cwd}; " if cwd else "") + command
    argv = _vng_argv(gk, acceleration, script, memory, cpus, rwdir)
    start = time.monotonic()
    try:
        rc, stdout, stderr = _run_group(argv, timeout, on_stderr, cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise GuestError(f"{gk.release}: no exit after {timeout:.0f}s; guest killed\n"
                         f"{(e.stdout or '')[-2000:]}\n{(e.stderr or '')[-2000:]}") from None
    return GuestResult(gk.release, rc, stdout, stderr, time.monotonic() - start, acceleration)


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
