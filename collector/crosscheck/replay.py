"""One run of the model against one observed shape: a cursor over the
shape steps and the model's oracles, each answered by the observation.

The model asks; the next observed step answers or, when it cannot (the
model wants a reclaim, the kernel went on to an OOM), the oracle raises
``Mismatch`` with the reason for that disagreement, which ends the run
(oracle exceptions propagate out of the model call unchanged).  What each
oracle answers, and why it may, is in collector/README.md ("How an
episode is replayed").
"""

from __future__ import annotations

import errno

from memcgscope.model import GFP, PAGE_COUNTER_MAX, OomOutcome
from memcgscope.model.charge import MAX_RECLAIM_RETRIES

from .episode import END, MAY_SWAP, kind_of
from .reasons import Mismatch

__all__ = ["Replay", "classify"]

#: a usage read with no margin: over any limit a scratch kernel has
_FULL = PAGE_COUNTER_MAX
_GFP_KERNEL = GFP.KERNEL


class Replay:
    """Shape steps in, oracles out.  ``mode``: "charge", "v1_limit" or
    "v2_write".  ``cgroups``: rel -> handle of the scratch kernel."""

    def __init__(self, profile, mode, steps, ret, cgroups, *, gfp=0, nr=0,
                 drains_visible=False, high_tail=False, limit_max=0, pf_memalloc=False,
                 exit_max=None, exit_fits=None):
        self.profile, self.mode, self.steps, self.ret = profile, mode, steps, ret
        self.cgroups = cgroups
        self.i = 0
        self.gfp, self.nr = gfp, nr
        self.drains_visible = drains_visible
        self.high_tail = high_tail          # a trailing high reclaim may follow success
        self.limit_max = limit_max
        self.exit_max = exit_max            # a v2 write's memory.max at its return, if recorded
        self.exit_fits = exit_fits          # a charge's memcg within its max at exit, if recorded
        self.pf_memalloc = pf_memalloc      # the variant's task flag (no high reclaim with it)
        self.last = None                    # the last step consumed
        self.retries = MAX_RECLAIM_RETRIES  # the model's nr_retries, for `moving`
        self.nomem = None                   # the model's -ENOMEM reason, once it returned

    # -- cursor ------------------------------------------------------------------
    def peek(self):
        return self.steps[self.i] if self.i < len(self.steps) else END

    def at_end(self):
        return self.i >= len(self.steps)

    def take(self):
        s = self.steps[self.i]
        self.i += 1
        self.last = s
        return s

    def rel_of(self, memcg):
        for rel, m in self.cgroups.items():
            if m is memcg:
                return rel
        return -1

    def mismatch(self, wants, detail=""):
        nxt = self.peek()
        raise Mismatch(classify(self.mode, wants, nxt, self), detail or
                       f"model {wants}, kernel {kind_of(nxt)}"
                       + (f" (ret {self.ret})" if nxt is END else ""))

    # -- oracles -------------------------------------------------------------------
    def attempt(self, memcg, counter, nr):
        """page_counter_try_charge: fails exactly where the next observed step
        is a failure of that counter (at its cgroup), passes where the kernel
        went no further (a stock hit and a counter success look alike)."""
        nxt = self.peek()
        if nxt[0] == "F":
            if nxt[1] == counter:
                if nxt[2] != nr:
                    raise Mismatch("counter_mismatch",
                                   f"model tries {nr} pages on {counter}, kernel {nxt[2]}")
                self.take()
                return self.cgroups.get(nxt[3]) or self.cgroups[0]
            if counter == "memsw" and nxt[1] == "memory":
                return True             # memsw passed, memory will fail
            raise Mismatch("counter_mismatch", f"model tries {counter}, kernel failed {nxt[1]}")
        if nxt is END:
            if self.ret == 0:
                return True
            self.mismatch("retries the charge")
        if nxt[0] == "R" and self.ret == 0 and self.high_tail and not self.pf_memalloc:
            rest = self.steps[self.i:]
            # >= 6.1 sync memory.high reclaim after a successful charge
            # (mem_cgroup_handle_over_high): every remaining step is a
            # may-swap reclaim of the charge's gfp (6.1.0-6.1.55:
            # GFP_KERNEL), the first asking over_high (> BATCH) pages,
            # retries SWAP_CLUSTER_MAX
            high_gfp = self.gfp if self.profile.sync_high_charge_gfp else _GFP_KERNEL
            if (all(s[0] == "R" and s[7] and s[3] == high_gfp for s in rest)
                    and rest[0][2] > self.profile.charge_batch):
                self.i = len(self.steps)
                return True
        self.mismatch("charges again")

    def usage(self, memcg, counter, where):
        """The reads other CPUs can change: the margin after a charge's
        reclaim is what its observed ``after`` says, or room where the
        kernel went on to charge with no other step; the usage of a v2 limit
        loop is over the limit while the kernel went on and within it where
        it stopped; set_max fits where the kernel stopped (unless -EBUSY)."""
        if where == "charge_margin":
            if self.last[6]:
                return 0
            # the read comes after the reclaim's exit probe: an uncharge on
            # another CPU (an OOM victim exiting) can land in between.  A
            # kernel that then charged with no other step saw the room
            # (seen on 6.18.15: 17 passes after an OOM, then 0, not -ENOMEM).
            # Not where the charged memcg ended over its max: that charge
            # was forced (``exit_fits`` False; None: exit not recorded)
            return (0 if self.at_end() and self.ret == 0 and self.exit_fits is not False
                    else _FULL)
        if where == "oom_margin":
            # behind the probe: the observed OOM result says what it decided
            return _FULL
        if where in ("max_write", "high_write"):
            nxt = self.peek()
            if nxt is END:
                return self.limit_max
            if nxt[0] == "R":
                return self.limit_max + nxt[2]      # the reclaim asks usage - max
            return self.limit_max + 1
        if where == "set_max":
            return 0 if self.peek() is END and self.ret != -errno.EBUSY else _FULL + 1
        raise RuntimeError(f"the replay has no answer for a usage read at {where!r}")

    def signal(self, memcg, where):
        """A fatal or pending signal can arrive at any moment, so the model
        sees one only where the kernel stopped: the end of the observation.
        So does the OOM reaper's MMF_OOM_SKIP on a victim's mm (``oom_skip``)
        and a task's death in its memory.high reclaim (``over_high``)."""
        if where in ("force_dying", "passed_oom", "oom_skip", "over_high"):
            return self.at_end()
        if where == "oom_dying":
            # ≤ 6.14 mem_cgroup_out_of_memory's task_is_dying() is behind the
            # probe: the observed OOM result already says what it decided
            return False
        if where == "resize":
            return self.at_end() and self.ret == -errno.EINTR
        if where in ("max_write", "high_write"):
            return self.at_end()
        raise RuntimeError(f"the replay has no answer for a signal at {where!r}")

    def superseded(self, memcg, where):
        """Another writer's limit can land at any moment: seen only where the
        kernel stopped, and not when the limit at the write's return is the
        one written (then nobody superseded it)."""
        if not self.at_end():
            return False
        return self.exit_max is None or self.exit_max != self.limit_max

    def memcg_dying(self, memcg, where):
        """An rmdir can start at any moment: seen only where the kernel
        stopped (v1 resize: with its -EBUSY, the set_max failure it keeps)."""
        if where == "resize":
            return self.at_end() and self.ret == -errno.EBUSY
        if where in ("max_write", "high_write"):
            return self.at_end()
        raise RuntimeError(f"the replay has no answer for memcg_is_dying at {where!r}")

    def moving(self, over):
        """v1 <= 6.12 mem_cgroup_wait_acct_move: a charge move in progress
        sends the loop back to retry without using a retry.  Asked where the
        model is about to use one: ``retries`` mirrors the model's count, and
        only a kernel that retried with none left is explained by a move."""
        if self.retries > 0:
            self.retries -= 1
            return False
        return self.peek()[0] == "F"

    def reclaim(self, target, nr, gfp, may_swap=True):
        nxt = self.peek()
        if nxt[0] != "R":
            self.mismatch("reclaims")
        rel = self.rel_of(target)
        if nxt[1] is not None and nxt[1] != rel:
            raise Mismatch("target_mismatch", f"model reclaims cgroup #{rel}, kernel #{nxt[1]}")
        if nxt[2] != nr or nxt[3] != gfp:
            raise Mismatch("reclaim_args", f"model reclaims {nr} pages gfp {gfp:#x}, "
                                           f"kernel {nxt[2]} gfp {nxt[3]:#x}")
        if self.profile.reclaim_signature == "may_swap":
            want_opt = int(may_swap)
        else:
            want_opt = MAY_SWAP if may_swap else 0
        if nxt[4] is not None and nxt[4] != want_opt:
            raise Mismatch("reclaim_args", f"model reclaim options {want_opt}, kernel {nxt[4]}")
        self.take()
        return 1 if nxt[5] else 0

    def drain(self, target, cpu):
        nxt = self.peek()
        if nxt[0] == "D":
            if nxt[1] is not None and nxt[1] != self.rel_of(target):
                raise Mismatch("target_mismatch", "drain of another cgroup")
            self.take()
            return "skipped"      # the scratch stocks are empty: nothing to give back
        if self.drains_visible:
            raise Mismatch("missing_drain", f"model drains, kernel {kind_of(nxt)}")
        # the drain probe sits on a clone entered only past the mutex trylock:
        # a drain that found another one running is invisible
        return "skipped"

    def oom(self, target, order, gfp):
        kills = 0
        while self.peek()[0] == "K":
            self.take()
            kills += 1
        nxt = self.peek()
        if nxt[0] != "O":
            if kills:
                raise Mismatch("oom_kill_outside_oom", "a kill not followed by its OOM call")
            self.mismatch("calls the OOM killer")
        rel = self.rel_of(target)
        if nxt[1] is not None and nxt[1] != rel:
            raise Mismatch("target_mismatch", f"model OOMs cgroup #{rel}, kernel #{nxt[1]}")
        if nxt[3] != order:
            raise Mismatch("oom_order", f"model OOM order {order}, kernel {nxt[3]}")
        self.take()
        if nxt[4]:
            self.retries = MAX_RECLAIM_RETRIES   # passed_oom: the retries start again
        return OomOutcome(result=bool(nxt[4]), victim=target if kills else None)


