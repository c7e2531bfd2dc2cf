"""A real container runtime on this host: Debian's Podman (4.3, runtime runc,
cgroupfs manager) runs containers of an image imported from a busybox root
filesystem (nothing pulled) below a scratch memory cgroup of ours, and
`memcgscope run` (tracepoint mode) names them and counts the OOM of the one
with a memory limit, with that container as the victim.

Podman's state is private to the test: --root, --runroot, --tmpdir, the
runtime's state, locks, network config and temporary files all live in a
temporary directory, with containers.conf, storage.conf and registries.conf
of our own (CONTAINERS_CONF and friends). Nothing under /etc/containers,
/var/lib/containers, /run or /dev/shm changes (checked).

What podman does on this cgroup v1 host (seen with podman 4.3.1, runc 1.1.5,
conmon 2.1.6), and what the test relies on or cleans up:

* --cgroup-parent P makes the container's cgroup P/libpod-<64-hex id> (no
  .scope: that is the systemd manager's) and puts conmon in P/conmon;
* on v1 one path is made in every hierarchy: cpu, cpuacct, cpuset, devices,
  freezer, blkio, pids, name=systemd and the cgroup2 mount (runc in hybrid
  mode), not just memory. Our own cgroup in those is "/", so P is below it
  there too; every directory podman made in them is removed at the end;
* crun 1.8.1 refuses this hybrid layout ("cgroups in hybrid mode not
  supported, drop all controllers from cgroupv2": the cgroup2 mount offers
  hugetlb), so the runtime is runc;
* podman asks the runtime for RLIMIT_NOFILE/NPROC of 1048576/4194304, above
  this sandbox's hard limits (and runc was refused even our own NPROC hard
  limit), so --ulimit passes 1024 for both.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from memcgscope.collector.scratch import ScratchCgroup, pid_alive
from promkit import http_get, run_collector

PODMAN = "/usr/bin/podman"
RUNC = "/usr/bin/runc"
BUSYBOX = "/bin/busybox"
IMAGE = "localhost/memcgscope-busybox:test"
MEMORY = "/sys/fs/cgroup/memory"
# host state podman must leave as it was (directories are listed recursively)
WATCHED = ("/etc/containers", "/var/lib/containers", "/run", "/dev/shm", "/var/run/libpod", "/etc/cni")
DEADLINE = 60.0
# waits for /ctl/go (a file the test creates), then its workload
WAIT = "while [ ! -e /ctl/go ]; do sleep 0.1; done; "


def cgroup_mounts() -> list[str]:
    """Every cgroup (v1) and cgroup2 mount point of this host."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            if right.split()[0] in ("cgroup", "cgroup2"):
                out.append(left.split()[4])
    return out


def mounts_below(path: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split(" - ")[0].split()[4] for line in f]
    return [p for p in points if p == path or p.startswith(path + "/")]


def listing(root: str) -> dict[str, str]:
    """path -> what it is (a file's size and sha256, a link's target, 'dir')
    for `root` and everything below it; {} when it does not exist."""
    out = {}
    if not os.path.lexists(root):
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        out[dirpath] = "dir"
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                out[p] = "-> " + os.readlink(p)
            elif os.path.isfile(p) and root != "/run":   # /run's files change under their daemons
                try:
                    with open(p, "rb") as f:
                        out[p] = hashlib.sha256(f.read()).hexdigest()
                except OSError as e:
                    out[p] = f"unreadable: {e.strerror}"
            else:
                out[p] = "file"
    return out


def host_state() -> dict[str, dict[str, str]]:
    state = {root: listing(root) for root in WATCHED}
    # /run: only what a container runtime would leave (other daemons' files come and go)
    state["/run"] = {p: v for p, v in state["/run"].items()
                     if any(k in p for k in ("runc", "crun", "libpod", "containers", "podman", "conmon", "netns"))}
    return state


def rmtree_cgroup(path: str) -> None:
    """Removes the cgroup at `path` and those below it, deepest first."""
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        child = os.path.join(path, name)
        if os.path.isdir(child):
            rmtree_cgroup(child)
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            time.sleep(0.05)
    os.rmdir(path)


