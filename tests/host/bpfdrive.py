"""Drive the BPF side's handlers (probes/memcgscope.bpf.c) on this host's
real verifier and JIT, without the functions they normally sit on.

Each handler gets a raw-tracepoint "driver" program; `Drive.call(name,
*args)` runs it with BPF_PROG_TEST_RUN in the calling thread, so
`bpf_get_current_pid_tgid()` is this test's thread and a sequence of calls
is a sequence of probe hits of one task. Memcg addresses are made-up
numbers: the reads behind them fail and give 0, which the handlers
tolerate; the maps are keyed by those numbers. Stack pointers are given
relative to this thread's kernel stack (`task->stack`), or `off_stack=True`
for another stack (an interrupt's).

This is how the state machine of the handlers (nesting, promotion,
stale contexts, map limits) is tested here, where kprobes and fentry
cannot attach (tests/vm covers the real attachments).
"""

from __future__ import annotations

import os
import struct

from memcgscope.probes.btf import BTF
from memcgscope.probes.bpfsys import prog_test_run
from memcgscope.probes.detect import bcc_kernel_source
from memcgscope.probes.program import COUNTED_MAPS, HIST_SLOTS, kernel_offsets, source_text
from memcgscope.probes.sysroot import SysRoot

DRIVERS = {
    # name: C body over ctx->args[] (a0..a5)
    "charge_enter": "on_charge_enter(ctx, a0, (u32)a1, (u32)a2, a4 ? a3 : stack_base() + a3);",
    "charge_exit": "on_charge_exit(ctx, (s64)a0);",
    "pc_enter": "on_pc_try_charge_enter(ctx, a0, a1, a2);",
    "pc_exit": "on_pc_try_charge_exit(ctx, a0);",
    "reclaim_enter": "on_reclaim_enter(ctx, a0, a1, (u32)a2, (u32)a3);",
    "reclaim_exit": "on_reclaim_exit(ctx, a0);",
    "page_exit": "on_page_charge_exit(ctx, (s64)a0);",
    "oom_enter": "on_oom_enter(ctx, a0, (u32)a1, (u32)a2);",
    "oom_exit": "on_oom_exit(ctx, a0);",
    "log2": "return log2l(a0);",
}


class Drive:
    def __init__(self, **defines):
        from bcc import BPF
        source = bcc_kernel_source(SysRoot("/"))
        if source:
            os.environ["BCC_KERNEL_SOURCE"] = source
        btf = BTF.from_file("/sys/kernel/btf/vmlinux")
        d = kernel_offsets(btf, memsw=False)
        d.update(RECLAIM_OPTS_MASK="0xffffffff", MAX_CGROUPS=64, RINGBUF_PAGES=16, HIST_SLOTS=HIST_SLOTS, NR_MAPIDX=len(COUNTED_MAPS),
                 HOT_EVENT_ITEM=-1, HOT_EVENT_ITEM2=-1, FIRST_MEMCG_STAT_ITEM=0)
        for i, name in enumerate(COUNTED_MAPS):
            d[f"MAPIDX_{name.upper()}"] = i
        d.update(defines)
        text = source_text() + "\nstatic __always_inline u64 stack_base(void) {\n" \
            "    return read_u64(bpf_get_current_task() + OFF_TASK_STACK);\n}\n"
        for name, body in DRIVERS.items():
            args = "".join(f"    u64 a{i} = ctx->args[{i}];\n" for i in range(6))
            ret = "" if body.startswith("return") else "\n    return 0;"
            text += f"int drv_{name}(struct bpf_raw_tracepoint_args *ctx) {{\n{args}    {body}{ret}\n}}\n"
        cflags = [f"-D{k}={v}" for k, v in d.items()] + ["-Wno-macro-redefined", "-Wno-unused-function",
                                                           "-Wno-unused-variable"]
        self.bpf = BPF(text=text, cflags=cflags)
        self.fds = {name: self.bpf.load_func(f"drv_{name}", BPF.RAW_TRACEPOINT).fd for name in DRIVERS}
        self.events: list[bytes] = []
        self.bpf["events"].open_ring_buffer(lambda ctx, data, size: self.events.append(
            bytes((ctypes_string_at(data, size)))) or 0)

    def call(self, name: str, *args: int) -> int:
        vals = [a & (1 << 64) - 1 for a in args] + [0] * (6 - len(args))
        return prog_test_run(self.fds[name], struct.pack("<6Q", *vals))

    def charge_stats(self, memcg: int) -> dict:
        t = self.bpf["charge_stats"]
        for k, per_cpu in t.items():
            if int(k.value) == memcg:
                return {f: sum(int(getattr(v, f)) for v in per_cpu)
                        for f in ("calls", "pages", "slow", "fail_enomem")}
        return {"calls": 0, "pages": 0, "slow": 0, "fail_enomem": 0}

    def stats(self, table: str, memcg: int) -> dict:
        """A per-CPU charge_stat map's fields for ``memcg``, summed."""
        fields = ("calls", "pages", "slow", "fail_enomem", "fail_eintr", "fail_other", "ns")
        for k, per_cpu in self.bpf[table].items():
            if int(k.value) == memcg:
                return {f: sum(int(getattr(v, f)) for v in per_cpu) for f in fields}
        return dict.fromkeys(fields, 0)

    def latency(self, memcg: int) -> int:
        """The charge latency histogram's total weight for ``memcg``."""
        return sum(sum(int(v) for v in per_cpu) for k, per_cpu in self.bpf["charge_lat"].items()
                   if int(k.memcg) == memcg)

    def per_cpu_sum(self, table: str, index: int = 0) -> int:
        import ctypes
        return sum(int(v) for v in self.bpf[table][ctypes.c_int(index)])

    def map_full(self, name: str) -> int:
        return self.per_cpu_sum("map_full", COUNTED_MAPS.index(name))

    def poll(self) -> list[bytes]:
        self.bpf.ring_buffer_consume()
        out, self.events = self.events, []
        return out

    def close(self) -> None:
        self.bpf.cleanup()


def ctypes_string_at(ptr, size):
    import ctypes
    return ctypes.string_at(ptr, size)
