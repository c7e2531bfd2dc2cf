"""Probe overhead on a charge-heavy workload (tests/bench/faultloop.c: map,
touch, unmap in a scratch cgroup), with and without each probe mode, in one
run: rounds alternate bare / probed so drift hits both alike. Prints
ns per faulted page and the ratio (probed / bare) per mode. Root.

    python tests/bench/bench_probes.py [--modes tracepoint,kprobe,fentry]
                                       [--rounds 5] [--iters 200] [--lean]

Targets on real hardware, worst case: fentry and tracepoint < 1.03,
kprobe < 1.08. Under QEMU TCG (the VM tier) every instruction is emulated,
so absolute costs and ratios are distorted; compare modes with each other.

Per program it also prints, from the kernel's own accounting
(kernel.bpf_stats_enabled: run_cnt, run_time_ns), the runs per faulted
page and the ns per run against an *empty* program of the same attach
type on the same target, measured in the same run (rounds with only the
empty programs attached): the ratio is what our code costs over the bare
cost of running a program there, which TCG inflates alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from memcgscope.collector.scratch import ScratchCgroup  # noqa: E402
from memcgscope.probes.detect import detect  # noqa: E402
from memcgscope.probes.bpfsys import bpf_stats_enabled, prog_run_stats  # noqa: E402
from memcgscope.probes.session import Session  # noqa: E402

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "faultloop.c")


def build(tmp: str) -> str:
    exe = os.path.join(tmp, "faultloop")
    subprocess.run([shutil.which("gcc") or "cc", "-O2", "-o", exe, SOURCE], check=True)
    return exe


PIN: list[str] = []  # ["taskset", "-c", "N"] with --cpu N
#: what --lean leaves out: the probes that run on every faulted page besides
#: the charge core (run --no-probe)
LEAN = ("page_charge", "count_memcg_events")


def one_run(cg: ScratchCgroup, exe: str, iters: int) -> float:
    r = cg.run([*PIN, exe, str(iters), "4"], timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"faultloop failed: {r.stderr}")
    return float(r.stdout.strip())


def bpf_stats():
    """kernel.bpf_stats_enabled on for the measurement (the kernel's own
    count of time spent in our programs), restored after."""
    return bpf_stats_enabled()


def empty_program_text(attachments) -> tuple[str, dict]:
    """bcc source of one empty program per (kind, target) the session
    attached, named as probes/program.py names its own (kfunc__T,
    kretfunc__T, raw_tracepoint__T, tracepoint__C__N, kp_empty_N), and
    name -> (kind, target). Targets fentry cannot name (a compiler clone,
    T.isra.0) are left out."""
    parts, names = [], {}
    for kind, target in sorted({(k, t) for k, t, _ in attachments}):
        if kind in ("fentry", "fexit"):
            if not target.isidentifier():
                continue
            name = ("kfunc__" if kind == "fentry" else "kretfunc__") + target
            parts.append(f"{'KFUNC_PROBE' if kind == 'fentry' else 'KRETFUNC_PROBE'}({target}) {{ return 0; }}")
        elif kind == "raw_tracepoint":
            name = f"raw_tracepoint__{target}"
            parts.append(f"RAW_TRACEPOINT_PROBE({target}) {{ return 0; }}")
        elif kind == "tracepoint":
            name = "tracepoint__" + target.replace(":", "__", 1)
            parts.append(f"int {name}(void *ctx) {{ return 0; }}")
        elif kind in ("kprobe", "kretprobe"):
            name = f"kp_empty_{len(names)}"
            parts.append(f"int {name}(struct pt_regs *ctx) {{ return 0; }}")
        else:
            continue
        names[name] = (kind, target)
    return "\n".join(parts) + "\n", names


class EmptyPrograms:
    """The empty programs of empty_program_text, loaded with bcc (as the
    loader child does) and attached only inside `attached()`."""

    def __init__(self, attachments, tracing_dir: str | None = None):
        from bcc import BPF
        from memcgscope.probes.detect import bcc_kernel_source
        from memcgscope.probes.loader import PROG_TYPES, captured_stderr
        from memcgscope.probes.sysroot import SysRoot

        source = bcc_kernel_source(SysRoot("/"))
        if source:
            os.environ["BCC_KERNEL_SOURCE"] = source

        class _NoAutoload(BPF):
            def _trace_autoload(self):
                pass

        self.tracing_dir = tracing_dir
        text, self.names = empty_program_text(attachments)
        self._bpf = None
        if self.names:
            noise: list[str] = []   # clang's header warnings
            try:
                with captured_stderr(noise):
                    self._bpf = _NoAutoload(text=text)
            except Exception as e:
                err = next((line for line in noise if "error" in line), str(e))
                raise RuntimeError(f"compiling the empty programs: {err}") from None
        self.fds = {}
        for name, (kind, _target) in self.names.items():
            ptype = PROG_TYPES["kprobe" if kind == "kretprobe" else kind]
            self.fds[name] = self._bpf.load_func(name.encode(), ptype).fd

    @contextlib.contextmanager
    def attached(self):
        from memcgscope.probes import attach as _attach
        held = []
        try:
            for name, (kind, target) in self.names.items():
                held.append(_attach.attach(kind, target, name, self.fds[name], tracing_dir=self.tracing_dir))
            yield
        finally:
            for a in held:
                with contextlib.suppress(OSError):
                    _attach.detach(a)

    def stats(self) -> dict:
        return {self.names[n]: prog_run_stats(fd) for n, fd in self.fds.items()}

    def close(self):
        if self._bpf is not None:
            self._bpf.cleanup()


def _delta(after: dict, before: dict) -> dict:
    return {k: (ns - before.get(k, (0, 0))[0], n - before.get(k, (0, 0))[1]) for k, (ns, n) in after.items()}


def _add(total: dict, d: dict) -> None:
    for k, (ns, n) in d.items():
        a, b = total.get(k, (0, 0))
        total[k] = (a + ns, b + n)


def configs(modes: list[str], without: list[str]) -> list[tuple[str, str, tuple]]:
    """(label, mode, probes left out) per measurement: each mode as is and,
    with ``without``, each mode again without those probes ("MODE lean")."""
    out = [(m, m, ()) for m in modes]
    if without:
        out += [(f"{m} lean", m, tuple(without)) for m in modes]
    return out


def measure(modes: list[str], rounds: int, iters: int, memcg_state: bool = False,
            empties: bool = True, without: list[str] = ()) -> dict[str, dict]:
    """label (``configs``) -> medians of bare and probed ns/page and of the
    per-round ratios, and per program its runs and ns per run, with the
    empty program of its attach type beside it. Each round runs probed,
    bare (probes detached, programs still loaded) and, with ``empties``,
    with only the empty programs attached, back to back, so machine noise
    hits all alike."""
    out = {}
    with tempfile.TemporaryDirectory() as tmp, ScratchCgroup("bench", "512M") as cg:
        exe = build(tmp)
        one_run(cg, exe, max(1, iters // 10))  # warm up page tables and caches
        for label, mode, left_out in configs(modes, list(without)):
            bare, probed, ratios = [], [], []
            per_prog, per_empty = {}, {}
            with Session(mode, memcg_state=memcg_state, without=left_out) as s, bpf_stats():
                kinds = {prog: (kind, target) for kind, target, prog in s.attachments()}
                empty = None
                if empties:
                    try:
                        empty = EmptyPrograms(s.attachments(), getattr(s, "_tracing_dir", None))
                    except Exception as e:   # a report without the baseline beats none
                        print(f"{mode}: empty programs not loaded ({str(e).splitlines()[0] if str(e) else e!r}); "
                              f"no ns/run baseline", file=sys.stderr)
                try:
                    for _ in range(rounds):
                        before = s.program_stats()
                        p = one_run(cg, exe, iters)
                        _add(per_prog, _delta(s.program_stats(), before))
                        s.poll(timeout_ms=0)
                        s.pause()
                        b = one_run(cg, exe, iters)
                        if empty is not None:
                            before = empty.stats()
                            with empty.attached():
                                one_run(cg, exe, iters)
                            _add(per_empty, _delta(empty.stats(), before))
                        s.resume()
                        probed.append(p)
                        bare.append(b)
                        ratios.append(p / b)
                finally:
                    if empty is not None:
                        empty.close()
            pages = rounds * iters * (4 << 20) // 4096
            programs = []
            for prog, (ns, n) in sorted(per_prog.items()):
                kind, target = kinds.get(prog, ("?", "?"))
                ens, en = per_empty.get((kind, target), (0, 0))
                programs.append({"program": prog, "kind": kind, "target": target, "runs_per_page": n / pages,
                                 "ns_per_run": ns / n if n else None,
                                 "empty_ns_per_run": ens / en if en else None})
            bpf_ns = sum(ns for ns, _ in per_prog.values())
            out[label] = {"bare": statistics.median(bare), "probed": statistics.median(probed),
                         "bpf_ns_per_page": bpf_ns / pages,
                         "runs_per_page": sum(n for _, n in per_prog.values()) / pages, "programs": programs,
                         "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default=None, help="comma-separated modes (default: every usable one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=200, help="map/touch/unmap cycles of 4 MiB per run")
    ap.add_argument("--memcg-state", action="store_true", help="also the per-page memcg:mod_memcg_lruvec_state")
    ap.add_argument("--cpu", type=int, help="pin the workload to this CPU (less noise from migrations)")
    ap.add_argument("--no-empty", action="store_true", help="skip the empty-program baseline rounds")
    ap.add_argument("--lean", action="store_true",
                    help="also measure each probe mode without the per-page probes memcgscope run can leave "
                         "out (--no-probe page_charge --no-probe count_memcg_events), in the same run")
    args = ap.parse_args(argv)
    if args.cpu is not None:
        PIN[:] = ["taskset", "-c", str(args.cpu)]
    report = detect()
    modes = args.modes.split(",") if args.modes else [m for m, v in report.modes.items() if v.usable]
    results = measure(modes, args.rounds, args.iters, args.memcg_state, empties=not args.no_empty,
                      without=LEAN if args.lean else ())
    print(f"kernel {report.kernel}, {os.cpu_count()} CPUs, {args.rounds} rounds of {args.iters} x 4 MiB"
          + (", with --memcg-state" if args.memcg_state else ""))
    print(f"{'mode':<11} {'bare ns/page':>13} {'probed ns/page':>15} {'ratio':>7} {'(min-max)':>14} "
          f"{'BPF ns/page':>12}")
    for mode, r in results.items():
        print(f"{mode:<11} {r['bare']:>13.1f} {r['probed']:>15.1f} {r['ratio']:>7.3f} "
              f"({r['ratio_min']:.3f}-{r['ratio_max']:.3f}) {r['bpf_ns_per_page']:>12.1f}")
    print("ratio: median of per-round probed/bare; BPF ns/page: time the kernel accounts to our programs "
          "(kernel.bpf_stats_enabled), excluding the attach mechanism's own cost")
    for mode, r in results.items():
        print(f"{mode}: {r['runs_per_page']:.2f} program runs per faulted page")
        print(f"  {'program':<40} {'kind':<14} {'target':<26} {'runs/page':>9} {'ns/run':>8} "
              f"{'empty ns/run':>12} {'ratio':>6}")
        for p in r["programs"]:
            if not p["runs_per_page"]:
                continue
            ns = f"{p['ns_per_run']:.0f}" if p["ns_per_run"] is not None else "-"
            ens = f"{p['empty_ns_per_run']:.0f}" if p["empty_ns_per_run"] else "-"
            ratio = (f"{p['ns_per_run'] / p['empty_ns_per_run']:.2f}"
                     if p["ns_per_run"] is not None and p["empty_ns_per_run"] else "-")
            print(f"  {p['program']:<40} {p['kind']:<14} {p['target']:<26} {p['runs_per_page']:>9.3f} {ns:>8} "
                  f"{ens:>12} {ratio:>6}")
    print("runs/page and ns/run: run_cnt and run_time_ns per program over the probed rounds; empty ns/run: "
          "an empty program of the same attach type on the same target, in the same run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
