"""`validate --vm KERNEL`: the same validation inside a guest kernel booted
with virtme-ng (collector/guest.py), the report brought back here.

The guest gets its memory hierarchy (v1 mounted, or +memory on v2), an ext4
on a RAM disk for page cache (its root is 9p: not page cache a memcg
reclaims) and, where the kernel has zram, a swap device; then memcgscope
runs `validate --json` there with the guest's root cgroup as the explicit
parent (the guest is ours), and writes its report to a directory shared
with the host.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile

from ..guest import PAGE_CACHE_DIR, V1_MEMORY_MOUNT, GuestError, guest_kernel, run_in_guest
from .setup import SetupError

__all__ = ["run_vm", "guest_command"]

GUEST_SWAP = "512M"


def guest_command(cgroup: str, report: str, scenario_paths: list[str] = (), *, scratch_limit: str = "1G",
                  profile: str | None = None, mode: str | None = None, no_probes: bool = False) -> str:
    """The shell lines a guest runs for `validate --vm` (tests/vm runs the
    same after its other workloads): zram swap where the kernel has the
    module, then `validate --json` with the guest's root cgroup as the
    explicit parent and page cache on the guest's ext4, the report into
    ``report``, and "rc=N" on stdout. It goes in a file: vng hands the guest
    its command on the kernel command line, which a long scenario list
    overflows (the guest then hangs at boot)."""
    parent = V1_MEMORY_MOUNT if cgroup == "v1" else "/sys/fs/cgroup"
    cmd = [sys.executable, "-m", "memcgscope.collector.cli", "validate", "--json", "--parent", parent,
           "--workdir", PAGE_CACHE_DIR, "--scratch-limit", scratch_limit]
    if profile:
        cmd += ["--profile", profile]
    if mode:
        cmd += ["--mode", mode]
    if no_probes:
        cmd.append("--no-probes")
    cmd += list(scenario_paths)
    swap_setup = (f"if modprobe zram 2>/dev/null; then echo {GUEST_SWAP} > /sys/block/zram0/disksize && "
                  f"mkswap /dev/zram0 >/dev/null && swapon /dev/zram0; fi\n")
    return swap_setup + " ".join(shlex.quote(c) for c in cmd) + f" > {shlex.quote(report)}\necho rc=$?\n"


def run_vm(args, scenario_paths: list[str], progress) -> dict:
    """Boots the guest, validates there, returns the report (validate's
    JSON form); raises SetupError for what stops it."""
    try:
        gk = guest_kernel(args.vm, log=lambda msg: progress(f"kernels: {msg}"))
    except GuestError as e:
        raise SetupError(str(e)) from None
    cgroup = args.cgroup or "v2"
    if cgroup == "v1" and gk.files is not None and gk.files.config and _v1_off(gk.files.config):
        raise SetupError(f"kernel {gk.release} is built without the cgroup v1 memory controller "
                         f"(CONFIG_MEMCG_V1 off); use --cgroup v2")
    share = tempfile.mkdtemp(prefix="memcgscope-vm-", dir="/var/tmp")
    try:
        names = []
        for path in scenario_paths:
            # the guest's /tmp and /var/cache are its own: pass the files along
            dest = os.path.join(share, os.path.basename(path))
            shutil.copyfile(path, dest)
            names.append(dest)
        report = os.path.join(share, "report.json")
        runner = os.path.join(share, "run.sh")
        with open(runner, "w") as f:
            f.write(guest_command(cgroup, report, names, scratch_limit=args.scratch_limit, profile=args.profile,
                                  mode=args.mode, no_probes=args.no_probes))
        script = f"sh {shlex.quote(runner)}"
        progress(f"booting {gk.release} ({cgroup}); the guest compiles the BPF program (tens of seconds "
                 f"under TCG), then runs each scenario")
        try:
            r = run_in_guest(gk, script, cgroup=cgroup, timeout=args.vm_timeout, rwdir=share, page_cache=True,
                             on_stderr=lambda line: progress(f"guest: {line}") if line.startswith(
                                 "memcgscope") else None)
        except GuestError as e:
            raise SetupError(str(e).splitlines()[0]) from None
        progress(f"guest done in {r.seconds:.0f}s ({r.accel})")
        try:
            with open(report) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            tail = (r.stderr or r.stdout)[-1500:].strip().replace("\n", " | ")
            raise SetupError(f"the guest ({gk.release}) wrote no report (exit {r.returncode}): {tail}") from None
        doc["guest"] = {"release": gk.release, "cgroup": cgroup, "accel": r.accel, "seconds": round(r.seconds, 1)}
        return doc
    finally:
        if os.environ.get("MEMCGSCOPE_KEEP_VM_SHARE"):
            print(f"memcgscope validate: kept {share}", file=sys.stderr)
        else:
            shutil.rmtree(share, ignore_errors=True)


def _v1_off(config_path: str) -> bool:
    try:
        with open(config_path) as f:
            text = f.read()
    except OSError:
        return False
    return "# CONFIG_MEMCG_V1 is not set" in text