def classify(mode, wants, nxt, r) -> str:
    """The reason for 'the model wants X, the kernel did Y next'."""
    k = nxt[0]
    if k == "D":
        return "unexpected_drain"
    if wants in ("retries the charge", "charges again"):
        if k == "R":
            return "reclaim_without_failure"
        if k in ("O", "K"):
            return "oom_early"
        return "enomem_early" if r.ret == -errno.ENOMEM else "ret_mismatch"
    if wants == "reclaims":
        if k in ("O", "K"):
            return "oom_early" if mode != "v1_limit" else "unexpected_oom"
        if k == "F":
            return "missing_reclaim"
        if mode == "v1_limit" and r.last is not None and r.last[0] == "R" and r.last[5]:
            return "ebusy_after_progress"
        if mode == "charge" and r.ret == -errno.ENOMEM:
            return "enomem_early"
        return "ret_mismatch"
    if wants == "calls the OOM killer":
        if k in ("F", "R"):
            return "retry_budget"
        return "missing_oom"
    # the model returned
    if k in ("F", "R"):
        if mode == "charge" and r.nomem == "no_direct_reclaim":
            return "reclaim_not_allowed"
        return "retry_budget"
    if k in ("O", "K"):
        # another OOM after one that failed: the kernel should have stopped
        return "retry_budget" if r.nomem == "oom" else "unexpected_oom"
    return "ret_mismatch"
