"""Plan the run: pipeline size, micro-batches, schedule and partition for a memory budget, from measured costs.

:mod:`.search` enumerates and ranks the plans; :mod:`.auto` registers ``partition_method="auto"``, the best plan
for a module's fixed shape (with ``schedule="auto"`` the schedule too). Importing this package registers it;
``ds_pipe_ext.PipelineModule`` does.
"""

from . import auto  # noqa: F401  (registers partition_method="auto")
from .search import NoPlanFits, Plan, PlanSearch, PlanSpace, search_plans

__all__ = ["NoPlanFits", "Plan", "PlanSearch", "PlanSpace", "search_plans"]
