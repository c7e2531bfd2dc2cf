"""Prometheus metrics, built at scrape time.

`MemcgCollector.collect()` reads the in-kernel BPF maps (through the probe
session's lock), copies of the daemon's and the check pipeline's counters
and the cgroupfs snapshot the daemon published at its last tick, and
builds fresh metric families: no second copy of the kernel's counters is
kept, and a scrape changes no state. Cgroup ids become labels through the
published id -> label map (the watch list; --cgroup and --max-cgroups
applied there); series mapped to the same label ("other") are summed.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from memcgscope.probes.program import HIST_SLOTS

__all__ = ["MemcgCollector", "log2_histogram", "ERRNO_NAMES", "BUCKET_BOUND_EXPONENTS"]

ERRNO_NAMES = {0: "ok", -1: "EPERM", -4: "EINTR", -12: "ENOMEM", -16: "EBUSY", -22: "EINVAL", -11: "EAGAIN",
               -28: "ENOSPC", -13: "EACCES"}


# Bucket bounds: every other power of two from ~1 µs to ~17 s, so a
# histogram series costs 13 buckets, not the kernel's log2 slots.
BUCKET_BOUND_EXPONENTS = tuple(range(10, 35, 2))
# The BPF side clamps durations into its last slot: a bound at or above it
# would count values above the bound under it.
if max(BUCKET_BOUND_EXPONENTS) >= HIST_SLOTS - 1:
    raise ImportError(f"histogram bound 2^{max(BUCKET_BOUND_EXPONENTS)} ns is not below the BPF side's "
                      f"last log2 slot ({HIST_SLOTS - 1}); raise probes.program.HIST_SLOTS")


def log2_histogram(slots: dict[int, int], scale: float = 1e-9) -> list[tuple[str, float]]:
    """Cumulative Prometheus buckets from the BPF side's log2 slots: slot s
    holds values in [2^s, 2^(s+1)) ns, so it lies under the bound 2^e for
    every e > s. Exact at every bound (bounds are slot edges)."""
    buckets = []
    for e in BUCKET_BOUND_EXPONENTS:
        buckets.append((f"{(2 ** e) * scale:.9g}", sum(n for s, n in slots.items() if s < e)))
    buckets.append(("+Inf", sum(slots.values())))
    return buckets


def errno_name(ret: int) -> str:
    return ERRNO_NAMES.get(ret, f"E{-ret}" if ret < 0 else "ok")


class MemcgCollector:
    """Everything memcgscope exports, read from `daemon` at scrape time."""

    def __init__(self, daemon):
        self.d = daemon

    def describe(self):
        return []  # families are dynamic; registering must not trigger a scrape

    def collect(self):
        d = self.d
        yield from self._kernel_maps(d)
        yield from self._episodes(d)
        yield from self._cgroupfs(d)
        yield from self._self(d)

    # --- the BPF maps -----------------------------------------------------

    def _kernel_maps(self, d):
        charges = CounterMetricFamily("memcgscope_charges", "Calls of the charge core (try_charge_memcg) per memcg.",
                                      labels=["cgroup"])
        pages = CounterMetricFamily("memcgscope_charged_pages", "Pages asked by the charge core.", labels=["cgroup"])
        failures = CounterMetricFamily("memcgscope_charge_failures", "Charge core calls that returned an error.",
                                       labels=["cgroup", "errno"])
        slow = CounterMetricFamily("memcgscope_charge_slow_paths",
                                   "Charges that failed a counter and reclaimed, drained, OOMed or failed.",
                                   labels=["cgroup"])
        latency = HistogramMetricFamily("memcgscope_charge_latency_seconds",
                                        "Time in the charge core: slow charges all, fast ones sampled 1 in N "
                                        "(run --latency-sample), each sample counted N times.", labels=["cgroup"])
        page_charges = CounterMetricFamily("memcgscope_page_charges", "Page/folio charges (__mem_cgroup_charge).",
                                           labels=["cgroup"])
        page_failures = CounterMetricFamily("memcgscope_page_charge_failures", "Page charges that failed.",
                                            labels=["cgroup", "errno"])
        reclaim_calls = CounterMetricFamily("memcgscope_reclaim_calls",
                                            "try_to_free_mem_cgroup_pages calls (tracepoint mode: memcg reclaims).",
                                            labels=["cgroup", "caller"])
        reclaim_asked = CounterMetricFamily("memcgscope_reclaim_requested_pages", "Pages reclaim was asked for.",
                                            labels=["cgroup", "caller"])
        reclaimed = CounterMetricFamily("memcgscope_reclaimed_pages", "Pages memcg reclaim freed.",
                                        labels=["cgroup", "caller"])
        reclaim_latency = HistogramMetricFamily("memcgscope_reclaim_duration_seconds", "Time in memcg reclaim.",
                                                labels=["cgroup", "caller"])
        limit_writes = CounterMetricFamily("memcgscope_limit_writes", "Limit writes by control file and result.",
                                           labels=["cgroup", "file", "result"])
        oom_calls = CounterMetricFamily("memcgscope_oom_invocations",
                                        "mem_cgroup_out_of_memory calls, by whether they returned true.",
                                        labels=["cgroup", "result"])
        oom_kills = CounterMetricFamily("memcgscope_oom_kills",
                                        "OOM kills by the memcg whose OOM ran (the trigger; oom:mark_victim).",
                                        labels=["cgroup"])
        oom_victims = CounterMetricFamily("memcgscope_oom_victims",
                                          "OOM kills by the victim's own memcg (where the kernel hands the "
                                          "victim's task to oom:mark_victim).", labels=["cgroup"])
        high_calls = CounterMetricFamily("memcgscope_high_handler_calls",
                                         "Calls of the memory.high handler (mem_cgroup_handle_over_high) for a "
                                         "task that owed pages, by its memcg.", labels=["cgroup"])
        high_sleep = CounterMetricFamily("memcgscope_high_throttled_seconds",
                                         "Time tasks slept as memory.high's penalty (the handler's time minus "
                                         "its reclaim), by memcg.", labels=["cgroup"])
        high_latency = HistogramMetricFamily("memcgscope_high_throttle_seconds",
                                             "memory.high penalty sleeps, one per throttled return to user space.",
                                             labels=["cgroup"])
        counter_failures = CounterMetricFamily("memcgscope_counter_failures",
                                               "page_counter_try_charge failures in a charge, at the failing level.",
                                               labels=["cgroup", "counter"])
        memcg_events = CounterMetricFamily("memcgscope_memcg_events",
                                           "Sum of memcg:count_memcg_events values by item (6.13+).",
                                           labels=["cgroup", "item"])
        memcg_state = CounterMetricFamily("memcgscope_memcg_state_updates",
                                          "memcg:mod_memcg_state / mod_memcg_lruvec_state calls by item (6.13+).",
                                          labels=["cgroup", "item"])
        agg = d.aggregates()
        labels = d.view().labels
        if agg is not None:
            sums: dict = defaultdict(lambda: defaultdict(float))
            hists: dict = defaultdict(lambda: defaultdict(int))
            hist_sums: dict = defaultdict(float)
            for cgid, a in agg.cgroups.items():
                label = labels.get(cgid)
                if label is None:
                    continue   # not watched (--cgroup), or first seen after the last tick
                c = a.charges
                if c:
                    for f in ("calls", "pages", "slow"):
                        sums[(f,)][label] += c[f]
                    for f, name in (("fail_enomem", "ENOMEM"), ("fail_eintr", "EINTR"), ("fail_other", "other")):
                        if c[f]:
                            sums[("fail", name)][label] += c[f]
                    hist_sums[("charge", label)] += c["ns"] / 1e9
                for slot, n in a.charge_latency.items():
                    hists[("charge", label)][slot] += n
                p = a.page_charges
                if p:
                    sums[("page_calls",)][label] += p["calls"]
                    for f, name in (("fail_enomem", "ENOMEM"), ("fail_eintr", "EINTR"), ("fail_other", "other")):
                        if p[f]:
                            sums[("page_fail", name)][label] += p[f]
                for caller, r in a.reclaim.items():
                    sums[("reclaim_calls", caller)][label] += r["calls"]
                    sums[("reclaim_asked", caller)][label] += r["asked"]
                    sums[("reclaim_freed", caller)][label] += r["freed"]
                    hist_sums[("reclaim", label, caller)] += r["ns"] / 1e9
                for caller, slots in a.reclaim_latency.items():
                    for slot, n in slots.items():
                        hists[("reclaim", label, caller)][slot] += n
                for (file, ret), n in a.limit_writes.items():
                    sums[("limit", file, errno_name(ret))][label] += n
                if a.oom:
                    sums[("oom", "true")][label] += a.oom["returned_true"]
                    sums[("oom", "false")][label] += a.oom["invocations"] - a.oom["returned_true"]
                    sums[("kills",)][label] += a.oom["kills"]
                    sums[("victims",)][label] += a.oom.get("victims", 0)
                for counter, n in a.counter_failures.items():
                    sums[("cfail", counter)][label] += n
                if a.high:
                    sums[("high_calls",)][label] += a.high["calls"]
                    sums[("high_sleep",)][label] += a.high["sleep_ns"] / 1e9
                    hist_sums[("high", label)] += a.high["sleep_ns"] / 1e9
                for slot, n in a.high_latency.items():
                    hists[("high", label)][slot] += n
                for item, (count, total) in a.memcg_events.items():
                    sums[("mev", item)][label] += total
                for item, (count, total) in a.memcg_state.items():
                    sums[("mst", item)][label] += count
            for key, per_label in sums.items():
                kind = key[0]
                for label, value in per_label.items():
                    if kind == "calls":
                        charges.add_metric([label], value)
                    elif kind == "pages":
                        pages.add_metric([label], value)
                    elif kind == "slow":
                        slow.add_metric([label], value)
                    elif kind == "fail":
                        failures.add_metric([label, key[1]], value)
                    elif kind == "page_calls":
                        page_charges.add_metric([label], value)
                    elif kind == "page_fail":
                        page_failures.add_metric([label, key[1]], value)
                    elif kind == "reclaim_calls":
                        reclaim_calls.add_metric([label, key[1]], value)
                    elif kind == "reclaim_asked":
                        reclaim_asked.add_metric([label, key[1]], value)
                    elif kind == "reclaim_freed":
                        reclaimed.add_metric([label, key[1]], value)
                    elif kind == "limit":
                        limit_writes.add_metric([label, key[1], key[2]], value)
                    elif kind == "oom":
                        oom_calls.add_metric([label, key[1]], value)
                    elif kind == "kills":
                        oom_kills.add_metric([label], value)
                    elif kind == "victims":
                        oom_victims.add_metric([label], value)
                    elif kind == "cfail":
                        counter_failures.add_metric([label, key[1]], value)
                    elif kind == "high_calls":
                        high_calls.add_metric([label], value)
                    elif kind == "high_sleep":
                        high_sleep.add_metric([label], value)
                    elif kind == "mev":
                        memcg_events.add_metric([label, key[1]], value)
                    elif kind == "mst":
                        memcg_state.add_metric([label, key[1]], value)
            for key, slots in hists.items():
                if key[0] == "charge":
                    latency.add_metric([key[1]], log2_histogram(slots), hist_sums[key])
                elif key[0] == "high":
                    high_latency.add_metric([key[1]], log2_histogram(slots), hist_sums[key])
                else:
                    reclaim_latency.add_metric([key[1], key[2]], log2_histogram(slots), hist_sums[key])
        yield from (charges, pages, failures, slow, latency, page_charges, page_failures, reclaim_calls,
                    reclaim_asked, reclaimed, reclaim_latency, limit_writes, oom_calls, oom_kills, oom_victims,
                    high_calls, high_sleep, high_latency,
                    counter_failures, memcg_events, memcg_state)

    # --- what the daemon counted --------------------------------------------

    def _episodes(self, d):
        episodes = CounterMetricFamily("memcgscope_episodes", "Slow-path episodes received from the kernel.",
                                       labels=["cgroup", "kind"])
        for (label, kind), n in d.episode_counts().items():
            episodes.add_metric([label, kind], n)
        counts = d.check_counts()
        checks = CounterMetricFamily("memcgscope_model_checks", "Episodes and aggregates checked against the model.",
                                     labels=["check", "verdict"])
        for (check, verdict), n in counts.checks.items():
            checks.add_metric([check, verdict], n)
        divergences = CounterMetricFamily("memcgscope_divergences",
                                          "Kernel behaviour the model of this kernel does not allow.",
                                          labels=["check", "reason"])
        for (check, reason), n in counts.divergences.items():
            divergences.add_metric([check, reason], n)
        errors = CounterMetricFamily("memcgscope_replay_errors",
                                     "Episodes whose replay raised inside memcgscope (a bug of ours; each is "
                                     "also a replay_error divergence).")
        errors.add_metric([], counts.replay_errors)
        yield from (episodes, checks, divergences, errors)

    # --- cgroupfs -----------------------------------------------------------

    def _cgroupfs(self, d):
        usage = GaugeMetricFamily("memcgscope_cgroup_usage_bytes",
                                  "memory.usage_in_bytes (v1) or memory.current (v2) of watched cgroups.",
                                  labels=["cgroup"])
        limit = GaugeMetricFamily("memcgscope_cgroup_limit_bytes",
                                  "memory.limit_in_bytes (v1) or memory.max (v2); +Inf when unlimited.",
                                  labels=["cgroup"])
        failcnt = CounterMetricFamily("memcgscope_cgroup_failcnt", "v1 memory.failcnt / memory.memsw.failcnt.",
                                      labels=["cgroup", "counter"])
        events = CounterMetricFamily("memcgscope_cgroup_memory_events", "v2 memory.events.local by event.",
                                     labels=["cgroup", "event"])
        pressure = CounterMetricFamily("memcgscope_cgroup_pressure_seconds",
                                       "v2 memory.pressure totals: time some (kind=some) or all (kind=full) "
                                       "non-idle tasks of the cgroup were stalled on memory.",
                                       labels=["cgroup", "kind"])
        stat_bytes = GaugeMetricFamily("memcgscope_cgroup_memory_stat_bytes",
                                       "memory.stat byte counts by item (v2 names; v1's rss, cache, mapped_file, "
                                       "dirty, writeback shown as anon, file, file_mapped, file_dirty, "
                                       "file_writeback).", labels=["cgroup", "item"])
        stat_events = CounterMetricFamily("memcgscope_cgroup_memory_stat_events",
                                          "memory.stat event counts: workingset_refault_anon/_file, pgscan, "
                                          "pgsteal (v2).", labels=["cgroup", "item"])
        swap = GaugeMetricFamily("memcgscope_cgroup_swap_usage_bytes",
                                 "v2 memory.swap.current; v1 memsw usage minus memory usage.", labels=["cgroup"])
        swap_events = CounterMetricFamily("memcgscope_cgroup_swap_events", "v2 memory.swap.events by event.",
                                          labels=["cgroup", "event"])
        protection = GaugeMetricFamily("memcgscope_cgroup_memory_threshold_bytes",
                                       "v2 memory.high, memory.low and memory.min (+Inf when max).",
                                       labels=["cgroup", "file"])
        from .cgroupfs import EVENT_STATS
        from .identity import LABELS
        info = GaugeMetricFamily("memcgscope_cgroup_info",
                                 "The workload a labelled cgroup is (systemd unit and slice, Kubernetes pod and "
                                 "container, container runtime and id; empty where unknown); join with "
                                 "* on (cgroup) group_left(pod, namespace) memcgscope_cgroup_info.",
                                 labels=["cgroup", *LABELS])
        view = d.view()
        for label, ident in view.identities.items():
            values = ident.labels()
            info.add_metric([label, *(values[k] for k in LABELS)], 1)
        for label, snap in view.cgroupfs.items():
            if snap.usage is not None:
                usage.add_metric([label], snap.usage)
            if snap.limit is not None:
                limit.add_metric([label], snap.limit)
            for counter, n in snap.failcnt.items():
                failcnt.add_metric([label, counter], n)
            for event, n in snap.events.items():
                events.add_metric([label, event], n)
            for kind, seconds in snap.pressure.items():
                pressure.add_metric([label, kind], seconds)
            for item, n in snap.stat.items():
                (stat_events if item in EVENT_STATS else stat_bytes).add_metric([label, item], n)
            if snap.swap_usage is not None:
                swap.add_metric([label], snap.swap_usage)
            for event, n in snap.swap_events.items():
                swap_events.add_metric([label, event], n)
            for name, value in snap.protection.items():
                protection.add_metric([label, f"memory.{name}"], value)
        yield from (info, usage, limit, failcnt, events, pressure, stat_bytes, stat_events, swap, swap_events,
                    protection)

    # --- the exporter itself --------------------------------------------------

    def _self(self, d):
        f, s = d.facts, d.session
        info = GaugeMetricFamily("memcgscope_build_info",
                                 "Version, kernel, probe mode and model profile; profile_exact is false when no "
                                 "profile covers this kernel and the nearest older one is used.",
                                 labels=["version", "kernel", "upstream", "mode", "profile", "profile_exact",
                                         "cgroup_version"])
        info.add_metric([f.version, f.kernel, f.upstream or "", d.mode or "", f.profile or "",
                         "true" if f.profile_exact else "false", f"v{f.cgroup_version}"], 1)
        attached = GaugeMetricFamily("memcgscope_probe_attached", "1 when the probe is attached, 0 when it is off.",
                                     labels=["role", "target", "kind"])
        for p in s.status():
            attached.add_metric([p.role, p.target, p.kind], 1 if p.attached else 0)
        lost = CounterMetricFamily("memcgscope_events_lost", "Events dropped because the ring buffer was full.",
                                   labels=["cpu"])
        for cpu, n in enumerate(s.lost()):
            lost.add_metric([str(cpu)], n)
        run_time = CounterMetricFamily("memcgscope_bpf_run_seconds",
                                       "Time the kernel spent in each BPF program (kernel.bpf_stats_enabled).",
                                       labels=["program"])
        run_count = CounterMetricFamily("memcgscope_bpf_runs", "Runs of each BPF program.", labels=["program"])
        stats = getattr(s, "program_stats", None)
        for name, (ns, count) in (stats() if stats else {}).items():
            run_time.add_metric([name], ns / 1e9)
            run_count.add_metric([name], count)
        ctx_lost = CounterMetricFamily("memcgscope_charge_contexts_lost",
                                       "Charges not counted: preempted mid-charge, their per-CPU context was reused.")
        counter = getattr(s, "contexts_lost", None)
        ctx_lost.add_metric([], counter() if counter else 0)
        map_full = CounterMetricFamily("memcgscope_map_full_drops",
                                       "Updates the BPF side dropped because a map was full (raise --max-cgroups "
                                       "or narrow --cgroup).", labels=["map"])
        full = getattr(s, "map_full", None)
        for name, n in (full() if full else {}).items():
            map_full.add_metric([name], n)
        stale = CounterMetricFamily("memcgscope_charge_contexts_reset",
                                    "Per-task charge contexts found stale (their return was never seen: a "
                                    "kretprobe missed for lack of instances) and started afresh.")
        reset = getattr(s, "contexts_reset", None)
        stale.add_metric([], reset() if reset else 0)
        dropped = CounterMetricFamily("memcgscope_unresolved_cgroup_events",
                                      "Episodes whose cgroup id resolved to no path (removed cgroups).")
        dropped.add_metric([], d.unresolved())
        yield from (info, attached, lost, ctx_lost, map_full, stale, run_time, run_count, dropped)
