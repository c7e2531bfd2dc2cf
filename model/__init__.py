"""memcgscope.model: the memory-cgroup charge path as an executable model.

Layer 1 (exact): page counters, the per-cpu stock, try_charge, limit writes,
OOM decisions, per kernel profile, behind ``Kernel``.  Layer 2
(approximate): ``environment.Environment``, reclaimable pools and tasks.
Pure Python, no I/O; imports nothing else of the project.
"""

from .context import OomOutcome, ReclaimResult, Task
from .gfp import GFP, gfp_names, parse_gfp
from .kernel import Kernel
from .page_counter import PAGE_COUNTER_MAX, PAGE_SIZE
from .profiles import PROFILES, Profile, get_profile
from .steps import ChargeResult, WriteResult

__all__ = ["Kernel", "GFP", "Task", "ReclaimResult", "OomOutcome", "PROFILES", "Profile",
           "get_profile", "parse_gfp", "gfp_names", "PAGE_SIZE", "PAGE_COUNTER_MAX",
           "ChargeResult", "WriteResult"]
