"""Boot a Debian guest kernel under QEMU (TCG) with virtme-ng, run one
command in it, return its output and exit status, and always stop it.

The guest sees the host's root filesystem copy-on-write over 9p (so this
checkout, its .venv, bcc and /usr/src headers are there at the same paths)
and writes back only to `rwdir`. Guest configurations are data: a kernel
series and a cgroup layout (real-kernels.md §2).
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass

__all__ = ["Guest", "GUESTS", "GuestResult", "GuestError", "run_in_guest", "find_kernel",
           "preflight", "REPO"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_BIN = os.path.join(REPO, ".venv", "bin")


@dataclass(frozen=True)
class Guest:
    name: str
    kernel_glob: str   # under /boot, newest match wins
    cgroup: str        # "v1": memory controller mounted as v1; "v2": +memory in cgroup2
    series: str        # the model profile this kernel follows

    @property
    def id(self) -> str:
        return self.name


GUESTS = (
    Guest("debian-6.1-v1", "vmlinuz-6.1.0-*-amd64", "v1", "6.1"),
    Guest("debian-6.1-v2", "vmlinuz-6.1.0-*-amd64", "v2", "6.1"),
    Guest("debian-6.12-v2", "vmlinuz-6.12.*-amd64", "v2", "6.12"),
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

    def __str__(self) -> str:
        return (f"{self.guest.name} ({self.kernel}): exit {self.returncode} in {self.seconds:.0f}s\n"
                f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr[-4000:]}")


class GuestError(Exception):
    pass


def find_kernel(guest: Guest) -> str:
    matches = glob.glob(os.path.join("/boot", guest.kernel_glob))
    if not matches:
        raise GuestError(f"no /boot/{guest.kernel_glob} for guest {guest.name}; run scripts/setup-tests.sh")

    def version_key(path: str):
        return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", path)]
    return sorted(matches, key=version_key)[-1]


def preflight(guest: Guest) -> str:
    """The kernel image to boot; raises GuestError naming what is missing."""
    if os.geteuid() != 0:
        raise GuestError("tests/vm needs root (vng loads modules and boots QEMU as root)")
    if not os.path.exists(os.path.join(VENV_BIN, "vng")):
        raise GuestError(f"virtme-ng is not installed in {VENV_BIN}; run scripts/setup-tests.sh")
    for tool in ("qemu-system-x86_64", "busybox"):
        if not shutil.which(tool):
            raise GuestError(f"{tool} not found; run scripts/setup-tests.sh")
    image = find_kernel(guest)
    release = os.path.basename(image)[len("vmlinuz-"):]
    if not os.path.isdir(f"/lib/modules/{release}"):
        raise GuestError(f"/lib/modules/{release} missing; vng loads the guest's 9p/overlay modules from there")
    return image


def run_in_guest(guest: Guest, command: str, *, timeout: float = 600, memory: str = "2G",
                 cpus: int = 2, rwdir: str | None = None) -> GuestResult:
    """Boots `guest`, runs `command` (sh) as root after the cgroup prelude,
    returns its output and status. The guest is killed on timeout or error."""
    image = preflight(guest)
    release = os.path.basename(image)[len("vmlinuz-"):]
    script = f"set -e; {_PRELUDE[guest.cgroup]}; set +e; cd {REPO}; {command}"
    argv = [os.path.join(VENV_BIN, "vng"), "-r", image, "--busybox", shutil.which("busybox"),
            "--disable-kvm", "--force-9p", "-m", memory, "--cpus", str(cpus)]
    if rwdir:
        argv += ["--rwdir", rwdir]
    argv += ["--exec", script]
    env = dict(os.environ, PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True, cwd=REPO)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        stdout, stderr = proc.communicate()
        raise GuestError(f"{guest.name}: no exit after {timeout:.0f}s; guest killed\n{stdout[-2000:]}\n{stderr[-2000:]}")
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        if proc.poll() is None:
            _kill_group(proc)
    return GuestResult(guest, release, proc.returncode, stdout, stderr, time.monotonic() - start)


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
