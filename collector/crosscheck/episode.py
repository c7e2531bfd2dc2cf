"""An episode as the replay sees it: its *shape*, and the validation of
the fields the checker reads.

The shape of an episode's steps is a tuple the replay and the cache key
use (shape steps):

* ``("F", counter, nr, rel)``: counter_fail;
* ``("R", rel, nr, gfp, options, progress, margin_ok, may_swap)``: reclaim
  (``margin_ok`` None when the ``after`` counters are unknown);
* ``("D", rel)``: drain;
* ``("O", rel, gfp, order, result)``: oom (mem_cgroup_out_of_memory; the
  result as recorded, a bool);
* ``("K", rel)``: oom_kill.

``rel`` is 0 for the episode's memcg, 1.. for the other cgroups in order of
appearance, None when the step does not say.

Validation.  A verdict must not depend on what the cache holds.  So the
few fields the fast path uses outside the cache key are checked on every
episode, by type (the charged memcg's id; a v1 limit write's value; a page
charge's gfp, size and return value); the fields a key is built from are
validated once per key (``problem_of`` runs before every full replay), by
*value*, the way the key compares them: a number is valid if it equals a
valid integer (``1.0`` is 1; the replay takes the integer), a field that is
only compared or added may be any real number.  Everything else is judged
only if it breaks a computation: the fast path raises without naming it,
and ``problem_of`` then names the field.
"""

from __future__ import annotations

from collections.abc import Mapping

from .reasons import BadInput

