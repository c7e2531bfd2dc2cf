#!/usr/bin/env python3
"""Writes memcgscope.json, the Grafana dashboard, from the panel list below.

The JSON is generated so that layout (gridPos), datasource references and
selectors stay consistent across ~40 panels; edit this file and run

    python3 grafana/dashboards/generate.py

(tests/unit/test_grafana.py fails when memcgscope.json and this file differ).
No dependencies beyond the standard library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("memcgscope.json")

DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
# $job/$instance/$cgroup are multi-value with "All" = ".*", so always =~
SEL = 'job=~"$job",instance=~"$instance"'
CG = SEL + ',cgroup=~"$cgroup"'
RI = "$__rate_interval"


def rate(metric: str, sel: str = CG, by: str = "cgroup") -> str:
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{RI}]))"


def increase(metric: str, sel: str = CG, by: str = "cgroup", window: str = RI) -> str:
    return f"sum by ({by}) (increase({metric}{{{sel}}}[{window}]))"


def new_or_increased(metric: str, sel: str, window: str) -> str:
    """Total increase over `window`, counting series born inside it: the
    exporter creates a label set at its first event (value 1), which
    increase() alone reads as the baseline and misses."""
    x = f"{metric}{{{sel}}}"
    return (f"(sum(increase({x}[{window}])) or vector(0)) + "
            f"(sum({x} unless {x} offset {window}) or vector(0))")


def quantile(q: float, hist: str, sel: str = CG, by: str = "cgroup") -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({hist}_bucket{{{sel}}}[{RI}])))"


class Board:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self):
        self.panels: list[dict] = []
        self.next_id = 1
        self.x = 0
        self.y = 0
        self.row_h = 0

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
        self.x, self.row_h = 0, 0

    def add(self, panel: dict, w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def targets(exprs, *, instant=False, fmt="time_series") -> list[dict]:
    out = []
    for i, (expr, legend) in enumerate(exprs):
        t = {"datasource": DS, "refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend,
             "range": not instant, "instant": instant, "format": fmt}
        out.append(t)
    return out


def timeseries(title, description, exprs, unit, *, stack=False, bars=False, min0=True, overrides=None):
    custom = {"drawStyle": "bars" if bars else "line", "lineWidth": 1, "fillOpacity": 60 if bars else 10,
              "showPoints": "never", "spanNulls": False,
              "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    defaults = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": targets(exprs),
            "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
            "options": {"legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                                   "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title, description, exprs, unit, *, thresholds=None, mappings=None, decimals=None):
    defaults = {"unit": unit, "mappings": mappings or [],
                "thresholds": {"mode": "absolute",
                               "steps": thresholds or [{"color": "green", "value": None}]}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": targets(exprs, instant=True),
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "none", "textMode": "auto",
                        "justifyMode": "auto", "orientation": "auto"}}


def table(title, description, exprs, *, hide=(), rename=None, mappings=None, unit="short"):
    exclude = {"Time": True, "__name__": True, **{k: True for k in hide}}
    return {"type": "table", "title": title, "description": description, "datasource": DS,
            "targets": targets(exprs, instant=True, fmt="table"),
            "fieldConfig": {"defaults": {"unit": unit, "mappings": mappings or [],
                                         "custom": {"align": "auto", "cellOptions": {"type": "auto"}}},
                            "overrides": []},
            "options": {"showHeader": True, "cellHeight": "sm"},
            "transformations": [{"id": "organize", "options": {"excludeByName": exclude,
                                                               "renameByName": rename or {}}}]}


def heatmap(title, description, expr, unit):
    return {"type": "heatmap", "title": title, "description": description, "datasource": DS,
            "targets": targets([(expr, "{{le}}")], fmt="heatmap"),
            "fieldConfig": {"defaults": {"custom": {"hideFrom": {"legend": False, "tooltip": False, "viz": False},
                                                    "scaleDistribution": {"type": "linear"}}},
                            "overrides": []},
            "options": {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left", "unit": unit},
                        "rowsFrame": {"layout": "auto"},
                        "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5,
                                  "fill": "dark-orange", "scale": "exponential", "reverse": False},
                        "cellValues": {"unit": "short"}, "filterValues": {"le": 1e-9},
                        "tooltip": {"show": True, "yHistogram": True}, "legend": {"show": True},
                        "exemplars": {"color": "rgba(255,0,255,0.7)"}}}


ON_OFF = [{"type": "value", "options": {"0": {"text": "off", "color": "red", "index": 0},
                                         "1": {"text": "on", "color": "green", "index": 1}}}]
ANY_IS_BAD = [{"color": "green", "value": None}, {"color": "red", "value": 1e-9}]


def build() -> dict:
    b = Board()

    b.row("Overview")
    b.add(table("Build", "What is running: memcgscope version, kernel, probe mode (fentry/kprobe/tracepoint), "
                "the model profile episodes are checked against, and the cgroup version.",
                [(f"memcgscope_build_info{{{SEL}}}", "")], hide=("Value", "job")), 8, 5)
    b.add(stat("Probes attached", "How many of the probes memcgscope wanted are attached; fewer than all "
               "means some kernel paths are not observed (see the Probes table).",
               [(f"sum by (instance) (memcgscope_probe_attached{{{SEL}}})", "{{instance}}")], "none"), 4, 5)
    b.add(stat("Events lost /s", "Ring-buffer events dropped per second (buffer full). Non-zero: episodes are "
               "incomplete and model checks may be skipped; raise --ringbuf-pages.",
               [(f"sum(rate(memcgscope_events_lost_total{{{SEL}}}[{RI}]))", "")], "ops",
               thresholds=ANY_IS_BAD), 4, 5)
    b.add(stat("Divergences in range", "Kernel behaviour the model of this kernel does not allow, over the "
               "dashboard's time range. Should be 0; see the Model cross-check row.",
               [(new_or_increased("memcgscope_divergences_total", SEL, "$__range"), "")], "none",
               thresholds=ANY_IS_BAD, decimals=0), 4, 5)
    b.add(stat("OOM kills in range", "OOM victims in the selected cgroups over the dashboard's time range.",
               [(new_or_increased("memcgscope_oom_kills_total", CG, "$__range"), "")], "none",
               thresholds=ANY_IS_BAD, decimals=0), 4, 5)
    b.add(table("Probes", "Each probe (role, kernel function or tracepoint, kind) and whether it is attached.",
                [(f"memcgscope_probe_attached{{{SEL}}}", "")], hide=("job",), rename={"Value": "attached"},
                mappings=ON_OFF), 12, 7)
    b.add(timeseries("Divergences /s by check", "Rate of divergences by check: is the kernel doing "
                     "something the model says it cannot, and where?",
                     [(rate("memcgscope_divergences_total", SEL, "check"), "{{check}}")], "ops"), 12, 7)

    b.row("Charges")
    b.add(timeseries("Charges /s by cgroup", "Calls of the charge core (try_charge_memcg) per second: who "
                     "is allocating (fentry/kprobe modes).",
                     [(rate("memcgscope_charges_total"), "{{cgroup}}")], "ops"), 12, 8)
    b.add(timeseries("Charged pages /s by cgroup", "Pages asked of the charge core per second (batch size "
                     "included).", [(rate("memcgscope_charged_pages_total"), "{{cgroup}}")], "short"), 12, 8)
    b.add(timeseries("Charge failures /s by errno", "Charge-core and page-charge calls returning an error, "
                     "by cgroup and errno: ENOMEM means the charge was refused after reclaim/OOM.",
                     [(rate("memcgscope_charge_failures_total", by="cgroup, errno"), "{{cgroup}} {{errno}}"),
                      (rate("memcgscope_page_charge_failures_total", by="cgroup, errno"),
                       "{{cgroup}} {{errno}} (page charge)")], "ops"), 12, 8)
    b.add(timeseries("Slow-path ratio", "Fraction of charges that took the slow path (a counter failed, then "
                     "reclaim, drain, OOM or failure): how often a cgroup runs into its limit.",
                     [(f"{rate('memcgscope_charge_slow_paths_total')} / {rate('memcgscope_charges_total')}",
                       "{{cgroup}}")], "percentunit"), 12, 8)
    b.add(timeseries("Charge latency p50 / p99", "Time in the charge core, per cgroup: is charging slow "
                     "(reclaim inside the charge shows up here).",
                     [(quantile(0.5, "memcgscope_charge_latency_seconds"), "{{cgroup}} p50"),
                      (quantile(0.99, "memcgscope_charge_latency_seconds"), "{{cgroup}} p99")], "s"), 12, 8)
    b.add(heatmap("Charge latency heatmap", "Distribution of time in the charge core over the selected "
                  "cgroups; a second mode far right of the fast path is the reclaim path.",
                  f"sum by (le) (increase(memcgscope_charge_latency_seconds_bucket{{{CG}}}[{RI}]))", "s"), 12, 8)
    b.add(timeseries("Counter failures /s", "page_counter_try_charge failures by the level that failed and "
                     "the counter (memory, memsw): which limit is hit, possibly an ancestor's.",
                     [(rate("memcgscope_counter_failures_total", by="cgroup, counter"),
                       "{{cgroup}} {{counter}}")], "ops"), 8, 8)
    b.add(timeseries("Page charges /s", "Page/folio charges (__mem_cgroup_charge) per cgroup.",
                     [(rate("memcgscope_page_charges_total"), "{{cgroup}}")], "ops"), 8, 8)
    b.add(timeseries("Slow-path episodes /s by kind", "Episodes that crossed the ring buffer, by kind "
                     "(charge, limit_write, page_charge_fail, oom_kill, reclaim).",
                     [(rate("memcgscope_episodes_total", by="kind"), "{{kind}}")], "ops", stack=True), 8, 8)

    b.row("Reclaim")
    b.add(timeseries("Reclaim calls /s by caller", "Memcg reclaim calls (try_to_free_mem_cgroup_pages) per "
                     "cgroup and caller (charge, v1_limit, v2_max, v2_high; unknown in tracepoint mode): "
                     "why a cgroup reclaims.",
                     [(rate("memcgscope_reclaim_calls_total", by="cgroup, caller"), "{{cgroup}} {{caller}}")],
                     "ops"), 12, 8)
    b.add(timeseries("Pages reclaimed /s by caller", "Pages memcg reclaim freed per second.",
                     [(rate("memcgscope_reclaimed_pages_total", by="cgroup, caller"), "{{cgroup}} {{caller}}")],
                     "short"), 12, 8)
    b.add(timeseries("Reclaim duration p50 / p99", "Time in one memcg reclaim call: long reclaims stall "
                     "the allocating task.",
                     [(quantile(0.5, "memcgscope_reclaim_duration_seconds", by="cgroup, caller"),
                       "{{cgroup}} {{caller}} p50"),
                      (quantile(0.99, "memcgscope_reclaim_duration_seconds", by="cgroup, caller"),
                       "{{cgroup}} {{caller}} p99")], "s"), 12, 8)
    b.add(timeseries("Reclaim efficiency (freed / requested)", "Pages freed per page asked: near 0 means "
                     "reclaim finds nothing to free (anon without swap, pinned memory) and OOM is near.",
                     [(f"{rate('memcgscope_reclaimed_pages_total', by='cgroup, caller')} / "
                       f"{rate('memcgscope_reclaim_requested_pages_total', by='cgroup, caller')}",
                       "{{cgroup}} {{caller}}")], "percentunit"), 12, 8)

    b.row("Limits & OOM")
    b.add(timeseries("Limit writes by file and result", "Writes to memory.limit_in_bytes, memory.max, "
                     "memory.high ... and their result (ok, EBUSY, EINTR, ...), per rate interval.",
                     [(increase("memcgscope_limit_writes_total", by="cgroup, file, result"),
                       "{{cgroup}} {{file}} {{result}}")], "short", bars=True), 8, 8)
    b.add(timeseries("OOM invocations by result", "mem_cgroup_out_of_memory calls per rate interval, by "
                     "whether they returned true (a victim was found or is exiting).",
                     [(increase("memcgscope_oom_invocations_total", by="cgroup, result"),
                       "{{cgroup}} {{result}}")], "short", bars=True), 8, 8)
    b.add(timeseries("OOM kills by trigger", "OOM kills per rate interval, by the memcg whose OOM ran "
                     "(its limit was hit): oom:mark_victim.",
                     [(increase("memcgscope_oom_kills_total"), "{{cgroup}}")], "short", bars=True), 8, 8)
    b.add(table("OOM victims by workload", "Kills by the victim's own cgroup (it may be a sibling of the one "
                "whose limit was hit), named by its workload, over the dashboard's time range.",
                [(f"sum by (instance, cgroup, unit, namespace, pod, container) ("
                  f"increase(memcgscope_oom_victims_total{{{CG}}}[$__range]) * on (job, instance, cgroup) "
                  f"group_left(unit, namespace, pod, container) memcgscope_cgroup_info{{{CG}}}) > 0", "")],
                rename={"Value": "victims"}), 24, 7)

    b.row("Model cross-check")
    b.add(timeseries("Model checks /s by verdict", "Episodes and aggregates checked against the model, by "
                     "check and verdict (ok, divergent, skipped): how much of the kernel's behaviour is "
                     "being verified.",
                     [(rate("memcgscope_model_checks_total", SEL, "check, verdict"), "{{check}} {{verdict}}")],
                     "ops", stack=True), 12, 8)
    b.add(timeseries("Divergences by check and reason", "Divergences per rate interval by check and reason "
                     "(collector/README.md lists the reasons); the divergence log holds the episodes.",
                     [(increase("memcgscope_divergences_total", SEL, "check, reason"), "{{check}} {{reason}}")],
                     "short", bars=True), 12, 8)
    b.add(timeseries("Divergent fraction of checks", "Divergent verdicts over all verdicts.",
                     [(f"sum(rate(memcgscope_model_checks_total{{{SEL},verdict=\"divergent\"}}[{RI}])) / "
                       f"sum(rate(memcgscope_model_checks_total{{{SEL}}}[{RI}]))", "divergent")],
                     "percentunit"), 12, 7)
    b.add(table("Divergences since start", "Cumulative divergences per check and reason since each "
                "collector started.",
                [(f"sum by (instance, check, reason) (memcgscope_divergences_total{{{SEL}}})", "")],
                rename={"Value": "divergences"}), 12, 7)

    b.row("cgroupfs")
    b.add(table("Workloads", "Each labelled cgroup's workload (systemd unit, Kubernetes namespace/pod/container, "
                "container runtime) with its usage: memcgscope_cgroup_info joined to the usage gauge.",
                [(f"memcgscope_cgroup_usage_bytes{{{CG}}} * on (job, instance, cgroup) group_left(unit, slice, "
                  f"namespace, pod, container, runtime) memcgscope_cgroup_info{{{CG}}}", "")],
                hide=("job",), rename={"Value": "usage"}, unit="bytes"), 24, 8)
    b.add(timeseries("Usage vs limit", "memory.usage_in_bytes / memory.current against the hard limit of "
                     "each watched cgroup (unlimited limits not drawn).",
                     [(f"memcgscope_cgroup_usage_bytes{{{CG}}}", "{{cgroup}} usage"),
                      (f"memcgscope_cgroup_limit_bytes{{{CG}}} < +Inf", "{{cgroup}} limit")], "bytes",
                     overrides=[{"matcher": {"id": "byRegexp", "options": ".* limit"},
                                 "properties": [{"id": "custom.lineStyle",
                                                 "value": {"fill": "dash", "dash": [10, 10]}}]}]), 12, 8)
    b.add(timeseries("Usage / limit", "How close each cgroup is to its hard limit.",
                     [(f"memcgscope_cgroup_usage_bytes{{{CG}}} / on (job, instance, cgroup) "
                       f"(memcgscope_cgroup_limit_bytes{{{CG}}} < +Inf)", "{{cgroup}}")], "percentunit"), 12, 8)
    b.add(timeseries("failcnt /s (v1)", "memory.failcnt / memory.memsw.failcnt increase per second: "
                     "counter failures as the kernel counts them.",
                     [(rate("memcgscope_cgroup_failcnt_total", by="cgroup, counter"), "{{cgroup}} {{counter}}")],
                     "ops"), 8, 8)
    b.add(timeseries("memory.events /s (v2)", "memory.events.local (low, high, max, oom, oom_kill, ...) "
                     "per second.",
                     [(rate("memcgscope_cgroup_memory_events_total", by="cgroup, event"),
                       "{{cgroup}} {{event}}")], "ops"), 8, 8)
    b.add(timeseries("memcg events /s (6.13+)", "memcg:count_memcg_events values by item (PGSCAN_*, "
                     "PGSTEAL_*, PGFAULT ...) per second.",
                     [(rate("memcgscope_memcg_events_total", by="cgroup, item"), "{{cgroup}} {{item}}")],
                     "short"), 8, 8)

    b.row("Pressure and contents")
    b.add(timeseries("Throttled at memory.high", "Share of wall time tasks of each cgroup slept as "
                     "memory.high's penalty (mem_cgroup_handle_over_high): alive, but not serving.",
                     [(rate("memcgscope_high_throttled_seconds_total", by="cgroup"), "{{cgroup}}")],
                     "percentunit"), 8, 8)
    b.add(timeseries("memory.high handler calls /s", "Returns to user space that found pages owed above "
                     "memory.high (mem_cgroup_handle_over_high), per second: reclaim, then maybe a sleep.",
                     [(rate("memcgscope_high_handler_calls_total", by="cgroup"), "{{cgroup}}")], "ops"), 8, 8)
    b.add(heatmap("memory.high penalty sleeps", "One sleep per throttled return to user space (capped at 2 s).",
                  f"sum by (le) (rate(memcgscope_high_throttle_seconds_bucket{{{CG}}}[{RI}]))", "s"), 8, 8)
    b.add(timeseries("Memory pressure (PSI, v2)", "Share of wall time some (or all) non-idle tasks of the "
                     "cgroup were stalled on memory: reclaim, throttling, refaults (memory.pressure).",
                     [(rate("memcgscope_cgroup_pressure_seconds_total", by="cgroup, kind"), "{{cgroup}} {{kind}}")],
                     "percentunit"), 12, 8)
    b.add(timeseries("memory.stat", "Anon, page cache, kernel memory, sockets, shmem by cgroup.",
                     [(f"sum by (cgroup, item) (memcgscope_cgroup_memory_stat_bytes{{{CG}, "
                       f"item=~\"anon|file|kernel|sock|shmem\"}})", "{{cgroup}} {{item}}")], "bytes",
                     stack=True), 12, 8)
    b.add(timeseries("Refaults and reclaim scans /s", "workingset refaults (anon, file), pages scanned and "
                     "stolen by reclaim (memory.stat).",
                     [(rate("memcgscope_cgroup_memory_stat_events_total", by="cgroup, item"),
                       "{{cgroup}} {{item}}")], "ops"), 8, 8)
    b.add(timeseries("Swap", "Swap used by each cgroup and swap events (high, max, fail) per second.",
                     [(f"memcgscope_cgroup_swap_usage_bytes{{{CG}}}", "{{cgroup}} swap"),
                      (rate("memcgscope_cgroup_swap_events_total", by="cgroup, event"), "{{cgroup}} {{event}} /s")],
                     "bytes"), 8, 8)
    b.add(timeseries("memory.high / low / min", "The soft limit and the protections of each cgroup "
                     "(v2; unlimited not drawn).",
                     [(f"memcgscope_cgroup_memory_threshold_bytes{{{CG}}} < +Inf", "{{cgroup}} {{file}}")],
                     "bytes"), 8, 8)

    b.row("Exporter health")
    b.add(timeseries("BPF CPU time by program", "Fraction of one CPU spent in each BPF program "
                     "(kernel.bpf_stats_enabled is on while memcgscope runs): the probes' overhead.",
                     [(rate("memcgscope_bpf_run_seconds_total", SEL, "instance, program"),
                       "{{instance}} {{program}}")], "percentunit"), 12, 8)
    b.add(timeseries("BPF time per run", "Average time per BPF program run.",
                     [(f"{rate('memcgscope_bpf_run_seconds_total', SEL, 'instance, program')} / "
                       f"{rate('memcgscope_bpf_runs_total', SEL, 'instance, program')}",
                       "{{instance}} {{program}}")], "s"), 12, 8)
    b.add(timeseries("Scrape duration", "How long Prometheus takes to scrape memcgscope (it reads the BPF "
                     "maps at scrape time).",
                     [(f"scrape_duration_seconds{{{SEL}}}", "{{instance}}")], "s"), 8, 8)
    b.add(timeseries("Events lost /s by CPU", "Ring-buffer drops per CPU.",
                     [(rate("memcgscope_events_lost_total", SEL, "instance, cpu"), "{{instance}} cpu {{cpu}}")],
                     "ops"), 8, 8)
    b.add(timeseries("Unresolved cgroup events /s", "Episodes whose cgroup id resolved to no path (the "
                     "cgroup was removed before it was seen); they are not counted per cgroup.",
                     [(rate("memcgscope_unresolved_cgroup_events_total", SEL, "instance"), "{{instance}}"),
                      (rate("memcgscope_charge_contexts_lost_total", SEL, "instance"), "{{instance}} charges lost"),
                      (rate("memcgscope_charge_contexts_reset_total", SEL, "instance"),
                       "{{instance}} stale contexts reset")],
                     "ops"), 8, 8)
    b.add(timeseries("BPF map full drops /s", "Updates the BPF side dropped because a map was full: per-cgroup "
                     "statistics of new cgroups are then missing. Raise the map size or narrow --cgroup.",
                     [(rate("memcgscope_map_full_drops_total", SEL, "instance, map"), "{{instance}} {{map}}")],
                     "ops"), 8, 8)
    b.add(timeseries("Replay errors /s", "Episodes whose model replay raised inside memcgscope: a bug of "
                     "ours, never of the kernel (each is also a replay_error divergence). Please report it "
                     "with the divergence log.",
                     [(rate("memcgscope_replay_errors_total", SEL, "instance"), "{{instance}}")], "ops"), 8, 8)

    def var(name, label, query, *, include_all=True, multi=True):
        return {"name": name, "label": label, "type": "query", "datasource": DS,
                "query": {"query": query, "refId": f"var-{name}"}, "definition": query,
                "refresh": 2, "sort": 1, "multi": multi, "includeAll": include_all, "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [],
                "hide": 0, "regex": ""}

    return {
        "title": "memcgscope: memory-cgroup charge path",
        "uid": "memcgscope",
        "description": "Why cgroups reclaim, fail charges or OOM, and whether the kernel did what the "
                       "model of that kernel says (memcgscope run).",
        "tags": ["memcgscope", "memcg", "cgroup", "ebpf"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "links": [],
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "templating": {"list": [
            {"name": "DS_PROMETHEUS", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
             "regex": ""},
            var("job", "Job", "label_values(memcgscope_build_info, job)"),
            var("instance", "Instance", 'label_values(memcgscope_build_info{job=~"$job"}, instance)'),
            # charges_total alone is empty in tracepoint mode; reclaims and cgroupfs gauges are not
            var("cgroup", "cgroup", 'label_values({__name__=~"memcgscope_charges_total|memcgscope_reclaim_calls_total'
                '|memcgscope_cgroup_usage_bytes",' + SEL + '}, cgroup)'),
        ]},
        "panels": b.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