def kill_members(path: str) -> None:
    """SIGKILL to the processes in the cgroup at `path` and below it: only
    ever what our podman started there (conmon, a container's processes)."""
    for dirpath, _, filenames in os.walk(path):
        if "cgroup.procs" in filenames:
            with open(os.path.join(dirpath, "cgroup.procs")) as f:
                for pid in f.read().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)


class Podman:
    """podman with every piece of its state in `home`."""

    def __init__(self, home: Path):
        self.home = home
        for d in ("root", "runroot", "tmp", "runc", "net.d", "bin", "ctl"):
            (home / d).mkdir()
        (home / "containers.conf").write_text(
            "[engine]\n"
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "none"\n'
            # file locks in tmp_dir, not the shm segment /dev/shm/libpod_lock
            'lock_type = "file"\n'
            f'tmp_dir = "{home}/tmp"\n'
            f'image_copy_tmp_dir = "{home}/tmp"\n'
            "[network]\n"
            f'network_config_dir = "{home}/net.d"\n')
        (home / "storage.conf").write_text(
            f'[storage]\ndriver = "vfs"\ngraphroot = "{home}/root"\nrunroot = "{home}/runroot"\n')
        (home / "registries.conf").write_text("")   # no registry at all
        # runc's state in our directory for every runc call: podman's --runtime-flag does not
        # reach the exit command (`podman container cleanup`), which then used /run/runc
        runc = home / "bin" / "runc"
        runc.write_text(f'#!/bin/sh\nexec {RUNC} --root {home}/runc "$@"\n')
        runc.chmod(0o755)
        self.runtime = str(runc)
        self.env = {**os.environ, "CONTAINERS_CONF": str(home / "containers.conf"),
                    "CONTAINERS_STORAGE_CONF": str(home / "storage.conf"),
                    "CONTAINERS_REGISTRIES_CONF": str(home / "registries.conf"), "TMPDIR": str(home / "tmp"),
                    # a registry request would go to a closed port and fail, not leave the host
                    "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
        self.argv = [PODMAN, "--root", f"{home}/root", "--runroot", f"{home}/runroot", "--tmpdir", f"{home}/tmp",
                     "--cgroup-manager", "cgroupfs", "--events-backend", "none", "--storage-driver", "vfs",
                     "--runtime", self.runtime]

    def run(self, *args: str, check: bool = True, timeout: float = 120, prefix: tuple[str, ...] = (),
            cwd: Path | None = None):
        # conmon inherits podman's working directory and writes its "oom" file there
        r = subprocess.run([*prefix, *self.argv, *args], env=self.env, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd or self.home)
        if check:
            assert r.returncode == 0, f"podman {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-2000:]}"
        return r

    def import_image(self) -> str:
        """IMAGE from a root filesystem of busybox and its applet links."""
        rootfs = self.home / "rootfs.tar"
        with tarfile.open(rootfs, "w") as tar:
            for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "ctl"):
                info = tarfile.TarInfo(d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            tar.add(BUSYBOX, "bin/busybox")
            for applet in ("sh", "sleep", "tail", "head", "cat"):
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(info)
        # containers/image (podman 4.3) keeps a blob-info cache in /var/lib/containers/cache
        # for root, whatever --root says: the import runs with a scratch /var/lib of its own
        # (a private mount namespace; the store it writes is ours, under --root)
        sh = 'mount -t tmpfs -o size=16m memcgscope-podman /var/lib && exec "$@"'
        r = self.run("import", str(rootfs), IMAGE,
                     prefix=("unshare", "--mount", "--propagation", "private", "sh", "-c", sh, "sh"))
        return r.stdout.strip().splitlines()[-1]


@pytest.fixture
def podman():
    """A Podman with private state, the image imported; on every exit path:
    its containers removed, its mounts gone, its directory removed, and
    the host's container state as it was."""
    for tool in (PODMAN, RUNC, "/usr/bin/conmon", BUSYBOX):
        if not os.path.exists(tool):
            pytest.fail(f"{tool} is missing: run scripts/setup-tests.sh (it installs podman, runc and busybox-static)")
    before = host_state()
    home = Path(tempfile.mkdtemp(prefix="memcgscope-podman-"))
    p = Podman(home)
    try:
        yield p
    finally:
        p.run("rm", "--force", "--all", "--time", "0", check=False)
        p.run("rmi", "--all", "--force", check=False)
        for m in sorted(mounts_below(str(home)), key=len, reverse=True):
            subprocess.run(["umount", "-l", m], check=False)
        shutil.rmtree(home, ignore_errors=True)
    assert not home.exists(), f"{home} was not removed"
    after = host_state()
    changed = {root: sorted(set(before[root].items()) ^ set(after[root].items())) for root in WATCHED}
    assert not any(changed.values()), f"podman changed host state outside its private directory: " \
                                      f"{ {r: c for r, c in changed.items() if c} }"


@contextlib.contextmanager
def cgroup_parent(podman: Podman):
    """A scratch memory cgroup below our own (hard limit 256M) to pass as
    --cgroup-parent; yields (its path relative to the hierarchies, its
    directory). At the end podman's containers are removed and everything
    podman made for them, in every hierarchy, and nothing it made is left."""
    mounts = cgroup_mounts()
    with ScratchCgroup("podman", "256M") as cg:
        rel = cg.path[len(MEMORY):]
        # in the other hierarchies: the ancestors of `rel` that are not there yet are podman's
        made = [os.path.join(m, *rel.lstrip("/").split("/")[:i]) for m in mounts if m != MEMORY
                for i in range(1, rel.count("/") + 1)]
        made = [d for d in made if not os.path.isdir(d)]
        try:
            yield rel, cg.path
        finally:
            podman.run("rm", "--force", "--all", "--time", "0", check=False)
            for m in mounts:
                d = m + rel
                kill_members(d)
                for name in os.listdir(d) if os.path.isdir(d) else []:
                    if os.path.isdir(os.path.join(d, name)):
                        rmtree_cgroup(os.path.join(d, name))
                if m != MEMORY:
                    rmtree_cgroup(d)
            for d in sorted(made, key=len, reverse=True):
                try:
                    os.rmdir(d)
                except FileNotFoundError:
                    pass
                except OSError as e:   # another session's cgroups below it: theirs, left alone
                    if e.errno not in (errno.ENOTEMPTY, errno.EBUSY):
                        raise
    left = [m + rel for m in mounts if os.path.isdir(m + rel)]
    assert not left, f"cgroups podman made were not removed: {left}"


def sweep_stale_parents() -> None:
    """What a crashed earlier run left (its pid in the name is dead)."""
    own = os.path.dirname(ScratchCgroup("podman", "1").path)[len(MEMORY):]
    for m in cgroup_mounts():
        d = m + own
        for name in os.listdir(d) if os.path.isdir(d) else []:
            pid = name.rsplit("-", 1)[-1]
            if name.startswith("memcgscope-podman-") and pid.isdigit() and not pid_alive(int(pid)):
                kill_members(os.path.join(d, name))
                with contextlib.suppress(OSError):
                    rmtree_cgroup(os.path.join(d, name))


def scrape(port: int) -> list[tuple[str, dict, float]]:
    status, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200, body[:500]
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(body.decode())
            for s in fam.samples]


