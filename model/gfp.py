"""GFP flags (``include/linux/gfp.h``, ``gfp_types.h`` from 6.0).

The bit numbers below were checked to be the same in every profile
(5.10 → 6.18).  What changes between versions:

* ``__GFP_ATOMIC`` (0x200) exists up to 6.1 and is gone by 6.6 (the model
  ignores the bit on profiles without it), so ``GFP_ATOMIC`` is 0xa20 on
  5.x and 0x820 on 6.x.
* ``GFP_NOWAIT`` gained ``__GFP_NOWARN`` on the newest kernels (6.18 here).

``GFP`` holds the 6.x values; ``GFP.for_profile("5.15")`` gives the values
as that profile defines them.  ``parse_gfp`` turns ``"KERNEL|NORETRY"`` or a
number into an int, for scenario files.
"""

from __future__ import annotations

import types

__all__ = ["GFP", "parse_gfp", "gfp_names", "order_of", "reclaim_gfp"]

_BITS = {
    "DMA": 0x01,
    "HIGHMEM": 0x02,
    "DMA32": 0x04,
    "MOVABLE": 0x08,
    "RECLAIMABLE": 0x10,
    "HIGH": 0x20,
    "IO": 0x40,
    "FS": 0x80,
    "ZERO": 0x100,
    "ATOMIC": 0x200,          # __GFP_ATOMIC: 5.10 .. 6.1 only
    "DIRECT_RECLAIM": 0x400,
    "KSWAPD_RECLAIM": 0x800,
    "WRITE": 0x1000,
    "NOWARN": 0x2000,
    "RETRY_MAYFAIL": 0x4000,
    "NOFAIL": 0x8000,
    "NORETRY": 0x10000,
    "MEMALLOC": 0x20000,
    "COMP": 0x40000,
    "NOMEMALLOC": 0x80000,
    "HARDWALL": 0x100000,
    "THISNODE": 0x200000,
    "ACCOUNT": 0x400000,
}

_RECLAIM = _BITS["DIRECT_RECLAIM"] | _BITS["KSWAPD_RECLAIM"]


def _composites(atomic_bit: bool, nowait_nowarn: bool) -> dict[str, int]:
    b = _BITS
    kernel = _RECLAIM | b["IO"] | b["FS"]
    highuser_movable = kernel | b["HARDWALL"] | b["HIGHMEM"] | b["MOVABLE"]
    light = (highuser_movable | b["COMP"] | b["NOMEMALLOC"] | b["NOWARN"]) & ~_RECLAIM
    return {
        "RECLAIM": _RECLAIM,
        "KERNEL": kernel,
        "KERNEL_ACCOUNT": kernel | b["ACCOUNT"],
        "NOIO": _RECLAIM,
        "NOFS": _RECLAIM | b["IO"],
        "USER": kernel | b["HARDWALL"],
        "HIGHUSER": kernel | b["HARDWALL"] | b["HIGHMEM"],
        "HIGHUSER_MOVABLE": highuser_movable,
        "NOWAIT": b["KSWAPD_RECLAIM"] | (b["NOWARN"] if nowait_nowarn else 0),
        "ATOMIC": b["HIGH"] | b["KSWAPD_RECLAIM"] | (b["ATOMIC"] if atomic_bit else 0),
        "TRANSHUGE_LIGHT": light,
        "TRANSHUGE": light | b["DIRECT_RECLAIM"],
    }


class GFP:
    """GFP bits (``GFP.__GFP_X``, also ``GFP.X``) and composites
    (``GFP.KERNEL`` for GFP_KERNEL, …).  Where a composite and a bit share a
    name the composite wins: ``GFP.ATOMIC`` is GFP_ATOMIC, the bit is
    ``GFP.__GFP_ATOMIC``.

    Composite values are those of 6.6–6.12; use ``for_profile`` for the
    values of a given profile.
    """

    locals().update(_BITS)
    locals().update({f"__GFP_{k}": v for k, v in _BITS.items()})
    locals().update(_composites(atomic_bit=False, nowait_nowarn=False))

    @staticmethod
    def for_profile(profile) -> types.SimpleNamespace:
        """The bits and composites as ``profile`` (a Profile or name) defines them."""
        from .profiles import get_profile

        p = get_profile(profile) if isinstance(profile, str) else profile
        values = dict(_BITS)
        values.update({f"__GFP_{k}": v for k, v in _BITS.items()})
        if not p.has_gfp_atomic:
            del values["ATOMIC"], values["__GFP_ATOMIC"]
        values.update(_composites(p.has_gfp_atomic, p.gfp_nowait_has_nowarn))
        return types.SimpleNamespace(**values)

    @staticmethod
    def names(profile=None) -> list[str]:
        ns = GFP.for_profile(profile) if profile is not None else None
        keys = list(_composites(True, False)) + list(_BITS)
        if ns is not None:
            keys = [k for k in keys if hasattr(ns, k)]
        return keys


def parse_gfp(text, profile=None) -> int:
    """``"KERNEL|NORETRY"``, ``"__GFP_HIGH"``, ``"GFP_KERNEL"``, ``"0x1c20ca"`` or an int.

    Raises ValueError naming the unknown word.
    """
    if isinstance(text, bool):
        raise ValueError(f"gfp must be a name or a number, not {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"gfp must not be negative: {text}")
        return text
    ns = GFP.for_profile(profile) if profile is not None else GFP
    value = 0
    for word in str(text).split("|"):
        word = word.strip()
        if not word:
            raise ValueError(f"empty gfp term in {text!r}")
        try:
            value |= int(word, 0)
            continue
        except ValueError:
            pass
        key = word.upper()
        if key.startswith("GFP_"):
            key = key[len("GFP_"):]
        v = getattr(ns, key, None)
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"unknown gfp {word!r}")
        value |= v
    return value


def gfp_names(gfp: int) -> str:
    """``0xcc0`` → ``"__GFP_IO|__GFP_FS|__GFP_DIRECT_RECLAIM|__GFP_KSWAPD_RECLAIM"``."""
    parts = [f"__GFP_{k}" for k, v in _BITS.items() if gfp & v]
    rest = gfp & ~sum(_BITS.values())
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or "0"


def order_of(nr_pages: int) -> int:
    """``get_order(nr_pages * PAGE_SIZE)``."""
    return max(0, (nr_pages - 1).bit_length())


# GFP_RECLAIM_MASK from mm/internal.h (the __GFP_ATOMIC member is ignored:
# it never matters for a memcg reclaim's gfp).
_GFP_RECLAIM_MASK = (_RECLAIM | _BITS["HIGH"] | _BITS["IO"] | _BITS["FS"] | _BITS["NOWARN"]
                     | _BITS["RETRY_MAYFAIL"] | _BITS["NOFAIL"] | _BITS["NORETRY"]
                     | _BITS["MEMALLOC"] | _BITS["NOMEMALLOC"])


def reclaim_gfp(gfp: int) -> int:
    """The gfp ``try_to_free_mem_cgroup_pages`` puts in its scan_control
    (what ``mm_vmscan_memcg_reclaim_begin`` shows): reclaim bits of the
    caller, the rest from GFP_HIGHUSER_MOVABLE."""
    return (gfp & _GFP_RECLAIM_MASK) | (GFP.HIGHUSER_MOVABLE & ~_GFP_RECLAIM_MASK)
