"""Resident memory of `memcgscope run`, this checkout against another git
ref (today's main by default), side by side in one run. Root.

    python tests/bench/bench_rss.py [--baseline-ref main] [--minutes 10]
                                    [--mode tracepoint] [--workdir /var/tmp]

Both collectors start one after the other (each timed from exec to its
first successful scrape), then run at the same time through the same
reclaiming workload: dd through the page cache of a scratch memory cgroup
with a 64M limit, in a loop, for --minutes; each is scraped every 15 s, as
Prometheus would. Printed per collector: start-up to first scrape, RSS after
start, RSS at the end and its peak, episodes and events lost (from its
/metrics), and whether LLVM/clang/bcc are mapped in it. Figures only; it
asserts nothing.

The baseline runs from `git archive <ref>` unpacked into a temporary
directory, imported through a package shim (memcgscope/ with model/,
probes/, collector/ linked in, as pyproject's package-dir maps them), with
this interpreter and its site-packages.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPILER_LIBS = ("libLLVM", "libclang-cpp", "libbcc")
#: the last main with bcc (and LLVM) inside the collector, for a baseline
#: that stays one after the loader split is merged
BEFORE_SPLIT = "a0e585e089597857df26c86e3611b94264b4648f"
PACKAGES = ("model", "probes", "collector")
CLI = "import sys; from memcgscope.collector.cli import main; sys.exit(main())"


def baseline_tree(ref: str, dest: str, repo: str = REPO) -> str:
    """Unpacks `ref` of `repo` below `dest` and returns the directory to put
    on PYTHONPATH so that `memcgscope` imports from it."""
    src = os.path.join(dest, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", repo, "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", src], input=archive, check=True)
    pkg = os.path.join(dest, "pkg", "memcgscope")
    os.makedirs(pkg)
    shutil.copy(os.path.join(src, "memcgscope", "__init__.py"), pkg)
    for name in PACKAGES:
        os.symlink(os.path.join(src, name), os.path.join(pkg, name))
    return os.path.dirname(pkg)


def compiler_mapped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return any(lib in line for line in f for lib in COMPILER_LIBS)
    except OSError:
        return False


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metric_sum(body: str, name: str) -> float:
    """The sum of every sample of `name` (any labels) in a /metrics text."""
    total = 0.0
    for line in body.splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Collector:
    name: str
    argv: list
    env: dict
    cwd: str
    extra: list = field(default_factory=list)   # after `run`: --mode
    port: int = 0
    proc: subprocess.Popen | None = None
    startup_s: float = 0.0
    rss_start: int = 0
    rss_end: int = 0
    rss_peak: int = 0
    compiler: bool = False
    episodes: float = 0.0
    lost: float = 0.0
    scrapes: int = 0
    log: str = ""
    samples: list = field(default_factory=list)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/metrics"

    def start(self, timeout: float) -> None:
        self.port = free_port()
        self.log = os.path.join(tempfile.gettempdir(), f"bench-rss-{self.name}-{os.getpid()}.log")
        t0 = time.monotonic()
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(self.argv + ["run", "--listen", f"127.0.0.1:{self.port}",
                                                      "--divergence-log", ""] + self.extra,
                                         env=self.env, cwd=self.cwd, stdout=subprocess.DEVNULL, stderr=err,
                                         stdin=subprocess.DEVNULL)
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name}: memcgscope run exited with {self.proc.returncode}: "
                                 f"{open(self.log).read()[-2000:]}")
            if time.monotonic() - t0 > timeout:
                raise SystemExit(f"{self.name}: no scrape within {timeout:.0f} s: {open(self.log).read()[-2000:]}")
            try:
                self.scrape()
                break
            except OSError:
                time.sleep(0.05)
        self.startup_s = time.monotonic() - t0
        self.rss_start = self.rss_peak = rss_bytes(self.proc.pid)
        self.compiler = compiler_mapped(self.proc.pid)

    def scrape(self) -> str:
        with urllib.request.urlopen(self.url(), timeout=10) as r:
            body = r.read().decode()
        self.scrapes += 1
        self.episodes = metric_sum(body, "memcgscope_episodes_total")
        self.lost = metric_sum(body, "memcgscope_events_lost_total")
        return body

    def sample(self) -> None:
        rss = rss_bytes(self.proc.pid)
        self.rss_peak = max(self.rss_peak, rss)
        self.rss_end = rss
        self.samples.append(rss)
        self.compiler = self.compiler or compiler_mapped(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(self.log)


def collectors(baseline_path: str | None, mode: str | None, ref: str) -> list[Collector]:
    """The baseline (when given) first, then this checkout."""
    extra = ["--mode", mode] if mode else []
    exe = os.path.join(os.path.dirname(sys.executable), "memcgscope")
    out = []
    if baseline_path:
        env = dict(os.environ, PYTHONPATH=baseline_path)
        # cwd "/": nothing there shadows the shim (sys.path[0] is the cwd for -c)
        name = ref if len(ref) <= 16 else ref[:12]
        out.append(Collector(name, [sys.executable, "-c", CLI], env, "/", extra))
    out.append(Collector("this checkout", [exe], dict(os.environ), "/", extra))
    return out


@contextlib.contextmanager
def workload(workdir: str, mib: int = 192, limit: str = "64M"):
    """dd through the page cache of a scratch cgroup, again and again."""
    from memcgscope.collector.scratch import ScratchCgroup
    target = os.path.join(workdir, f"memcgscope-bench-rss-{os.getpid()}.bin")
    stop = {"flag": False, "runs": 0}
    with ScratchCgroup("bench-rss", limit) as cg:
        import threading

        def loop():
            while not stop["flag"]:
                cg.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
                       timeout=600)
                stop["runs"] += 1
        t = threading.Thread(target=loop, daemon=True)
        t.start()
        try:
            yield stop
        finally:
            stop["flag"] = True
            t.join(timeout=700)
            with contextlib.suppress(OSError):
                os.unlink(target)


def measure(seconds: float, ref: str = "main", mode: str | None = None, workdir: str = "/var/tmp",
            sample_every: float = 15.0, startup_timeout: float = 1800.0, baseline: bool = True) -> dict:
    tmp = tempfile.mkdtemp(prefix="memcgscope-bench-rss-")
    started: list[Collector] = []
    try:
        path = baseline_tree(ref, tmp) if baseline else None
        for c in collectors(path, mode, ref):     # one at a time: start-up is timed alone
            started.append(c)
            c.start(startup_timeout)
        with workload(workdir) as state:
            deadline = time.monotonic() + seconds
            while True:
                for c in started:
                    c.sample()
                    with contextlib.suppress(OSError):
                        c.scrape()
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                time.sleep(min(sample_every, left))
        time.sleep(2)
        for c in started:
            with contextlib.suppress(OSError):
                c.scrape()
            c.sample()
        return {"collectors": started, "workload_runs": state["runs"], "seconds": seconds, "mode": mode}
    finally:
        for c in started:
            c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def report(r: dict, out=sys.stdout) -> None:
    mib = 2 ** 20
    print(f"memcgscope run, mode {r['mode'] or 'best'}, {r['seconds'] / 60:.1f} min of a reclaiming workload "
          f"({r['workload_runs']} dd runs of 192 MiB through a 64M cgroup):", file=out)
    print(f"  {'collector':<16} {'start-up':>9} {'RSS start':>10} {'RSS end':>9} {'RSS peak':>9} "
          f"{'episodes':>9} {'lost':>5}  LLVM/bcc mapped", file=out)
    for c in r["collectors"]:
        print(f"  {c.name:<16} {c.startup_s:>8.2f}s {c.rss_start / mib:>8.1f}Mi {c.rss_end / mib:>7.1f}Mi "
              f"{c.rss_peak / mib:>7.1f}Mi {c.episodes:>9.0f} {c.lost:>5.0f}  {'yes' if c.compiler else 'no'}",
              file=out)
    cs = r["collectors"]
    if len(cs) == 2 and cs[1].rss_end:
        print(f"  ratio {cs[0].name} / {cs[1].name}: RSS at start {cs[0].rss_start / cs[1].rss_start:.1f}x, "
              f"at the end {cs[0].rss_end / cs[1].rss_end:.1f}x; start-up {cs[0].startup_s / cs[1].startup_s:.2f}x",
              file=out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-ref", default="main", help="git ref to compare with (default main)")
    ap.add_argument("--no-baseline", action="store_true", help="only this checkout")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, help="instead of --minutes")
    ap.add_argument("--mode", choices=("fentry", "kprobe", "tracepoint"))
    ap.add_argument("--workdir", default="/var/tmp", help="where dd writes (a filesystem with a page cache)")
    ap.add_argument("--sample-every", type=float, default=15.0)
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_rss.py: needs root (BPF, cgroups)", file=sys.stderr)
        return 2
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    r = measure(seconds, ref=args.baseline_ref, mode=args.mode, workdir=args.workdir,
                sample_every=args.sample_every, baseline=not args.no_baseline)
    report(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