__all__ = ["END", "MAY_SWAP", "shape_of", "as_ints", "problem_of", "counters_problem", "exit_fits",
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
        if k == "oom":
            # first: an OOM loop (a memory.max write's, a killed task's
            # charge) repeats it hundreds of times; the result as given
            # (true == 1): validated with the key
            add(("O", rel, s.get("gfp"), s["order"], s["result"]))
        elif k == "counter_fail":
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
            s = ("O", s[1], None if s[2] is None else int(s[2]), int(s[3]), bool(s[4]))
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
    ``required``: the key must be there; ``null``: None is allowed."""

    def __init__(self, d, where=""):
        self.d, self.where = d, where

    def _get(self, key, required, null):
        if key not in self.d:
            return (f"{self.where}{key}: missing" if required else None), True
        v = self.d[key]
        if v is None and null:
            return None, True
        return v, False

    def _check(self, key, ok, what, required, null, minimum=None):
        v, done = self._get(key, required, null)
        if done:
            return v
        if not ok(v):
            return f"{self.where}{key}: expected {what}, got {_type(v)}"
        if minimum is not None and v < minimum:
            return f"{self.where}{key}: {v} is below {minimum}"
        return None

    def exact(self, key, required=True, null=False, minimum=None):
        """An int, by type: a field checked on every episode."""
        return self._check(key, lambda v: type(v) is int, "an integer", required, null, minimum)

    def int(self, key, required=True, null=False, minimum=None):
        """A number equal to an integer: a field of the cache key."""
        return self._check(key, _whole, "an integer", required, null, minimum)

    def real(self, key, required=True, null=False):
        """Any number: a field that is only compared or added."""
        return self._check(key, _real, "a number", required, null)

    def str(self, key, required=True, null=False, choices=None):
        p = self._check(key, lambda v: isinstance(v, str), "a string", required, null)
        v = self.d.get(key)
        if not p and choices is not None and v is not None and v not in choices:
            p = f"{self.where}{key}: {v!r} is not one of {', '.join(choices)}"
        return p

    def hashable(self, key):
        try:
            hash(self.d.get(key))
        except TypeError:
            return f"{self.where}{key}: expected an id, got {_type(self.d.get(key))}"
        return None

    def counters(self, key, fields, memsw=True, empty=True):
        """entry / exit / after: absent or null (unknown; ``empty``: {} too),
        else a mapping whose ``fields`` are numbers (the memsw ones read only
        with ``memsw``, and then together)."""
        v = self.d.get(key)
        if v is None or (empty and isinstance(v, Mapping) and not v):
            return None
        if not isinstance(v, Mapping):
            return f"{self.where}{key}: expected an object, got {_type(v)}"
        sub = _Fields(v, f"{self.where}{key}.")
        for name in fields:
            p = sub.real(name, required=fields[name])
            if p:
                return p
        if memsw and "memsw_max" in v:
            return sub.real("memsw_max") or sub.real("memsw_usage")
        return None


def _steps_problem(ep, memsw) -> str | None:
    steps = ep.get("steps")
    if not steps:
        return None         # absent, null or empty: no steps
    if not isinstance(steps, (list, tuple)):
        return f"steps: expected a list, got {_type(steps)}"
    for i, s in enumerate(steps):
        where = f"steps[{i}]"
        if not isinstance(s, Mapping):
            return f"{where}: expected an object, got {_type(s)}"
        f = _Fields(s, where + ".")
        kind = s.get("kind")
        p = f.str("kind", choices=_STEP_KINDS) or f.int("cgroup_id", required=False, null=True)
        if p:
            return p
        if kind == "counter_fail":
            p = f.str("counter", choices=("memory", "memsw")) or f.int("nr_pages", minimum=1)
        elif kind == "reclaim":
            p = (f.int("nr_pages") or f.int("gfp") or f.real("freed")
                 or f.counters("after", _USAGE_MAX, memsw, empty=False))
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


_USAGE_MAX = {"usage": True, "max": True}


def problem_of(ep, cgroup: str, memsw: bool = False) -> str | None:
    """The first problem with the fields of ``ep`` the checker reads, as
    "field: what is wrong", or None.  The kinds' own rules (an oom_kill
    without a victim, a limit file of the other hierarchy) are the
    checks', not this; so are a charge's entry and exit, read only for
    ``over_max`` (``counters_problem``)."""
    if not isinstance(ep, Mapping):
        return f"episode: expected an object, got {_type(ep)}"
    kind = ep.get("kind")
    f = _Fields(ep)
    timing = (f.real("ts_ns", required=False) or f.real("duration_ns", required=False, null=True)
              or f.hashable("tid"))
    if kind == "charge":
        return (f.exact("cgroup_id") or f.int("gfp") or f.int("nr_pages", minimum=1)
                or f.int("ret") or timing or _steps_problem(ep, memsw))
    if kind == "limit_write":
        p = f.exact("cgroup_id") or f.str("file") or f.int("ret") or _steps_problem(ep, memsw)
        if p:
            return p
        if ep["file"] in _V1_FILES and cgroup == "v1":
            return (f.exact("value", minimum=0)
                    or f.counters("entry", {"max": False, "memsw_max": False}, memsw=False))
        ex = ep.get("exit")
        return (f.str("text", required=False, null=True)
                or f.int("value", required=False, null=True)
                or (None if not ex else f.counters("exit", {}, memsw=False)
                    or _Fields(ex, "exit.").int("max", required=False, null=True)))
    if kind == "page_charge_fail":
        return (f.exact("ret") or f.exact("nr_pages", minimum=1) or f.exact("gfp") or timing)
    return None


def counters_problem(ep, key, memsw: bool) -> str | None:
    """The problem with ``ep[key]`` as counters (a charge's entry or exit)."""
    return _Fields(ep).counters(key, _USAGE_MAX, memsw)


def exit_fits(ep, memsw: bool):
    """Whether a charge's memcg ended within its limits (``exit`` usage <=
    max, and memsw where recorded): a forced charge into a full counter
    leaves it over.  None where the exit was not recorded."""
    ex = ep.get("exit")
    if not ex:
        return None
    try:
        fits = ex["usage"] <= ex["max"]
        if memsw and "memsw_max" in ex:
            fits = fits and ex["memsw_usage"] <= ex["memsw_max"]
        return bool(fits)
    except (AttributeError, KeyError, TypeError):
        raise BadInput(counters_problem(ep, "exit", memsw) or "exit: expected counters") from None


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