def wait_for(what: str, port: int, check, seen) -> list:
    """Scrapes until `check(samples)` is truthy; on timeout fails with what
    `seen(samples)` picks from the last scrape."""
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = scrape(port)
        got = check(samples)
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {DEADLINE:.0f}s waiting for {what}; last scrape had: {seen(samples)}")
        time.sleep(0.5)


def series(samples, name, **labels):
    return [(lab, v) for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items())]


def test_podman_container_is_named_and_its_oom_counted(podman):
    t0 = time.monotonic()
    figures = {}
    image_id = podman.import_image()
    figures["import"] = time.monotonic() - t0
    (img,) = json.loads(podman.run("image", "inspect", IMAGE).stdout)
    assert img["Id"] == image_id.removeprefix("sha256:") and img["Os"] == "linux"
    # nothing is pulled: an image that is not in the store is an error, not a download
    missing = podman.run("run", "--pull", "never", "--rm", "localhost/memcgscope-not-there:none", "true",
                         check=False, timeout=60)
    assert missing.returncode == 125 and "image not known" in missing.stderr, missing.stderr

    sweep_stale_parents()
    nofile = min(1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    nproc = min(1024, resource.getrlimit(resource.RLIMIT_NPROC)[1])
    (podman.home / "collector").mkdir()
    with cgroup_parent(podman) as (parent, parent_dir):
        with run_collector(podman.home / "collector", "--cgroup", f"{parent}/*",
                           "--divergence-log", "") as (proc, port, stderr):
            figures["collector"] = time.monotonic() - t0
            assert "mode tracepoint" in stderr.read_text()

            def start(name, *opts, script):
                (podman.home / name).mkdir()
                return podman.run(
                    "run", "--detach", "--pull", "never", "--name", name, "--network", "none", "--ipc", "private",
                    "--cgroup-parent", parent, "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit",
                    f"nproc={nproc}:{nproc}", "--volume", f"{podman.home}/ctl:/ctl", *opts, IMAGE,
                    "sh", "-c", WAIT + script, cwd=podman.home / name).stdout.strip()

            # one with a 32M limit (memory+swap alike) whose tail(1) holds one endless line of
            # /dev/zero in anonymous memory; one without a limit of its own that holds 16M and exits
            oom = start("memcgscope-oom", "--memory", "32m", "--memory-swap", "32m", script="exec tail /dev/zero")
            calm = start("memcgscope-calm", script="head -c 16777216 /dev/zero | tail -n 1 >/dev/null")
            figures["containers"] = time.monotonic() - t0
            paths = {cid: f"{parent}/libpod-{cid}" for cid in (oom, calm)}
            for cid, path in paths.items():
                assert len(cid) == 64 and os.path.isdir(MEMORY + path), \
                    f"podman made no {MEMORY + path}; below the parent: {os.listdir(parent_dir)}"
            with open(f"{MEMORY}{paths[oom]}/memory.limit_in_bytes") as f:
                assert int(f.read()) == 32 << 20

            def info(samples):
                return {lab["cgroup"]: lab for lab, _ in series(samples, "memcgscope_cgroup_info")
                        if lab["cgroup"] in paths.values() and lab["container"]}

            labels = wait_for("cgroup_info naming both containers", port,
                              lambda s: (lambda i: i if len(i) == 2 else None)(info(s)),
                              lambda s: series(s, "memcgscope_cgroup_info"))
            figures["named"] = time.monotonic() - t0
            for cid, name in ((oom, "memcgscope-oom"), (calm, "memcgscope-calm")):
                lab = labels[paths[cid]]
                assert (lab["runtime"], lab["container_id"], lab["container"]) == ("podman", cid, name), lab

            (podman.home / "ctl" / "go").touch()
            exits = {cid: int(podman.run("wait", cid, timeout=120).stdout.strip()) for cid in (oom, calm)}
            figures["exited"] = time.monotonic() - t0
            (state,) = json.loads(podman.run("inspect", oom).stdout)
            assert exits == {oom: 137, calm: 0}, exits
            # conmon 2.1.6 saw the OOM (its eventfd on memory.oom_control) but, given no
            # --persist-dir by podman 4.3.1, wrote its "oom" file into its working directory,
            # so podman says OOMKilled false; the exit status says SIGKILL
            assert state["State"]["OOMKilled"] or state["State"]["ExitCode"] == 137, state["State"]
            oom_files = {name: (podman.home / name / "oom").exists() for name in ("memcgscope-oom", "memcgscope-calm")}
            assert oom_files == {"memcgscope-oom": True, "memcgscope-calm": False}, oom_files

            def victims(samples):
                got = series(samples, "memcgscope_oom_victims_total", cgroup=paths[oom])
                return got if got and got[0][1] >= 1 else None

            ((_, n_victims),) = wait_for("the OOM victim in the limited container", port, victims,
                                         lambda s: series(s, "memcgscope_oom_victims_total")
                                         + series(s, "memcgscope_oom_kills_total"))
            figures["victim"] = time.monotonic() - t0
            samples = scrape(port)
            kills = series(samples, "memcgscope_oom_kills_total", cgroup=paths[oom])
            assert kills and kills[0][1] == n_victims, series(samples, "memcgscope_oom_kills_total")
            # the other container (watched: it is in cgroup_info) is no victim
            assert [v for _, v in series(samples, "memcgscope_oom_victims_total", cgroup=paths[calm])] in ([], [0.0])
            # the names stay with the cgroups after the containers (and their conmons) are gone
            assert set(info(samples)) == set(paths.values()), series(samples, "memcgscope_cgroup_info")
    print("\npodman host test (s since start): " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items())
          + f"; victims {n_victims:.0f}; OOMKilled {state['State']['OOMKilled']}; container cgroup {paths[oom]}")
