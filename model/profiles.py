"""Kernel profiles: what differs between the versions the model follows.

Every fact here is in docs/kernel-facts.md, with the kernel file and function
it was read from.  A profile is data; the code that reads a field says which
versions it follows.  A family whose stable releases changed a fact has one
profile per range (``COVERS``): the family's name is the range holding the
Debian release read, the other ranges are named by their first sublevel:
``5.10.0`` (5.10.0–5.10.79: dying tasks force early, OOM_FAILED forces),
``5.10`` (5.10.80+: the passed_oom form); ``5.15``; ``6.1.0``, ``6.1.56``
(the sync memory.high reclaim takes the charge's gfp), ``6.1`` (6.1.188+:
the superseded-limit break); ``6.6``; ``6.12.0``, ``6.12.109`` (the
superseded-limit break), ``6.12`` (6.12.117+: the MMF_OOM_SKIP bail too);
``6.18`` (6.18.0–6.18.35), ``6.18.36`` (round-robin stock eviction),
``6.18.50`` (superseded break, memsw failcnt), ``6.18.51`` (MMF_OOM_SKIP
bail); ``7.2.0``, ``7.2.4``, ``7.2`` (7.2.5+); ``7.3.0`` (7.3.0–7.3.3),
``7.3`` (7.3.4+: a rejected charge raises ``max``).
``get_profile("6.1.166")`` maps a full release to its profile;
``resolve_profile`` is the one place that chooses a kernel's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

__all__ = ["Profile", "PROFILES", "COVERS", "Resolution", "get_profile", "resolve_profile",
           "upstream_version"]


@dataclass(frozen=True)
class Profile:
    name: str
    #: MEMCG_CHARGE_BATCH
    charge_batch: int
    #: stock slots per CPU (NR_MEMCG_STOCK on 6.18, 7.x; one cached memcg before)
    stock_slots: int
    #: the charge core's name (the probe symbol)
    charge_core: str
    #: __GFP_ATOMIC exists (5.10 .. 6.1)
    has_gfp_atomic: bool
    #: __GFP_ATOMIC → force, before reclaim (≤ 6.0)
    force_on_gfp_atomic: bool
    #: dying task forces at once, no reclaim; OOM_FAILED forces (5.10.0–5.10.79)
    early_dying_force: bool
    #: __GFP_NOFAIL forces after the retries, skipping OOM (5.10)
    nofail_forces_before_oom: bool
    #: at nomem, __GFP_HIGH forces like NOFAIL (≥ 6.1)
    nomem_forces_on_high: bool
    #: a forced charge raises one ``max`` event if none was raised (≥ 6.1)
    forced_charge_raises_max: bool
    #: memcg_nr_pages_over_high > BATCH → handle_over_high inside try_charge (≥ 6.1)
    sync_high_reclaim: bool
    #: that synchronous mem_cgroup_handle_over_high reclaims with the charge's
    #: gfp (6.1.56+, ≥ 6.6: "mm: memcontrol: fix GFP_NOFS recursion in
    #: memory.high enforcement"); before, reclaim_high used GFP_KERNEL
    sync_high_charge_gfp: bool
    #: mem_cgroup_wait_acct_move in the retry loop (≤ 6.12)
    charge_move_wait: bool
    #: try_charge_memcg: batch = nr when !gfpflags_allow_spinning(gfp) (no
    #: reclaim bits: alloc_pages_nolock / kmalloc_nolock), "Avoid the refill
    #: and flush of the older stock" (6.18, 7.x).  The other !allow_spinning
    #: difference, no file notification with the ``max`` event, moves no count
    batch_is_nr_without_reclaim: bool
    #: mem_cgroup_out_of_memory: task_is_dying() || out_of_memory() (≤ 6.14)
    oom_dying_shortcut: bool
    #: mem_cgroup_oom returns enum oom_status (5.10, 5.15) or bool (≥ 6.1)
    oom_returns_enum: bool
    #: page_counter local_watermark (≥ 6.12)
    local_watermark: bool
    #: page_counter track_failcnt (mm/page_counter.c page_counter_try_charge
    #: reads the leaf's; mm/memcontrol.c mem_cgroup_css_alloc sets it): None
    #: where every counter counts failures (≤ 6.14); else the v1 counters
    #: that do: ("memory",) from 6.15 "page_counter: track failcnt only for
    #: legacy cgroups" (memsw.failcnt never moves: seen on a 6.18.44 host),
    #: ("memory", "memsw") from "mm: memcg-v1: fix memsw and TCP failcnt
    #: accounting" (6.18.50, 7.2.4, 7.3; tcpmem too, not modelled)
    failcnt_counters: tuple[str, ...] | None
    #: page_counter_cancel clamps a negative usage to 0 (≥ 5.15)
    uncharge_clamps: bool
    #: page_counter_set_max succeeds when new ≥ old even if usage grew (≥ 6.1)
    set_max_enlarge_ok: bool
    #: O_NONBLOCK on memory.max / memory.high writes skips reclaim (6.18, 7.x)
    nonblock_limit_writes: bool
    #: try_to_free_mem_cgroup_pages 4th argument: "may_swap" (≤ 5.15),
    #: "reclaim_options" (6.1, 6.6), "reclaim_options+swappiness" (≥ 6.12)
    reclaim_signature: str
    #: memory.events keys, in print order
    memory_events_keys: tuple[str, ...]
    #: memory.peak (≥ 6.1), memory.swap.peak (≥ 6.6), per-fd peak reset (≥ 6.12)
    has_peak: bool
    has_swap_peak: bool
    peak_writable: bool
    #: memory.reclaim (≥ 5.19, so 6.1 here)
    has_memory_reclaim: bool
    #: GFP_NOWAIT includes __GFP_NOWARN (6.18, 7.x)
    gfp_nowait_has_nowarn: bool
    #: the v1 memory controller needs CONFIG_MEMCG_V1 (≥ 6.12)
    v1_needs_config: bool
    #: refill_stock: which slot a refill of an uncached memcg drains when
    #: every slot is taken: None (one slot, ≤ 6.17: the cached memcg is
    #: replaced), "random" (6.18.0–6.18.35: get_random_u32_below(
    #: NR_MEMCG_STOCK), the ``Kernel(evict_slot=)`` choice), "round_robin"
    #: (the per-cpu ``stock->drain_idx``, 0, 1, … 6, 0: "memcg: use
    #: round-robin victim selection in refill_stock", 6.18.36, 7.2, 7.3)
    stock_evict: str | None
    #: consume_stock empties a slot whose pages reach 0 (css_put, cached[i]
    #: = NULL) instead of keeping the memcg cached (7.3; not 7.2.13)
    stock_release_empty: bool
    #: try_charge_memcg: an OOM victim whose mm the OOM reaper marked
    #: MMF_OOM_SKIP gives up (nomem) after the !gfpflags_allow_blocking test,
    #: before the ``max`` event and reclaim ("memcg: bypass the reclaim and
    #: oom killer for dying tasks once oom_reaper is done": v7.3, and by
    #: stable backports 6.12.117, 6.18.51, 7.2.5; not 5.10.262, 6.1.192);
    #: asked at the ``oom_skip`` point of the ``signal`` oracle
    oom_skip_bails: bool
    #: try_charge_memcg's ``out:`` label raises one ``max`` event for a
    #: rejected (-ENOMEM) charge too if no pass raised one, as ≥ 6.1 does
    #: for a forced one ("mm: memcontrol: raise MEMCG_MAX for charges that
    #: fail without reclaiming": 7.3.4 by a stable backport; not 7.3.0–7.3.3,
    #: 7.2.13)
    rejected_charge_raises_max: bool
    #: memory_max_write / memory_high_write leave their loop when
    #: memory.max / memory.high no longer holds the value written, the first
    #: test of each pass ("mm: memcg: stop reclaim when a limit update is
    #: superseded": v7.3, and by stable backports 6.1.188, 6.12.109, 6.18.50,
    #: 7.2.4; not 5.10.262); asked by the ``superseded`` oracle
    limit_superseded_break: bool
    #: memory_max_write, memory_high_write, v1 mem_cgroup_resize_max
    #: (mm/memcontrol-v1.c) and memory.reclaim's user_proactive_reclaim
    #: (mm/vmscan.c) stop when memcg_is_dying() ("cgroup_rmdir() waits for us
    #: with cgroup_mutex held": v7.3; not 7.2.13); asked by the
    #: ``memcg_dying`` oracle
    limit_dying_break: bool
    #: mem_cgroup_handle_over_high (__mem_cgroup_handle_over_high ≥ 6.18):
    #: task_is_dying() bails out at the top of every reclaim retry ("mm:
    #: memcontrol: don't throttle dying tasks on memory.high", v6.8: 6.12,
    #: 6.18, 7.x; not 5.10.262, 6.1.192; 5.15.y, 6.6.y not checked); asked
    #: at the ``over_high`` point of the ``signal`` oracle
    over_high_dying_bail: bool

    @property
    def batch(self) -> int:
        return self.charge_batch

    @property
    def track_failcnt(self) -> bool:
        """page_counter has ``track_failcnt`` (≥ 6.15): counters outside
        ``failcnt_counters`` (all of v2's) count no failures."""
        return self.failcnt_counters is not None


_EVENTS_5 = ("low", "high", "max", "oom", "oom_kill")
_EVENTS_6 = _EVENTS_5 + ("oom_group_kill",)
#: __memory_events_show: + MEMCG_SOCK_THROTTLED, "memcg: expose socket memory
#: pressure in a cgroup" (v6.19: 7.2, 7.3; no 6.18.y has it: 6.18.15, 6.18.44)
_EVENTS_7 = _EVENTS_6 + ("sock_throttled",)

_P_5_10 = Profile(
    name="5.10", charge_batch=32, stock_slots=1, charge_core="try_charge",
    has_gfp_atomic=True, force_on_gfp_atomic=True, early_dying_force=False,
    nofail_forces_before_oom=True, nomem_forces_on_high=False,
    forced_charge_raises_max=False, sync_high_reclaim=False, sync_high_charge_gfp=False,
    charge_move_wait=True, batch_is_nr_without_reclaim=False, oom_dying_shortcut=True,
    oom_returns_enum=True, local_watermark=False, failcnt_counters=None, uncharge_clamps=False,
    set_max_enlarge_ok=False, nonblock_limit_writes=False, reclaim_signature="may_swap",
    memory_events_keys=_EVENTS_5, has_peak=False, has_swap_peak=False,
    peak_writable=False, has_memory_reclaim=False, gfp_nowait_has_nowarn=False,
    v1_needs_config=False, stock_evict=None, stock_release_empty=False,
    oom_skip_bails=False, rejected_charge_raises_max=False, limit_superseded_break=False,
    limit_dying_break=False, over_high_dying_bail=False,
)
_P_5_10_0 = replace(_P_5_10, name="5.10.0", early_dying_force=True)
_P_5_15 = replace(_P_5_10, name="5.15", charge_core="try_charge_memcg",
                  nofail_forces_before_oom=False, uncharge_clamps=True)
_P_6_1_0 = replace(_P_5_15, name="6.1.0", charge_batch=64, force_on_gfp_atomic=False,
                   nomem_forces_on_high=True, forced_charge_raises_max=True,
                   sync_high_reclaim=True, oom_returns_enum=False, set_max_enlarge_ok=True,
                   reclaim_signature="reclaim_options", memory_events_keys=_EVENTS_6,
                   has_peak=True, has_memory_reclaim=True)
# 6.1.56 "mm: memcontrol: fix GFP_NOFS recursion in memory.high enforcement"
_P_6_1_56 = replace(_P_6_1_0, name="6.1.56", sync_high_charge_gfp=True)
# 6.1.188 "mm: memcg: stop reclaim when a limit update is superseded"
_P_6_1 = replace(_P_6_1_56, name="6.1", limit_superseded_break=True)
_P_6_6 = replace(_P_6_1_56, name="6.6", has_gfp_atomic=False, has_swap_peak=True)
_P_6_12_0 = replace(_P_6_6, name="6.12.0", local_watermark=True, peak_writable=True,
                    reclaim_signature="reclaim_options+swappiness", v1_needs_config=True,
                    over_high_dying_bail=True)
_P_6_12_109 = replace(_P_6_12_0, name="6.12.109", limit_superseded_break=True)
_P_6_12 = replace(_P_6_12_109, name="6.12", oom_skip_bails=True)
_P_6_18 = replace(_P_6_12_0, name="6.18", stock_slots=7, charge_move_wait=False,
                  batch_is_nr_without_reclaim=True, oom_dying_shortcut=False,
                  failcnt_counters=("memory",), nonblock_limit_writes=True,
                  gfp_nowait_has_nowarn=True, stock_evict="random")
# 6.18.36 "memcg: use round-robin victim selection in refill_stock"
_P_6_18_36 = replace(_P_6_18, name="6.18.36", stock_evict="round_robin")
# 6.18.50 the superseded-limit break and "mm: memcg-v1: fix memsw and TCP failcnt accounting"
_P_6_18_50 = replace(_P_6_18_36, name="6.18.50", limit_superseded_break=True,
                     failcnt_counters=("memory", "memsw"))
# 6.18.51 the MMF_OOM_SKIP bail
_P_6_18_51 = replace(_P_6_18_50, name="6.18.51", oom_skip_bails=True)
_P_7_2_0 = replace(_P_6_18_36, name="7.2.0", memory_events_keys=_EVENTS_7)
# 7.2.4 the superseded-limit break and the memsw failcnt fix; 7.2.5 the MMF_OOM_SKIP bail
_P_7_2_4 = replace(_P_7_2_0, name="7.2.4", limit_superseded_break=True,
                   failcnt_counters=("memory", "memsw"))
_P_7_2 = replace(_P_7_2_4, name="7.2", oom_skip_bails=True)
_P_7_3_0 = replace(_P_7_2, name="7.3.0", stock_release_empty=True, limit_dying_break=True)
# 7.3.4 "mm: memcontrol: raise MEMCG_MAX for charges that fail without reclaiming"
_P_7_3 = replace(_P_7_3_0, name="7.3", rejected_charge_raises_max=True)

PROFILES: dict[str, Profile] = {p.name: p for p in (
    _P_5_10_0, _P_5_10, _P_5_15, _P_6_1_0, _P_6_1_56, _P_6_1, _P_6_6, _P_6_12_0, _P_6_12_109,
    _P_6_12, _P_6_18, _P_6_18_36, _P_6_18_50, _P_6_18_51, _P_7_2_0, _P_7_2_4, _P_7_2, _P_7_3_0,
    _P_7_3)}


#: Which upstream releases each profile covers: (first, last) sublevels of
#: one family, last None for "and every later stable release".  A family's
#: name is the range of the Debian release read (5.10.262, 6.1.192,
#: 6.12.117, 6.18.15, 7.2.13, 7.3.4); the other ranges are named by their
#: first sublevel.  The boundaries are the stable releases that brought a
#: fact (docs/kernel-facts.md §1 says which, and how each was read).
COVERS: dict[str, tuple[tuple[int, int], int, int | None]] = {
    "5.10.0": ((5, 10), 0, 79),
    "5.10": ((5, 10), 80, None),
    "5.15": ((5, 15), 0, None),
    "6.1.0": ((6, 1), 0, 55),
    "6.1.56": ((6, 1), 56, 187),
    "6.1": ((6, 1), 188, None),
    "6.6": ((6, 6), 0, None),
    "6.12.0": ((6, 12), 0, 108),
    "6.12.109": ((6, 12), 109, 116),
    "6.12": ((6, 12), 117, None),
    "6.18": ((6, 18), 0, 35),
    "6.18.36": ((6, 18), 36, 49),
    "6.18.50": ((6, 18), 50, 50),
    "6.18.51": ((6, 18), 51, None),
    "7.2.0": ((7, 2), 0, 3),
    "7.2.4": ((7, 2), 4, 4),
    "7.2": ((7, 2), 5, None),
    "7.3.0": ((7, 3), 0, 3),
    "7.3": ((7, 3), 4, None),
}


@dataclass(frozen=True)
class Resolution:
    """Which profile a kernel gets, and why (``resolve_profile``)."""
    profile: Profile
    #: the kernel release as given (``uname -r``)
    release: str
    #: the upstream version read, "5.10.262"; None when it could not be read
    upstream: str | None
    #: where ``upstream`` came from, and how the profile was chosen
    reason: str
    #: set when the profile is not known to cover this kernel (nearest older)
    warning: str | None = None

    @property
    def exact(self) -> bool:
        return self.warning is None


_DEBIAN_VERSION = re.compile(r"Debian (\d+)\.(\d+)\.(\d+)")
_UBUNTU_SIGNATURE = re.compile(r"(\d+)\.(\d+)\.(\d+)\s*$")
_RELEASE = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?")
# Debian's ABI releases, "5.10.0-46-amd64" or "6.1.0-57-amd64": the third
# number is always 0 and says nothing of the stable sublevel
_DEBIAN_ABI = re.compile(r"^\d+\.\d+\.0-\d+-")


def upstream_version(release: str, version: str | None = None,
                     signature: str | None = None) -> tuple[tuple[int, int, int | None] | None, str]:
    """The upstream (major, minor, sublevel) of a kernel, and where it was read.

    ``release`` is ``uname -r``, ``version`` ``uname -v`` (or the whole
    /proc/version), ``signature`` Ubuntu's /proc/version_signature.  Debian
    puts the ABI, not the stable sublevel, in ``uname -r`` (5.10.0-46-amd64 is
    5.10.262; 6.1.0-57-amd64 is 6.1.192) and the real version in ``uname -v``
    ("#1 SMP Debian 5.10.262-1 (2026-07-31)"); Ubuntu puts it at the end of
    /proc/version_signature ("Ubuntu 5.15.0-91.101-generic 5.15.131").
    From 6.12 on Debian's release carries it too ("6.12.117+deb12-amd64").
    sublevel None: only the family is known.
    """
    m = _DEBIAN_VERSION.search(version or "")
    if m:
        return (int(m[1]), int(m[2]), int(m[3])), "uname -v"
    m = _UBUNTU_SIGNATURE.search(signature or "")
    if m:
        return (int(m[1]), int(m[2]), int(m[3])), "/proc/version_signature"
    m = _RELEASE.match(release.strip())
    if not m:
        return None, "uname -r"
    sub = None if m[3] is None or _DEBIAN_ABI.match(release.strip()) else int(m[3])
    return (int(m[1]), int(m[2]), sub), "uname -r"


def _covering(family, sub):
    """Profiles of ``family`` whose range holds ``sub`` (all of the family's
    profiles when ``sub`` is None), newest range first."""
    out = []
    for name, (fam, first, last) in COVERS.items():
        if fam != family:
            continue
        if sub is None or (first <= sub and (last is None or sub <= last)):
            out.append((first, name))
    return [name for _, name in sorted(out, reverse=True)]


def resolve_profile(release: str, version: str | None = None, *, signature: str | None = None,
                    override: str | None = None) -> Resolution:
    """The one place that chooses a kernel's profile (run, record, replay,
    doctor and validate all call it).

    ``override`` (``--profile``) is a profile name or a release a profile
    covers exactly, and wins; anything else is refused.
    Otherwise the upstream version (``upstream_version``) picks the profile
    whose range covers it; a kernel between or above the ranges gets the
    nearest older profile, with a warning; one older than every profile is
    refused (ValueError, one line).
    """
    if override:
        # an explicit choice: a profile name, or a release a profile covers
        # (get_profile raises for anything else; no nearest-older guess)
        return Resolution(get_profile(override), release, None, f"--profile {override}")
    up, source = upstream_version(release, version, signature)
    if up is None:
        raise ValueError(f"kernel {release!r}: no version in it; use --profile with one of {', '.join(PROFILES)}")
    family, sub = (up[0], up[1]), up[2]
    text = f"{up[0]}.{up[1]}" + ("" if sub is None else f".{sub}")
    names = _covering(family, sub)
    if names and (sub is not None or len(names) == 1):
        return Resolution(PROFILES[names[0]], release, text,
                          f"{text} (from {source}) is covered by profile {names[0]}")
    if names:
        # Debian ABI release without uname -v: the family's newest form
        return Resolution(PROFILES[names[0]], release, None,
                          f"{text} (from {source}): stable sublevel unknown; newest {text} profile {names[0]}",
                          f"kernel {release}: its stable sublevel is unknown (no 'Debian X.Y.Z' in uname -v); "
                          f"checking against {names[0]}, the newest {text} profile (use --profile to choose)")
    older = [(fam, first, name) for name, (fam, first, last) in COVERS.items()
             if (fam, first) <= (family, sub if sub is not None else 1 << 30)]
    if not older:
        raise ValueError(f"kernel {release!r} ({text}) is older than every model profile; "
                         f"the oldest is {min(COVERS.values())[0][0]}.{min(COVERS.values())[0][1]}")
    name = max(older)[2]
    return Resolution(PROFILES[name], release, text,
                      f"{text} (from {source}): no profile covers it; nearest older {name}",
                      f"no model profile covers kernel {release} ({text}); checking against {name}, "
                      f"the nearest older one (use --profile to choose)")


def get_profile(name: str | Profile) -> Profile:
    """A profile by name (``"6.1"``) or full release (``"6.1.0-18-amd64"``)
    that a profile covers; anything else raises ValueError (use
    ``resolve_profile`` for the nearest-older fallback).

    A release whose stable sublevel is unknown (a Debian ABI release,
    "6.1.0-56-amd64", without its ``uname -v``) gets its family's newest
    profile, as ``resolve_profile`` chooses it (and warns).
    """
    if isinstance(name, Profile):
        return name
    text = str(name).strip()
    if text in PROFILES:
        return PROFILES[text]
    known = ", ".join(PROFILES)
    try:
        res = resolve_profile(text)
    except ValueError:
        raise ValueError(f"unknown kernel profile {text!r}; use one of {known}") from None
    if res.warning is None or res.upstream is None:
        return res.profile
    raise ValueError(f"unknown kernel profile {text!r}; use one of {known}")
