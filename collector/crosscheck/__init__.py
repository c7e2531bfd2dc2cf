"""The cross-checker: each observed episode replayed through the model's
layer 1 (``memcgscope.model``, its public interface only), and aggregate
cgroupfs counters compared with what the episodes imply.  The checks and
the reason set are described in collector/README.md, section "Cross-check".

How a replay works.  The model runs the kernel function of the episode
(``try_charge_memcg``, ``mem_cgroup_resize_max``, ``memory_max_write``,
``memory_high_write``) on a scratch ``Kernel`` whose oracles, the model's
calls into the world, are answered by the observation in order: page-counter
attempts, reclaim, the counter reads that follow it, drains, OOM calls,
signals (and the OOM reaper's MMF_OOM_SKIP), superseded limits and dying
memcgs.  When the model wants to do something the kernel did not do next
(or the kernel did something the model cannot), the replay stops with a
reason.  Unobservable task state is tried as variants; an episode is
divergent only if no variant replays it.

Modules, one job each:

* ``reasons``: the check and reason sets, ``Divergence``, ``CheckResult``;
* ``episode``: an episode's shape, the validation of its fields, ancestry;
* ``replay``: the cursor over a shape and the oracles it answers;
* ``charge``, ``limits``: the charge and limit-write replays;
* ``standalone``: page-charge, OOM-kill and reclaim episodes, ``over_max``;
* ``cache``: the shape cache;
* ``checker``: ``CrossChecker``, the front;
* ``aggregate``: ``AggregateChecker``, ``Tolerance``, ``compare_count``.
"""

from .aggregate import AggregateChecker, Tolerance, compare_count
from .checker import CrossChecker
from .reasons import CHECKS, REASONS, CheckResult, Divergence

__all__ = ["REASONS", "CHECKS", "Divergence", "CheckResult", "CrossChecker", "AggregateChecker",
           "Tolerance", "compare_count"]
