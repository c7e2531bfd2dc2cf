"""Helpers for the model's unit tests (a plain module: test files import it)."""

from __future__ import annotations

from memcgscope.model import GFP, Kernel
from memcgscope.model.stock import drain_local_stock

ALL = ["5.10", "5.15", "6.1", "6.6", "6.12", "6.18", "7.2", "7.3"]
LIMIT_FILE = {"v1": "memory.limit_in_bytes", "v2": "memory.max"}


def pages(n: int) -> str:
    """``n`` pages as the byte string a limit file takes."""
    return str(n * 4096)


def limited(profile: str, cgroup: str, limit: int, cpus: int = 1, **kw):
    """A kernel with cgroup ``/a`` limited to ``limit`` pages."""
    k = Kernel(profile, cgroup=cgroup, cpus=cpus, **kw)
    a = k.mkdir("a")
    assert k.write(a, LIMIT_FILE[cgroup], pages(limit)) == 0
    return k, a


def drop_stock(k, cpu: int = 0) -> None:
    """This CPU's stock goes back to the counters."""
    drain_local_stock(k, cpu, "test", None)


def fill(k, m, n: int, cpu: int = 0):
    """Charge ``n`` pages to ``m`` and leave nothing in the stock."""
    r = k.charge(m, n, GFP.KERNEL, cpu)
    assert r.ret == 0, r.steps
    drop_stock(k, cpu)
    return r


def freeing(*values):
    """A reclaim oracle answering ``values`` in order, then 0; it records calls."""
    it = iter(values)
    calls = []

    def reclaim(target, nr, gfp):
        calls.append((target.path, nr, gfp))
        return next(it, 0)
    reclaim.calls = calls
    return reclaim
