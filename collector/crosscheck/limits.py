"""The limit-write replay: v1 ``mem_cgroup_resize_max``
(memory.limit_in_bytes, memory.memsw.limit_in_bytes) and v2
``memory_max_write`` / ``memory_high_write``, run by writing the file on a
scratch ``Kernel`` with the observation answering every oracle."""

from __future__ import annotations

from memcgscope.model import PAGE_COUNTER_MAX, PAGE_SIZE, Task
from memcgscope.model.page_counter import page_counter_memparse

from .charge import model_events, scratch_kernel
from .reasons import Mismatch
from .replay import Replay

__all__ = ["V1_FILES", "V2_FILES", "replay_v1_limit", "replay_v2_limit", "BIG"]

V1_FILES = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")
V2_FILES = ("memory.max", "memory.high")
#: memsw.max when the entry counters do not say: far from any observed size
BIG = 1 << 40


def _limit_text(pages: int) -> str:
    """What a v1 limit file takes for ``pages`` ("-1": unlimited)."""
    return "-1" if pages >= PAGE_COUNTER_MAX else str(pages * PAGE_SIZE)


def _set_limit(k, m, fname, pages):
    ret = k.write(m, fname, _limit_text(pages))
    if ret:
        raise RuntimeError(f"scratch kernel: setting {m.path}/{fname} to {pages} pages gave {ret}")


def _entry_limits(k, leaf, fname, pages, inv):
    """The other counter's limit, which the resize checks its memsw.max >=
    memory.max invariant against: ``inv`` says whether the entry counters
    let ``pages`` pass it, and that is all the replay depends on."""
    if fname == "memory.memsw.limit_in_bytes":
        # memsw.max = pages must stay >= memory.max
        _set_limit(k, leaf, "memory.limit_in_bytes", 0 if inv else min(pages + 1, PAGE_COUNTER_MAX))
    elif leaf.memsw is not None:
        # memory.max = pages must stay <= memsw.max (lowered after memory.max)
        memsw_max = PAGE_COUNTER_MAX if inv else max(pages - 1, 0)
        _set_limit(k, leaf, "memory.limit_in_bytes", memsw_max)
        _set_limit(k, leaf, "memory.memsw.limit_in_bytes", memsw_max)


def run_write(cc, mode, shape, ret, fname, text, *, limit_max=0, inv=True, exit_max=None):
    """→ (verdict, reason, detail, events).  ``exit_max``: a v2 memory.max
    write's limit at its return, if recorded (the superseded oracle)."""
    nrel = 1 + max(((s[3] if s[0] == "F" else s[1]) or 0) for s in shape) if shape else 1
    k, cgroups = scratch_kernel(cc.profile, cc.cgroup, cc.memsw, nrel)
    leaf = cgroups[0]
    if mode == "v1_limit":
        _entry_limits(k, leaf, fname, limit_max, inv)
    r = Replay(cc.profile, mode, shape, ret, cgroups, drains_visible=cc.drains_visible,
               limit_max=limit_max, exit_max=exit_max)
    try:
        out = k.write_ex(leaf, fname, text, reclaim=r.reclaim, oom=r.oom, drain=r.drain,
                         task=Task(in_user_fault=False), usage=r.usage, signal=r.signal,
                         superseded=r.superseded, memcg_dying=r.memcg_dying)
        oom_steps = [s for s in out.steps if s.kind == "oom"]
        if oom_steps and not oom_steps[-1].ret:
            r.nomem = "oom"
        if not r.at_end():
            r.mismatch("returns")
        model_ret = out.ret
        if mode == "v2_write":
            # the kernel returns the byte count, the model 0
            want_ok = ret >= 0
            if (model_ret == 0) != want_ok or (not want_ok and model_ret != ret):
                raise Mismatch("ret_mismatch", f"model returns {model_ret}, kernel {ret}")
        elif model_ret != ret:
            raise Mismatch("ret_mismatch", f"model returns {model_ret}, kernel {ret}")
    except Mismatch as m:
        return ("divergent", m.reason, m.detail, ())
    return ("ok", "", "", model_events(cgroups))


def replay_v1_limit(cc, ep, fname, ret, shape, inv):
    """``inv``: the entry counters let the value pass the memsw.max >=
    memory.max invariant."""
    if not ep.get("entry"):
        return ("skipped", "", "", ())
    cc.replays += 1
    pages = min(ep["value"], PAGE_COUNTER_MAX)
    return run_write(cc, "v1_limit", shape, ret, fname, _limit_text(pages), limit_max=pages, inv=inv)


def replay_v2_limit(cc, ep, fname, ret, shape):
    text = ep.get("text")
    value = ep.get("value")
    if value is not None:
        value = int(value)          # validated: a whole number
    if text is None or (value is not None and len(text) < value and len(text) >= 23):
        # the probe keeps 23 bytes; a longer value cannot be parsed back
        ex = ep.get("exit") or {}
        if ex.get("max") is None or fname != "memory.max":
            return ("skipped", "", "", ())
        mx = int(ex["max"])
        text = "max" if mx >= (1 << 63) // PAGE_SIZE else str(mx * PAGE_SIZE)
    err, pages = page_counter_memparse(text.strip(), "max")
    if err:
        if shape or ret != err:
            return ("divergent", "ret_mismatch", f"model returns {err} for {text!r}, kernel {ret}", ())
        return ("ok", "", "", ())
    if ret >= 0 and value is not None and ret != value:
        return ("divergent", "ret_mismatch", f"write of {value} bytes returned {ret}", ())
    cc.replays += 1
    ex_max = (ep.get("exit") or {}).get("max") if fname == "memory.max" else None
    return run_write(cc, "v2_write", shape, ret, fname, text, limit_max=pages,
                     exit_max=None if ex_max is None else int(ex_max))
