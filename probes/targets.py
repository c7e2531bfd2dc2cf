"""What memcgscope probes: kernel functions and tracepoints, by role.

Names and versions: docs/kernel-facts.md §4. A role lists alternative
names, newest first; the first one the running kernel has is used.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FunctionTarget", "FUNCTIONS", "TRACEPOINTS", "TracepointTarget"]


@dataclass(frozen=True)
class FunctionTarget:
    role: str
    names: tuple[str, ...]
    why: str
    # The charge core decides whether the kprobe/fentry modes are worth it.
    essential: bool = False


FUNCTIONS: tuple[FunctionTarget, ...] = (
    FunctionTarget("charge_core", ("try_charge_memcg", "try_charge"),
                   "the charge core: every charge's slow path", essential=True),
    FunctionTarget("page_charge", ("__mem_cgroup_charge", "mem_cgroup_charge"),
                   "page/folio charge at fault time"),
    FunctionTarget("charge_memcg", ("charge_memcg",),
                   "page charge after the memcg is known (often inlined)"),
    FunctionTarget("memcg_reclaim", ("try_to_free_mem_cgroup_pages",),
                   "memcg reclaim: target, pages asked, pages freed"),
    FunctionTarget("resize_max", ("mem_cgroup_resize_max",),
                   "v1 limit writes (absent without CONFIG_MEMCG_V1)"),
    FunctionTarget("memory_max_write", ("memory_max_write",), "v2 memory.max writes"),
    FunctionTarget("memory_high_write", ("memory_high_write",), "v2 memory.high writes"),
    FunctionTarget("memcg_oom", ("mem_cgroup_out_of_memory",), "memcg OOM decisions"),
    FunctionTarget("drain_all_stock", ("drain_all_stock",), "per-cpu stock drains"),
    # 6.18 renamed it __mem_cgroup_handle_over_high (an inline wrapper calls it
    # only when pages are owed); 5.10 takes no argument, 6.1-6.12 a gfp
    FunctionTarget("handle_over_high", ("__mem_cgroup_handle_over_high", "mem_cgroup_handle_over_high"),
                   "memory.high throttling: the reclaim and penalty sleep of a task over memory.high"),
    FunctionTarget("high_sleep", ("schedule_timeout_killable",),
                   "the penalty (jiffies) the memory.high handler sleeps; ignored elsewhere"),
    FunctionTarget("page_counter_try_charge", ("page_counter_try_charge",),
                   "counter failures (which level failed)"),
)


@dataclass(frozen=True)
class TracepointTarget:
    category: str
    name: str
    why: str
    # Tracepoint mode needs these; the others add detail where they exist.
    required_for_tracepoint_mode: bool = False

    @property
    def full_name(self) -> str:
        return f"{self.category}:{self.name}"


TRACEPOINTS: tuple[TracepointTarget, ...] = (
    TracepointTarget("vmscan", "mm_vmscan_memcg_reclaim_begin", "memcg reclaim start", True),
    TracepointTarget("vmscan", "mm_vmscan_memcg_reclaim_end", "memcg reclaim result", True),
    TracepointTarget("vmscan", "mm_vmscan_memcg_softlimit_reclaim_begin", "v1 soft-limit reclaim"),
    TracepointTarget("vmscan", "mm_vmscan_memcg_softlimit_reclaim_end", "v1 soft-limit reclaim"),
    TracepointTarget("oom", "mark_victim", "OOM kills"),
    TracepointTarget("memcg", "count_memcg_events", "memcg events per cgroup id (6.13+)"),
    TracepointTarget("memcg", "mod_memcg_state", "memcg state changes per cgroup id (6.13+)"),
    TracepointTarget("memcg", "mod_memcg_lruvec_state", "lruvec state per cgroup id (6.13+)"),
    TracepointTarget("memcg", "memcg_flush_stats", "stat flushes (6.13+)"),
)
