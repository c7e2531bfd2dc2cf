"""An episode as the replay sees it: its *shape*, and the validation of
the fields the checker reads.

The shape of an episode's steps is a tuple the replay and the cache key
use (shape steps):

* ``("F", counter, nr, rel)``: counter_fail;
* ``("R", rel, nr, gfp, options, progress, margin_ok, may_swap)``: reclaim
  (``margin_ok`` None when the ``after`` counters are unknown);
* ``("D", rel)``: drain;
* ``("O", rel, gfp, order, result)``: oom (mem_cgroup_out_of_memory);
* ``("K", rel)``: oom_kill.

``rel`` is 0 for the episode's memcg, 1.. for the other cgroups in order of
appearance, None when the step does not say.

Validation.  A verdict must not depend on what the cache holds, so the
fields a charge's cache key is built from are validated by *value*, the
way the key compares them: a number is valid if it equals a valid integer
(``1.0`` is 1), a field that is only compared or added may be any real
number, and the replay (run once per key) takes the integer values.  The
fast path (``shape_of``, the checker's reads) raises as soon as something
cannot be used, without naming it; ``problem_of`` then names the field,
and it also runs before every full replay, so a key in the cache always
comes from a valid episode and a hit needs no further validation.
Limit writes and page-charge failures are rare: they are validated in
full, every time.
"""

from __future__ import annotations

from collections.abc import Mapping

from .reasons import BadInput

__all__ = ["END", "MAY_SWAP", "shape_of", "as_ints", "problem_of", "counters_problem",
           "ancestry_fn", "kind_of"]

END = ("E",)            # the cursor past the last step
MAY_SWAP = 1 << 1       # MEMCG_RECLAIM_MAY_SWAP (≥ 6.1 reclaim options)
_STEP_KINDS = ("counter_fail", "reclaim", "drain", "oom", "oom_kill")
_V1_FILES = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes")


def kind_of(step) -> str:
    return "end" if step is END else {"F": "counter_fail", "R": "reclaim", "D": "drain",
                                      "O": "oom", "K": "oom_kill"}[step[0]]


def shape_of(steps, cid, memsw: bool):
    """(shape steps, rel -> cgroup id) of an episode's steps.  Hot: every
    episode builds its shape, so the common cases come first."""
    rels = None
    ids = [cid]
    out = []
    add = out.append
    for s in steps:
        k = s["kind"]
        g = s.get("cgroup_id")
        if g == cid:
            rel = 0
        elif g is None:
            rel = None
        else:
            if not _whole(g):
                raise BadInput()
            if rels is None:
                rels = {cid: 0}
            rel = rels.get(g)
            if rel is None:
                rel = rels[g] = len(ids)
                ids.append(g)
        if k == "counter_fail":
            add(("F", s["counter"], s["nr_pages"], rel))
        elif k == "reclaim":
            nr = s["nr_pages"]
            a = s.get("after")
            if a is None:
                margin = None
            else:
                margin = a["max"] - a["usage"]
                if memsw and "memsw_max" in a:
                    m2 = a["memsw_max"] - a["memsw_usage"]
                    if m2 < margin:
                        margin = m2
                margin = margin >= nr
            opt = s.get("options")
            add(("R", rel, nr, s["gfp"], opt, s["freed"] > 0, margin,
                 opt is None or bool(opt & MAY_SWAP)))
        elif k == "drain":
            add(("D", rel))
        elif k == "oom":
            result = s["result"]
            if not isinstance(result, int):     # bool is an int
                raise BadInput()
            add(("O", rel, s.get("gfp"), s["order"], bool(result)))
        elif k == "oom_kill":
            add(("K", rel))
        else:
            raise BadInput(f"steps: unknown step kind {k!r}")
    return tuple(out), ids


def as_ints(shape) -> tuple:
    """The shape with its numbers as ints (a key matches by value: 1.0 is
    1), as the replay takes them."""
    out = []
    for s in shape:
        if s[0] == "F":
            s = ("F", s[1], int(s[2]), s[3])
        elif s[0] == "R":
            s = ("R", s[1], int(s[2]), int(s[3]), None if s[4] is None else int(s[4])) + s[5:]
        elif s[0] == "O":
            s = ("O", s[1], None if s[2] is None else int(s[2]), int(s[3]), s[4])
        out.append(s)
    return tuple(out)


# -- validation ----------------------------------------------------------------------

def _whole(v) -> bool:
    """A number equal to an integer (JSON gives ints; 1.0 and true compare equal)."""
    return isinstance(v, int) or (isinstance(v, float) and v.is_integer())


def _real(v) -> bool:
    return isinstance(v, (int, float))


def _type(v) -> str:
    return f"{v!r} ({type(v).__name__})"


