"""`memcgscope run`: the collector. Probes the charge path (best mode, or
--mode), checks each slow-path episode against the model of this kernel,
and serves Prometheus metrics. Needs root. SIGINT/SIGTERM: detach, exit 0.

Default listen address: 127.0.0.1:10064. The Prometheus default-port page
has allocated all of 9100-9999 to exporters, so a port inside it would
collide with some registered exporter; 10064 is outside that range and is
not used by the usual daemons on such hosts (kubelet 10250/10255,
kube-proxy 10249/10256, ingress-nginx 10254).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

DEFAULT_LISTEN = "127.0.0.1:10064"


def resolution_for(report, override: str | None = None):
    """The profile of the kernel a probe report describes (the one resolver,
    model.profiles.resolve_profile); raises ValueError."""
    from memcgscope.model.profiles import resolve_profile
    return resolve_profile(report.kernel, report.kernel_version, signature=report.version_signature,
                           override=override)
DEFAULT_DIVERGENCE_LOG = "/var/log/memcgscope/divergences.jsonl"

EPILOG = f"""examples:
  memcgscope run                              serve {DEFAULT_LISTEN}/metrics
  memcgscope run --cgroup '/system.slice/*'   only cgroups below system.slice
  memcgscope run --listen :10064 --web.config.file web.yml   TLS and basic auth
