"""The shape cache: replay outcomes by episode key.

Two segments.  A new key enters *probation*; a key looked up again while
in probation is promoted to the *protected* segment.  Each segment, when
full, drops its oldest entry (probation: the oldest inserted; protected:
the oldest promoted, which goes back to probation and is promoted again at
its next use).  A flood of keys seen once (a buggy probe, a fuzzer, a
workload whose shapes never repeat) therefore only cycles probation and
cannot evict the shapes that keep coming back.

Hits on protected keys, the common case, cost one dict lookup: ``hot`` is
that segment's ``get``.  No recency is kept inside a segment, on purpose:
it would cost every hit a second call.
"""

from __future__ import annotations

__all__ = ["ShapeCache"]


class ShapeCache:
    def __init__(self, size: int, protected_share: float = 0.8):
        if size < 2:
            raise ValueError(f"cache size must be at least 2, not {size}")
        self.protected_max = max(1, int(size * protected_share))
        self.probation_max = max(1, size - self.protected_max)
        self._protected: dict = {}
        self._probation: dict = {}
        #: the lookup of the common case: a protected key, or None
        self.hot = self._protected.get

    def __len__(self) -> int:
        return len(self._protected) + len(self._probation)

    def __contains__(self, key) -> bool:
        return key in self._protected or key in self._probation

    def get(self, key):
        """The outcome of ``key`` or None; a key found in probation is promoted."""
        out = self._protected.get(key)
        if out is not None:
            return out
        out = self._probation.pop(key, None)
        if out is not None:
            prot = self._protected
            prot[key] = out
            if len(prot) > self.protected_max:
                old = next(iter(prot))
                self._to_probation(old, prot.pop(old))
        return out

    def put(self, key, value) -> None:
        if value is None:
            raise ValueError("None is not a cacheable outcome")
        if key in self._protected:
            self._protected[key] = value
            return
        self._probation.pop(key, None)
        self._to_probation(key, value)

    def _to_probation(self, key, value) -> None:
        prob = self._probation
        prob[key] = value
        if len(prob) > self.probation_max:
            del prob[next(iter(prob))]
