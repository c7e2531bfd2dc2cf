"""Builds the BPF program for one mode on the running kernel.

The C in memcgscope.bpf.c holds mode-independent handlers. This module
appends the wrappers for the chosen mode, one per probed function that the
kernel has, and computes the -D flags: struct field offsets read from the
kernel's BTF, the memory controller's subsystem id, and whether v1 swap
accounting (memsw) is on. A role whose function is missing turns that one
probe off, with the reason; the rest are built.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from .btf import BTF, BTFError
from .detect import Report
from .episodes import c_definitions
from .targets import TRACEPOINTS

__all__ = ["ProbeStatus", "Program", "build_program", "kernel_offsets", "ROLE_HANDLERS", "ProgramError",
           "HIST_SLOTS", "source_text", "fentry_arg_reads", "optional_probes", "check_without",
           "OPTIONAL_PROBES"]

SOURCE = os.path.join(os.path.dirname(__file__), "memcgscope.bpf.c")
LAYOUT_MARK = "// @EVENT_LAYOUT@"
#: log2 latency slots per histogram: slot s holds [2^s, 2^(s+1)) ns and the
#: last one everything above (2^39 ns is 9 minutes). Every Prometheus bucket
#: bound must lie below the last slot, or the clamp would count values above
#: a bound under it (collector/metrics.py checks this at import).
HIST_SLOTS = 40
#: maps whose full-drops the BPF side counts (map_full[MAPIDX_<NAME>]); the
#: metric memcgscope_map_full_drops_total{map} names them
COUNTED_MAPS = ("tasks", "charge_stats", "charge_lat", "page_charge_stats", "reclaim_stats",
                "reclaim_lat", "limit_stats", "oom_stats", "counter_fails", "memcg_events", "memcg_state",
                "high_stats", "high_lat")


def fentry_arg_reads(btf) -> str:
    """How fentry programs read arguments on this kernel: "helper"
    (bpf_get_func_arg, Linux 5.17+: enum bpf_func_id has it) or "frame"
    (bpf_probe_read_kernel of the trampoline's saved arguments)."""
    return "helper" if btf.enum_value("BPF_FUNC_get_func_arg") is not None else "frame"


def source_text() -> str:
    """memcgscope.bpf.c with the event layout of probes/episodes.py in place."""
    with open(SOURCE) as f:
        text = f.read()
    if LAYOUT_MARK not in text:
        raise ProgramError(f"{SOURCE}: no '{LAYOUT_MARK}' line; the event layout has nowhere to go")
    return text.replace(LAYOUT_MARK, c_definitions(), 1)


class ProgramError(Exception):
    pass


@dataclass
class ProbeStatus:
    role: str
    target: str          # kernel function or category:tracepoint
    kind: str            # fentry | kprobe | fentry+kprobe (clones kprobed) | tracepoint
    attached: bool
    reason: str = ""


@dataclass
class RoleHandler:
    """How a probed function's arguments reach the handlers. A0..A4 are the
    function's arguments as u64, RET its return value."""
    enter: str | None   # None: an exit-only probe
    exit: str | None
    # the fixed arguments a suffixed clone (.isra/.constprop) may not keep
    needs_args: bool = True


ROLE_HANDLERS: dict[str, RoleHandler] = {
    "charge_core": RoleHandler("on_charge_enter(ctx, A0, (u32)A1, (u32)A2, STACKPTR)",
                               "on_charge_exit(ctx, (s64)(int)RET)"),
    # exit only: its memcg, size and gfp are the charge core's (see the C)
    "page_charge": RoleHandler(None, "on_page_charge_exit(ctx, (s64)(int)RET)"),
    # A3: 5.10's bool may_swap or the reclaim_options bits of 6.1+; a bool's
    # register may carry garbage above bit 7 (seen on 5.10.262: 0x91400001)
    "memcg_reclaim": RoleHandler("on_reclaim_enter(ctx, A0, A1, (u32)A2, (u32)(A3 & RECLAIM_OPTS_MASK))",
                                 "on_reclaim_exit(ctx, RET)"),
    "resize_max": RoleHandler("on_limit_enter(ctx, LIMIT_RESIZE_MAX, A0, memcg_cgid(A0), A1, (u32)(A2 & 0xff), 0)",
                              "on_limit_exit(ctx, (s64)(int)RET)"),
    "memory_max_write": RoleHandler(
        "on_limit_enter(ctx, LIMIT_MEMORY_MAX, 0, of_cgroup_id(A0), A2, 0, (const char *)A1)",
        "on_limit_exit(ctx, (s64)RET)"),
    "memory_high_write": RoleHandler(
        "on_limit_enter(ctx, LIMIT_MEMORY_HIGH, 0, of_cgroup_id(A0), A2, 0, (const char *)A1)",
        "on_limit_exit(ctx, (s64)RET)"),
    "memcg_oom": RoleHandler("on_oom_enter(ctx, A0, (u32)A1, (u32)A2)", "on_oom_exit(ctx, RET)"),
    "drain_all_stock": RoleHandler("on_drain(ctx, A0, ARGS_VALID)", None, needs_args=False),
    "handle_over_high": RoleHandler("on_high_enter(ctx)", "on_high_exit(ctx)"),
    "high_sleep": RoleHandler("on_high_sleep(ctx, A0)", None),
    "page_counter_try_charge": RoleHandler("on_pc_try_charge_enter(ctx, A0, A1, A2)",
                                           "on_pc_try_charge_exit(ctx, RET)"),
}

# Tracepoint handlers: (category, name) -> body using `args`
TRACEPOINT_HANDLERS = {
    # kernels whose mark_victim does not hand over the task (see RAW_VICTIM)
    ("oom", "mark_victim"): "on_mark_victim(args, args->pid, 0);",
    ("vmscan", "mm_vmscan_memcg_reclaim_begin"): "on_tp_reclaim_begin(args, args->gfp_flags);",
    ("vmscan", "mm_vmscan_memcg_reclaim_end"): "on_tp_reclaim_end(args, args->nr_reclaimed);",
    # These fire on every page fault; the filters (-D flags, from BTF) keep
    # the per-fault cost to a program run and a compare (bench_probes.py).
}
# The memcg:* tracepoints fire on every page fault: they are attached as raw
# tracepoints (arguments straight from TP_PROTO(struct mem_cgroup *memcg,
# int item, val), no trace record built), and the filters (-D flags, enum
# values from BTF) keep a fault's cost to a program run and a compare
# (bench_probes.py measures it).
RAW_TRACEPOINT_HANDLERS = {
    ("memcg", "count_memcg_events"):
        "int item = (int)ctx->args[1];\n"
        "    if (item == HOT_EVENT_ITEM || item == HOT_EVENT_ITEM2) return 0;\n"
        "    item_add(0, memcg_cgid(ctx->args[0]), item, (s64)ctx->args[2]);",
    ("memcg", "mod_memcg_state"):
        "int item = (int)ctx->args[1];\n"
        "    if (item < FIRST_MEMCG_STAT_ITEM) return 0;\n"
        "    item_add(1, memcg_cgid(ctx->args[0]), item, (s64)(int)ctx->args[2]);",
    # node_stat_item space, kept apart from memcg_stat_item by bit 16
    ("memcg", "mod_memcg_lruvec_state"):
        "item_add(1, memcg_cgid(ctx->args[0]), (int)ctx->args[1] | 0x10000, (s64)(int)ctx->args[2]);",
}
# oom:mark_victim as a raw tracepoint where its prototype takes the victim's
# task (5.10.262, 6.1, 6.12, 7.x: trace_mark_victim(tsk, cred->uid.val) in
# mm/oom_kill.c mark_oom_victim): then the victim's memcg and comm are read
RAW_VICTIM = "on_mark_victim(ctx, 0, ctx->args[0]);"
# LRU and node statistics change several times per page fault: only with
# memcg_state=True (--memcg-state), at a cost bench_probes.py measures.
OPT_IN_TRACEPOINTS = {("memcg", "mod_memcg_lruvec_state")}
# In fentry/kprobe modes try_to_free_mem_cgroup_pages is probed directly.
TRACEPOINT_ONLY = {("vmscan", "mm_vmscan_memcg_reclaim_begin"), ("vmscan", "mm_vmscan_memcg_reclaim_end")}


@dataclass
class Program:
    mode: str
    text: str
    cflags: list[str]
    probes: list[ProbeStatus]
    # kprobe mode: (kernel symbol, bpf function, is_return)
    kprobes: list[tuple[str, str, bool]] = field(default_factory=list)


def _offset(btf: BTF, struct_name: str, *paths: str) -> int:
    errors = []
    for path in paths:
        try:
            return btf.offsetof(struct_name, path)
        except BTFError as e:
            errors.append(str(e))
    raise ProgramError(f"{'; '.join(errors)}; memcgscope cannot read this kernel's {struct_name}")


def kernel_offsets(btf: BTF, memsw: bool) -> dict[str, int]:
    """The -D values the C needs, from the running kernel's BTF."""
    memory_cgrp_id = btf.enum_value("memory_cgrp_id")
    if memory_cgrp_id is None:
        raise ProgramError("BTF has no memory_cgrp_id: the kernel is built without CONFIG_MEMCG")
    offsets = {
        "OFF_MEMCG_CSS_CGROUP": _offset(btf, "mem_cgroup", "css.cgroup"),
        "OFF_CGROUP_KN": _offset(btf, "cgroup", "kn"),
        "OFF_KN_ID": _offset(btf, "kernfs_node", "id"),
        # renamed __parent (RCU-annotated) in v6.15: include/linux/kernfs.h struct
        # kernfs_node, commit "kernfs: Use RCU to access kernfs_node::parent."
        "OFF_KN_PARENT": _offset(btf, "kernfs_node", "parent", "__parent"),
        "OFF_OF_KN": _offset(btf, "kernfs_open_file", "kn"),
        "OFF_MEMCG_MEMORY": _offset(btf, "mem_cgroup", "memory"),
        # v1's memsw shares a union with v2's swap counter
        "OFF_MEMCG_MEMSW": _offset(btf, "mem_cgroup", "memsw", "swap"),
        "OFF_PC_USAGE": _offset(btf, "page_counter", "usage"),
        "OFF_PC_MAX": _offset(btf, "page_counter", "max"),
        "OFF_PC_HIGH": _offset(btf, "page_counter", "high"),
        # unsigned int memcg_nr_pages_over_high (include/linux/sched.h, CONFIG_MEMCG)
        "OFF_TASK_OVER_HIGH": _offset(btf, "task_struct", "memcg_nr_pages_over_high"),
        "OFF_TASK_CGROUPS": _offset(btf, "task_struct", "cgroups"),
        "OFF_TASK_STACK": _offset(btf, "task_struct", "stack"),
        "OFF_TASK_PID": _offset(btf, "task_struct", "pid"),
        "OFF_TASK_COMM": _offset(btf, "task_struct", "comm"),
        "OFF_CSS_SET_SUBSYS": _offset(btf, "css_set", "subsys"),
        "MEMORY_CGRP_ID": memory_cgrp_id,
    }
    if _offset(btf, "mem_cgroup", "css") != 0:
        raise ProgramError("struct mem_cgroup does not start with its css on this kernel; task_memcg() would be wrong")
    if memsw:
        offsets["HAVE_MEMSW"] = 1
    return offsets


def _subst(call: str, nargs: int, args_valid: bool, sp: str = "0") -> str:
    """A handler call with the wrapper's names: A0..A4 the arguments, RET the
    return value, STACKPTR the stack pointer at entry (kprobe: the probed
    function's; fentry: the trampoline's frame, on the same stack)."""
    for i in range(5):
        call = call.replace(f"A{i}", f"a{i}" if i < nargs else "0")
    return call.replace("RET", "ret").replace("ARGS_VALID", "1" if args_valid else "0").replace("STACKPTR", sp)


def _raw_takes_task(btf, name: str) -> bool:
    """The raw tracepoint's first argument is a pointer (btf_trace_<name>'s
    prototype, after its void *), i.e. the tracepoint hands over a task."""
    params = getattr(btf, "raw_tracepoint_params", lambda n: None)(name)
    return bool(params) and params[0] == "ptr"


def _kprobe_probe(parts, kprobes, finding, handler, symbol: str, clone: bool, *, kind: str = "kprobe",
                  reason: str = "") -> ProbeStatus:
    """kprobe/kretprobe wrappers for one role; an entry-only probe sits on
    every compiler clone as well (callers may jump straight to one: 6.12
    calls drain_all_stock.part.0 directly)."""
    args = "".join(f"    u64 a{i} = PT_REGS_PARM{i + 1}(ctx);\n" for i in range(5))
    if handler.enter is not None:
        fn = f"kp_{finding.role}_enter"
        parts.append(f"int {fn}(struct pt_regs *ctx) {{\n{args}"
                     f"    {_subst(handler.enter, 5, not clone, 'PT_REGS_SP(ctx)')};\n    return 0;\n}}\n")
        kprobes.append((symbol, fn, False))
    if not handler.needs_args and handler.enter is not None:
        _kprobe_clones(parts, kprobes, finding, handler, [s for s in finding.symbols if s != symbol])
    if handler.exit:
        fn_ret = f"kp_{finding.role}_exit"
        parts.append(f"int {fn_ret}(struct pt_regs *ctx) {{\n    u64 ret = PT_REGS_RC(ctx);\n"
                     f"    {_subst(handler.exit, 0, True)};\n    return 0;\n}}\n")
        kprobes.append((symbol, fn_ret, True))
    return ProbeStatus(finding.role, symbol, kind, True, reason)


def _kprobe_clones(parts, kprobes, finding, handler, clones) -> None:
    args = "".join(f"    u64 a{i} = PT_REGS_PARM{i + 1}(ctx);\n" for i in range(5))
    for n, other in enumerate(clones):
        fn_clone = f"kp_{finding.role}_enter{n}"
        parts.append(f"int {fn_clone}(struct pt_regs *ctx) {{\n{args}"
                     f"    {_subst(handler.enter, 5, False)};\n    return 0;\n}}\n")
        kprobes.append((other, fn_clone, False))


def _fentry_probe(parts, kprobes, finding, handler, btf, fentry_check, kprobes_ok: bool,
                  arg_reads: str) -> ProbeStatus:
    """fentry/fexit wrappers for one role; where fentry cannot attach (a
    compiler clone has no BTF entry; the attach is refused) the role is
    kprobed instead when kprobes work, so every mode sees what kprobe sees."""
    symbol = finding.symbol
    base = symbol.split(".", 1)[0]
    clone = symbol != base
    nargs = btf.func_param_count(base)
    why = None
    if nargs is None or clone:
        why = f"no BTF entry for {symbol} (fentry needs one)"
    elif fentry_check is not None:
        ok, reason = fentry_check(btf.func_id(base))
        if not ok:
            why = reason
    if why is not None:
        if kprobes_ok:
            return _kprobe_probe(parts, kprobes, finding, handler, symbol, clone,
                                 reason=f"kprobe instead of fentry: {why}")
        return ProbeStatus(finding.role, symbol, "fentry", False, why)
    # Arguments through bpf_get_func_arg where the kernel has it (5.17+):
    # typed context reads are refused for some types (6.1: "arg2 type PTR
    # is not a struct" for page_counter_try_charge's struct page_counter
    # **fail); before 5.17 they are read from the trampoline's frame.
    reads = "".join(f"    u64 a{i} = 0;\n    MCS_ARG(ctx, {i}, &a{i});\n" for i in range(nargs))
    # No stack pointer for the stale-context check: the verifier refuses
    # arithmetic on the ctx pointer, and fexit, unlike a kretprobe, has no
    # instance limit that could make it miss a return.
    if handler.enter is not None:
        parts.append(f"KFUNC_PROBE({base}) {{\n{reads}"
                     f"    {_subst(handler.enter, nargs, True, '0')};\n    return 0;\n}}\n")
    if handler.exit:
        parts.append(f"KRETFUNC_PROBE({base}) {{\n    u64 ret = 0;\n    MCS_RET(ctx, {nargs}, &ret);\n"
                     f"    {_subst(handler.exit, nargs, True)};\n    return 0;\n}}\n")
    others = [n for n in finding.symbols if n != base]
    if not others:
        return ProbeStatus(finding.role, base, "fentry", True)
    if kprobes_ok and not handler.needs_args:
        # clones have no BTF entry: their entries are kprobed (a mixed probe)
        _kprobe_clones(parts, kprobes, finding, handler, others)
        return ProbeStatus(finding.role, base, "fentry+kprobe", True)
    return ProbeStatus(finding.role, base, "fentry", True,
                       f"calls that go straight to {', '.join(others)} are not seen (no BTF for clones)")


#: the probes ``without`` (``--no-probe``) can leave out, by the names doctor
#: and ``--ebpf`` list them under, and what goes with each.  Only these: the
#: episodes' steps (counter failures, reclaim, OOM, kills) are what the
#: model is checked against, so their probes stay.
OPTIONAL_PROBES = {
    "page_charge": "memcgscope_page_charges*, page_charge_fail episodes and their check; "
                   "runs on every faulted page",
    "count_memcg_events": "memcgscope_memcg_events (6.13+); runs on every faulted page",
    "mod_memcg_state": "memcgscope_memcg_state_updates (6.13+)",
}


def optional_probes() -> tuple[str, ...]:
    return tuple(OPTIONAL_PROBES)


def check_without(without) -> frozenset:
    """``without`` as a set of probe names, or ProgramError naming the
    first one that is not an optional probe."""
    names = optional_probes()
    for name in without:
        if name == "charge_core":
            raise ProgramError("--no-probe charge_core: the charge core is what fentry and kprobe mode "
                               "are for; use --mode tracepoint to probe without it")
        if name not in names:
            raise ProgramError(f"--no-probe {name}: not a probe that can be left out; give one of "
                               f"{', '.join(names)} (the others make the episodes the model is checked against)")
    return frozenset(without)


#: why a probe left out by ``without`` is off, in its ProbeStatus
_OFF = "left out by --no-probe"


def build_program(report: Report, mode: str, btf: BTF, *, max_cgroups: int = 4096,
                  ringbuf_pages: int = 256, use_perf_buffer: bool = False,
                  fentry_check=None, memcg_state: bool = False, latency_sample: int = 64,
                  without=()) -> Program:
    """The program text, flags and probe list for `mode` on the kernel
    described by `report`. `fentry_check(btf_id)` -> (ok, reason) tests one
    fentry attach (probes/bpfsys.try_fentry on a live kernel).
    `latency_sample`: 1 in N fast charges is timed (1: every one).
    `without`: probes left out (``optional_probes()``; each one a program
    run less where it fires: the page charge and count_memcg_events fire
    on every faulted page)."""
    if mode not in ("fentry", "kprobe", "tracepoint"):
        raise ProgramError(f"unknown mode {mode!r}; use fentry, kprobe or tracepoint")
    without = check_without(without)
    if isinstance(latency_sample, bool) or not isinstance(latency_sample, int) or not 1 <= latency_sample <= 1 << 20:
        raise ProgramError(f"latency sample {latency_sample!r}: give an integer from 1 (time every charge) "
                           f"to {1 << 20}")
    memsw = bool(report.cgroups.v1_memory and report.cgroups.swap_accounting)
    defines = kernel_offsets(btf, memsw)
    # enum values differ between builds: take them from this kernel's BTF
    # PGFAULT and PGPGIN are counted once per faulted page; with
    # --memcg-state they are kept (at the cost bench_probes.py shows)
    for macro, item in (("HOT_EVENT_ITEM", "PGFAULT"), ("HOT_EVENT_ITEM2", "PGPGIN")):
        value = btf.enum_value(item)
        defines[macro] = value if value is not None and not memcg_state else -1
    first_memcg_item = btf.enum_value("NR_VM_NODE_STAT_ITEMS")
    defines["FIRST_MEMCG_STAT_ITEM"] = first_memcg_item if first_memcg_item is not None else 0
    size = getattr(btf, "func_param_size", lambda *a: None)("try_to_free_mem_cgroup_pages", 3)
    defines["RECLAIM_OPTS_MASK"] = hex((1 << 8 * size) - 1) if size and size < 4 else "0xffffffff"
    defines["MAX_CGROUPS"] = max_cgroups
    defines["HIST_SLOTS"] = HIST_SLOTS
    for i, name in enumerate(COUNTED_MAPS):
        defines[f"MAPIDX_{name.upper()}"] = i
    defines["NR_MAPIDX"] = len(COUNTED_MAPS)
    defines["RINGBUF_PAGES"] = ringbuf_pages
    defines["LAT_SAMPLE"] = latency_sample
    if use_perf_buffer:
        defines["USE_PERF_BUFFER"] = 1
    arg_reads = fentry_arg_reads(btf)
    if arg_reads == "helper":
        defines["HAVE_GET_FUNC_ARG"] = 1
    cflags = [f"-D{k}={v}" for k, v in defines.items()] + ["-Wno-macro-redefined", "-Wno-unused-function"]

    text = source_text()
    parts = [text, "\n// ---- wrappers for mode: " + mode + " ----\n"]
    probes: list[ProbeStatus] = []
    kprobes: list[tuple[str, str, bool]] = []

    if mode in ("fentry", "kprobe"):
        kprobes_ok = report.checks["kprobes"].ok if "kprobes" in report.checks else mode == "kprobe"
        for finding in report.functions:
            handler = ROLE_HANDLERS.get(finding.role)
            if handler is None:
                continue  # reported by doctor, not probed
            if finding.role in without:
                probes.append(ProbeStatus(finding.role, finding.symbol or "/".join(finding.names), mode, False,
                                          f"{_OFF} {finding.role}"))
                continue
            if not finding.present:
                probes.append(ProbeStatus(finding.role, "/".join(finding.names), mode, False,
                                          "not in /proc/kallsyms (inlined or not built)"))
                continue
            if finding.probeable is False:
                probes.append(ProbeStatus(finding.role, finding.symbol, mode, False,
                                          "not in available_filter_functions (notrace or inlined)"))
                continue
            symbol = finding.symbol
            base = symbol.split(".", 1)[0]
            clone = symbol != base
            if clone and handler.needs_args:
                probes.append(ProbeStatus(finding.role, symbol, mode, False,
                                          f"only the compiler clone {symbol} exists; its arguments may differ"))
                continue
            if mode == "fentry":
                status = _fentry_probe(parts, kprobes, finding, handler, btf, fentry_check, kprobes_ok, arg_reads)
            else:
                status = _kprobe_probe(parts, kprobes, finding, handler, symbol, clone)
            probes.append(status)

    for tp in TRACEPOINTS:
        key = (tp.category, tp.name)
        body = TRACEPOINT_HANDLERS.get(key)
        raw_body = RAW_TRACEPOINT_HANDLERS.get(key)
        if body is None and raw_body is None:
            continue
        if key in TRACEPOINT_ONLY and mode != "tracepoint":
            continue
        if tp.name in without:
            probes.append(ProbeStatus(tp.name, tp.full_name, "tracepoint", False, f"{_OFF} {tp.name}"))
            continue
        if key in OPT_IN_TRACEPOINTS and not memcg_state:
            probes.append(ProbeStatus(tp.name, tp.full_name, "tracepoint", False,
                                      "off by default (fires per page); --memcg-state turns it on"))
            continue
        if not report.tracepoints.get(tp.full_name):
            probes.append(ProbeStatus(tp.name, tp.full_name, "tracepoint", False, "tracepoint absent on this kernel"))
            continue
        if key == ("oom", "mark_victim") and _raw_takes_task(btf, tp.name):
            raw_body = RAW_VICTIM
        if raw_body is not None:
            parts.append(f"RAW_TRACEPOINT_PROBE({tp.name}) {{\n    {raw_body}\n    return 0;\n}}\n")
        else:
            parts.append(f"TRACEPOINT_PROBE({tp.category}, {tp.name}) {{\n    {body}\n    return 0;\n}}\n")
        probes.append(ProbeStatus(tp.name, tp.full_name, "tracepoint", True))

    if mode == "tracepoint":
        if not any(p.attached and p.target.startswith("vmscan:") for p in probes):
            raise ProgramError("tracepoint mode needs vmscan:mm_vmscan_memcg_reclaim_begin/end; "
                               "mount tracefs (memcgscope doctor says why)")
    elif not any(p.attached and p.role == "charge_core" for p in probes):
        why = next((p.reason for p in probes if p.role == "charge_core"), "missing")
        raise ProgramError(f"{mode} mode cannot probe the charge core ({why}); try --mode tracepoint")
    return Program(mode, "".join(parts), cflags, probes, kprobes)
