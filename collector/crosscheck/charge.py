"""The charge replay: ``try_charge_memcg`` (``try_charge`` on 5.10) on a
scratch ``Kernel``, through the model's public interface only, with the
observation answering every oracle (replay.py).

Unobservable task state is a choice: PF_MEMALLOC, and on v1
``memcg_in_oom`` (set by an earlier oom_kill_disable OOM of the task),
``oom_kill_disable`` and a charge move in progress are tried as variants;
an episode is divergent only if no variant replays it.  PF_MEMALLOC stays
task state rather than an oracle: it holds for the whole charge (set
around reclaim and writeback by memalloc_noreclaim_save), so an answer per
test point could only be a variant again.
"""

from __future__ import annotations

import errno
from collections import Counter

from memcgscope.model import GFP, Kernel, Task
from memcgscope.model.gfp import order_of

from .reasons import Mismatch
from .replay import Replay

__all__ = ["scratch_kernel", "model_events", "replay_charge", "charge_outcome"]

_DIRECT = GFP.DIRECT_RECLAIM
_EVENTS = ("max", "oom", "oom_kill")


def scratch_kernel(profile, cgroup, memsw, nrel):
    """A one-CPU kernel with the episode's cgroups and no limits: the charged
    memcg is the deepest (rel 0), the other cgroups of the episode (rel 1..)
    its ancestors, nearest first.  → (kernel, {rel: handle})."""
    k = Kernel(profile, cgroup=cgroup, cpus=1, swap_account=memsw)
    path = ""
    chain = []
    for rel in range(nrel - 1, 0, -1):
        path += f"/a{rel}"
        chain.append((rel, k.mkdir(path)))
    cgroups = {0: k.mkdir(path + "/m")}
    cgroups.update(chain)
    return k, cgroups


def model_events(cgroups) -> tuple:
    """((rel, name), n) of the memory events the model raised, per cgroup."""
    out = []
    for rel, m in cgroups.items():
        for name in _EVENTS:
            n = m.event(name, local=True)
            if n:
                out.append(((rel, name), n))
    return tuple(out)


def _variants(profile, cgroup):
    out = [{}, {"pf_memalloc": True}]
    if cgroup == "v1":
        out += [{"in_oom": True}, {"oom_kill_disable": True}]
        if profile.charge_move_wait:        # ≤ 6.12 mem_cgroup_wait_acct_move
            out.append({"moving": True})
    return out


def _write(k, m, fname, text):
    ret = k.write(m, fname, text)
    if ret:
        raise RuntimeError(f"scratch kernel: writing {text!r} to {m.path}/{fname} gave {ret}")


def replay_charge(cc, gfp, nr, ret, shape, exit_fits=None):
    """→ (verdict, reason, detail, events, forced).  ``cc``: the CrossChecker
    (profile, cgroup, memsw, drains_visible); ``exit_fits``: the charged
    memcg's usage within its max at the charge's exit (None: not asked or
    not recorded; see ``Replay.usage``).  Exceptions other than a
    mismatch propagate: they are bugs, and the caller reports them."""
    p = cc.profile
    # structural rules first: they hold whatever the interleaving
    if any(s[0] == "R" for s in shape) and not gfp & _DIRECT:
        return ("divergent", "reclaim_not_allowed",
                f"reclaim in a charge with gfp {gfp:#x} (no __GFP_DIRECT_RECLAIM)", (), False)
    if order_of(nr) > 3 and any(s[0] in ("O", "K") for s in shape):
        return ("divergent", "oom_order",
                f"OOM for a charge of {nr} pages (order {order_of(nr)} > 3)", (), False)
    if any(s[0] == "R" and s[6] is None for s in shape):
        return ("skipped", "", "", (), False)   # margin unknown: no `after` counters
    nrel = 1 + max((s[3] if s[0] == "F" else s[1]) or 0 for s in shape) if shape else 1
    high_tail = p.sync_high_reclaim and cc.cgroup == "v2" and bool(gfp & _DIRECT)
    first = None
    for v in _variants(p, cc.cgroup):
        k, cgroups = scratch_kernel(p, cc.cgroup, cc.memsw, nrel)
        leaf = cgroups[0]
        pf = v.get("pf_memalloc", False)
        task = Task(pf_memalloc=pf, in_user_fault=True,
                    memcg_in_oom=leaf if v.get("in_oom") else None)
        if v.get("oom_kill_disable"):
            for m in cgroups.values():
                _write(k, m, "memory.oom_control", "1")
        r = Replay(p, "charge", shape, ret, cgroups, gfp=gfp, nr=nr,
                   drains_visible=cc.drains_visible, high_tail=high_tail, pf_memalloc=pf,
                   exit_fits=exit_fits)
        try:
            out = k.charge(leaf, nr, gfp, 0, r.reclaim, task=task, oom=r.oom, drain=r.drain,
                           moving=r.moving if v.get("moving") else None, attempt=r.attempt,
                           usage=r.usage, signal=r.signal)
            final = out.steps[-1] if out.steps else None
            r.nomem = final.reason if final is not None and final.kind == "nomem" else None
            forced = any(s.kind == "force" for s in out.steps)
            if not r.at_end():
                r.mismatch("returns " + (f"-ENOMEM ({r.nomem})" if out.ret else "0"))
            if out.ret != ret:
                raise Mismatch("ret_mismatch", f"model returns {out.ret}, kernel {ret}"
                               + (f" (model: {r.nomem})" if r.nomem else ""))
        except Mismatch as m:
            if first is None:
                first = m
            continue
        return ("ok", "", "", model_events(cgroups), forced)
    return ("divergent", first.reason, first.detail, (), False)


def charge_outcome(cc, gfp, nr, ret, shape, exit_fits=None):
    """The cached outcome of a charge shape: the replay's verdict and the
    counts the aggregates need, relative to the charged memcg.
    → (verdict, reason, detail, events, forced, failures, kills)."""
    verdict, reason, detail, events, forced = replay_charge(cc, gfp, nr, ret, shape, exit_fits)
    return with_counts(shape, verdict, reason, detail, events, forced,
                       rejected_max=ret == -errno.ENOMEM and cc.profile.rejected_charge_raises_max)


def with_counts(shape, verdict, reason, detail, events, forced, rejected_max=False):
    """``rejected_max``: a rejected charge raises one max event at ``out:``
    if no pass did (7.3.4+)."""
    fails, kills = Counter(), 0
    for s in shape:
        if s[0] == "F" and s[3] is not None:
            fails[(s[3], s[1])] += 1
        elif s[0] == "K":
            kills += 1
    if verdict != "ok":
        # not replayed: the events the observation shows (a max per reclaim
        # pass on its target, an oom per OOM call) stand in for the model's;
        # 7.3.4+: a rejection with no reclaim raised its one max on the
        # level whose counter failed last
        ev = Counter()
        for s in shape:
            if s[0] in ("R", "O") and s[1] is not None:
                ev[(s[1], "max" if s[0] == "R" else "oom")] += 1
        last_fail = next((s for s in reversed(shape) if s[0] == "F"), None)
        if (rejected_max and last_fail is not None and last_fail[3] is not None
                and not any(s[0] == "R" for s in shape)):
            ev[(last_fail[3], "max")] += 1
        events = tuple(ev.items())
    return verdict, reason, detail, events, forced, tuple(fails.items()), kills