"""


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the collector: probe, cross-check, serve metrics (root)",
                       description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve /metrics (default {DEFAULT_LISTEN}; ':PORT' for all interfaces)")
    p.add_argument("--web.config.file", dest="web_config", metavar="FILE",
                   help="TLS and basic auth, in the Prometheus exporter-toolkit format")
    p.add_argument("--mode", choices=("fentry", "kprobe", "tracepoint"), help="probe mode (default: the best usable)")
    p.add_argument("--profile", help="model profile to check against (default: from the running kernel)")
    p.add_argument("--cgroup", action="append", default=[], metavar="GLOB",
                   help="watch only cgroups whose path matches (repeatable; '*' crosses '/')")
    p.add_argument("--max-cgroups", type=int, default=1000, metavar="N",
                   help="label at most N cgroups by path; the rest aggregate into cgroup=\"other\" (default 1000)")
    p.add_argument("--interval", type=float, default=15.0, metavar="S",
                   help="seconds between cgroupfs reads and aggregate checks (default 15)")
    p.add_argument("--grace", type=float, default=60.0, metavar="S",
                   help="keep a removed cgroup's series this long (default 60)")
    p.add_argument("--divergence-log", default=DEFAULT_DIVERGENCE_LOG, metavar="FILE",
                   help=f"JSON lines of divergences with their episodes (default {DEFAULT_DIVERGENCE_LOG}; '' for none)")
    p.add_argument("--memcg-state", action="store_true",
                   help="also count memcg:mod_memcg_lruvec_state (6.13+); it fires several times per page fault")
    p.add_argument("--ringbuf-pages", type=int, default=256, metavar="N", help="ring buffer size in pages (default 256)")
    p.add_argument("--latency-sample", type=int, default=64, metavar="N",
                   help="time 1 in N fast charges (each sample counts N times in memcgscope_charge_latency_seconds; "
                        "slow charges are all timed); 1 times every charge, at two clock reads each (default 64)")
    add_no_probe(p)
    p.add_argument("--ebpf", action="store_true", help="print the BPF program this kernel gets, and exit")
    p.set_defaults(func=run)


def add_no_probe(p) -> None:
    """--no-probe NAME (repeatable), as node_exporter's --no-collector.X:
    what a footprint-minded node leaves out (run and record alike)."""
    from memcgscope.probes.program import OPTIONAL_PROBES
    gives = "; ".join(f"{name}: {what}" for name, what in OPTIONAL_PROBES.items())
    p.add_argument("--no-probe", action="append", default=[], metavar="NAME", dest="no_probe",
                   choices=tuple(OPTIONAL_PROBES),
                   help=f"leave this probe out (repeatable) with what it gives ({gives}). Without the two "
                        "that run on every faulted page a fault runs two programs (fentry, kprobe)")


def print_ebpf(session, out=sys.stdout) -> None:
    """The generated BPF C and the flags it is compiled with (bcc tools'
    --ebpf): what would be loaded on this kernel, in this mode."""
    program = session.build(check_fentry=False)
    out.write(f"// memcgscope: mode {program.mode}; compiled with:\n")
    for flag in program.cflags:
        out.write(f"//   {flag}\n")
    for p in program.probes:
        out.write(f"// probe {p.role} {p.target} ({p.kind}): "
                  f"{'attached' if p.attached else 'off'}{': ' + p.reason if p.reason else ''}\n")
    out.write(program.text)


def _fail(msg: str, code: int = 1) -> int:
    print(f"memcgscope run: {msg}", file=sys.stderr)
    return code


def run(args) -> int:
    from memcgscope import __version__
    from memcgscope.probes.bpfsys import bpf_stats_enabled
    from memcgscope.probes.session import Session, SessionError
    from prometheus_client import CollectorRegistry

    from memcgscope.model.profiles import resolve_profile

    from .cgroupfs import CgroupfsReader
    from .cgroups import CgroupError, resolver_for
    from .daemon import Daemon, DivergenceLog, Facts
    from .metrics import MemcgCollector
    from .pipeline import CheckPipeline
    from .watch import WatchList
    from .web import ListenError, WebConfigError, load_web_config, parse_listen, serve

    logging.basicConfig(level=logging.WARNING, format="memcgscope run: %(message)s")
    # validate everything cheap before loading BPF
    try:
        parse_listen(args.listen)
        web_config = load_web_config(args.web_config) if args.web_config else None
    except (ListenError, WebConfigError) as e:
        return _fail(str(e), 2)
    if args.max_cgroups < 0 or args.interval <= 0 or args.ringbuf_pages <= 0 or args.ringbuf_pages & (args.ringbuf_pages - 1):
        return _fail("--max-cgroups must be ≥ 0, --interval > 0, --ringbuf-pages a power of two", 2)
    if not 1 <= args.latency_sample <= 1 << 20:
        return _fail(f"--latency-sample {args.latency_sample}: give N from 1 (time every charge) to {1 << 20}", 2)
    if args.profile:
        try:
            resolve_profile("", override=args.profile)
        except ValueError as e:
            return _fail(f"--profile: {e}", 2)
    if args.ebpf:
        try:
            print_ebpf(Session(args.mode, memcg_state=args.memcg_state, ringbuf_pages=args.ringbuf_pages,
                               latency_sample=args.latency_sample, without=args.no_probe))
        except SessionError as e:
            return _fail(str(e))
        return 0
    if os.geteuid() != 0:
        return _fail("needs root (it loads BPF programs); run it as root, or 'memcgscope doctor' to see what works")
    try:
        hierarchy, resolver = resolver_for()
    except CgroupError as e:
        return _fail(str(e))

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    session = Session(args.mode, ringbuf_pages=args.ringbuf_pages, memcg_state=args.memcg_state,
                      latency_sample=args.latency_sample, without=args.no_probe)
    stats = bpf_stats_enabled()   # BPF run time per program, for memcgscope_bpf_run_seconds_total
    stats.__enter__()
    server = None
    divergence_log = None
    try:
        try:
            session.open()
        except SessionError as e:
            return _fail(str(e))
        report = session.report
        kernel = report.kernel
        try:
            resolution = resolution_for(report, args.profile)
        except ValueError as e:
            return _fail(f"kernel {kernel}: {e}")
        profile = resolution.profile.name
        if resolution.warning:
            print(f"memcgscope run: {resolution.warning}", file=sys.stderr)
        try:
            divergence_log = DivergenceLog(args.divergence_log or None)
        except OSError as e:
            return _fail(f"--divergence-log {args.divergence_log}: {e.strerror}; give a writable path or ''")
        cgroup = f"v{hierarchy.version}"
        pipeline = CheckPipeline(resolution.profile, cgroup, session.assembler.memsw, session.visibility(),
                                 ancestors=resolver.ancestors)
        watch = WatchList(resolver, globs=args.cgroup, max_cgroups=args.max_cgroups, grace=args.grace)
        daemon = Daemon(session, watch=watch, reader=CgroupfsReader(resolver.mountpoint, hierarchy.version),
                        pipeline=pipeline, divergence_log=divergence_log, interval=args.interval,
                        facts=Facts(version=__version__, kernel=kernel, upstream=resolution.upstream,
                                    profile=profile, profile_exact=resolution.exact,
                                    cgroup_version=hierarchy.version))
        registry = CollectorRegistry()
        registry.register(MemcgCollector(daemon))
        attached = [p for p in session.status() if p.attached]
        off = [p for p in session.status() if not p.attached]
        facts = {"mode": session.mode, "kernel": kernel, "model profile": f"{profile}: {resolution.reason}",
                 "cgroup": f"v{hierarchy.version} at {hierarchy.mountpoint}",
                 "probes attached": [f"{p.target} ({p.kind})" for p in attached],
                 "probes off": [f"{p.target}: {p.reason}" for p in off] or "none",
                 "watching": args.cgroup or "all cgroups", "divergence log": args.divergence_log or "off"}

        def health():
            if not session.is_open:
                return "probes are detached"
            return None

        try:
            server = serve(args.listen, registry, web_config, facts=facts, health=health, version=__version__)
        except ListenError as e:
            return _fail(str(e))
        print(f"memcgscope run: mode {session.mode} on {kernel} (model profile {profile}); "
              f"{len(attached)} probes attached: {', '.join(p.target for p in attached)}", file=sys.stderr)
        for p in off:
            print(f"memcgscope run: probe off: {p.target}: {p.reason}", file=sys.stderr)
        print(f"memcgscope run: serving {server.url}/metrics", file=sys.stderr, flush=True)
        daemon.run(stop)
        return 0
    finally:
        if server is not None:
            server.shutdown()
        session.close()
        if divergence_log is not None:
            divergence_log.close()
        stats.__exit__(None, None, None)
        for s, h in old_handlers.items():
            signal.signal(s, h)