class _Fields:
    """Checks one mapping's fields; each method returns the problem or None.
    ``required``: the key must be there; ``null``: None is allowed;
    ``strict``: an int and nothing else (fields validated on every
    episode), else anything equal to one."""

    def __init__(self, d, where="", strict=False):
        self.d, self.where, self.strict = d, where, strict

    def _get(self, key, required, null):
        if key not in self.d:
            return (f"{self.where}{key}: missing" if required else None), True
        v = self.d[key]
        if v is None and null:
            return None, True
        return v, False

    def int(self, key, required=True, null=False, minimum=None):
        v, done = self._get(key, required, null)
        if done:
            return v
        if not (type(v) is int if self.strict else _whole(v)):
            return f"{self.where}{key}: expected an integer, got {_type(v)}"
        if minimum is not None and v < minimum:
            return f"{self.where}{key}: {v} is below {minimum}"
        return None

    def real(self, key, required=True, null=False):
        v, done = self._get(key, required, null)
        if done:
            return v
        if not (type(v) is int if self.strict else _real(v)):
            return f"{self.where}{key}: expected a number, got {_type(v)}"
        return None

    def str(self, key, required=True, null=False, choices=None):
        v, done = self._get(key, required, null)
        if done:
            return v
        if not isinstance(v, str):
            return f"{self.where}{key}: expected a string, got {_type(v)}"
        if choices is not None and v not in choices:
            return f"{self.where}{key}: {v!r} is not one of {', '.join(choices)}"
        return None

    def hashable(self, key):
        v = self.d.get(key)
        try:
            hash(v)
        except TypeError:
            return f"{self.where}{key}: expected an id, got {_type(v)}"
        return None

    def counters(self, key, memsw=True, empty=True):
        """entry / exit / after: absent or null (unknown; ``empty``: {} too),
        else {usage, max[, memsw_usage, memsw_max]} (memsw ones read only
        with ``memsw``, and then together)."""
        v = self.d.get(key)
        if v is None or (empty and isinstance(v, Mapping) and not v):
            return None
        if not isinstance(v, Mapping):
            return f"{self.where}{key}: expected an object, got {_type(v)}"
        sub = _Fields(v, f"{self.where}{key}.", self.strict)
        p = sub.real("usage") or sub.real("max")
        if not p and memsw and "memsw_max" in v:
            p = sub.real("memsw_max") or sub.real("memsw_usage")
        return p


def _steps_problem(ep, memsw, strict) -> str | None:
    steps = ep.get("steps")
    if not steps:
        return None         # absent, null or empty: no steps
    if not isinstance(steps, (list, tuple)):
        return f"steps: expected a list, got {_type(steps)}"
    for i, s in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(s, Mapping):
            return f"{where}: expected an object, got {_type(s)}"
        f = _Fields(s, where + ".", strict)
        kind = s.get("kind")
        p = f.str("kind", choices=_STEP_KINDS) or f.int("cgroup_id", required=False, null=True)
        if p:
            return p
        if kind == "counter_fail":
            p = f.str("counter", choices=("memory", "memsw")) or f.int("nr_pages", minimum=1)
        elif kind == "reclaim":
            p = (f.int("nr_pages") or f.int("gfp") or f.real("freed")
                 or f.counters("after", memsw, empty=False))
            opt = s.get("options")
            if not p and opt is not None and not isinstance(opt, int):   # it is and-ed
                p = f"{where}.options: expected an integer, got {_type(opt)}"
        elif kind == "oom":
            p = f.int("order", minimum=0) or f.int("gfp", required=False, null=True)
            if not p and not isinstance(s.get("result"), int):
                p = f"{where}.result: expected a boolean, got {_type(s.get('result'))}"
        if p:
            return p
    return None


def problem_of(ep, cgroup: str, memsw: bool = False) -> str | None:
    """The first problem with the fields of ``ep`` the checker reads, as
    "field: what is wrong", or None.  The kinds' own rules (an oom_kill
    without a victim, a limit file of the other hierarchy) are the
    checks', not this; so are a charge's entry and exit, read only for
    ``over_max``."""
    if not isinstance(ep, Mapping):
        return f"episode: expected an object, got {_type(ep)}"
    kind = ep.get("kind")
    if kind == "charge":
        f = _Fields(ep)
        return (f.int("cgroup_id") or _strict_int(ep, "cgroup_id") or f.int("gfp")
                or f.int("nr_pages", minimum=1) or f.int("ret") or f.real("ts_ns", required=False)
                or f.real("duration_ns", required=False, null=True) or f.hashable("tid")
                or _steps_problem(ep, memsw, False))
    f = _Fields(ep, strict=True)
    common = (f.int("ts_ns", required=False) or f.int("duration_ns", required=False, null=True)
              or f.int("tid", required=False, null=True))
    if kind == "limit_write":
        p = (f.int("cgroup_id") or f.str("file") or f.int("ret") or common
             or _steps_problem(ep, memsw, True))
        if p:
            return p
        if ep["file"] in _V1_FILES and cgroup == "v1":
            return f.int("value", minimum=0) or f.counters("entry", memsw)
        return (f.str("text", required=False, null=True)
                or f.int("value", required=False, null=True) or f.counters("exit", memsw))
    if kind == "page_charge_fail":
        return f.int("ret") or f.int("nr_pages", minimum=1) or f.int("gfp") or common
    return None


def counters_problem(ep, key, memsw: bool) -> str | None:
    """The problem with ``ep[key]`` as counters (a charge's entry or exit)."""
    return _Fields(ep).counters(key, memsw)


def _strict_int(ep, key):
    # the fast path takes the charged memcg's id as is (not in the key)
    v = ep[key]
    return None if type(v) is int else f"{key}: expected an integer, got {_type(v)}"


# -- ancestry --------------------------------------------------------------------------

def ancestry_fn(ancestors):
    """``ancestors``: None, a callable ``id -> [ancestor ids] | None``, or a
    mapping ``id -> cgroup path`` (ancestors are the ids of parent paths)."""
    if ancestors is None or callable(ancestors):
        return ancestors
    if isinstance(ancestors, Mapping):
        paths = {int(k): "/" + "/".join(x for x in str(v).split("/") if x) for k, v in ancestors.items()}
        by_path = {p: i for i, p in paths.items()}

        def fn(cid):
            p = paths.get(cid)
            if p is None:
                return None
            out = []
            while p != "/":
                p = p.rsplit("/", 1)[0] or "/"
                if p in by_path:
                    out.append(by_path[p])
            return out
        return fn
    raise TypeError("ancestors must be None, a callable or a mapping of cgroup id to path")
