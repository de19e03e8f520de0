"""Training schedules for DeepSpeed's pipeline engine, chosen by name.

A schedule is a DeepSpeed ``PipeSchedule``. The built-in ones are compute orders (:mod:`.compute_order`): each
stage's passes, lowered to DeepSpeed's instructions by one function. A new schedule is a class with an
``order()`` (or, by hand, a ``steps()`` generator of instructions) and ``@register_schedule("name")``;
:func:`ds_pipe_ext.validate` checks it before it runs. ``csv:PATH`` names a schedule written as
``torch.distributed.pipelining`` action text (:mod:`.interchange`).
"""

from . import builtin, interchange, virtual, zero_bubble  # noqa: F401  (registers the built-in schedules, csv:)
from .builtin import GPipeSchedule, OneFOneBSchedule
from .compute_order import ComputeOrderSchedule, Pass, lower
from .instructions import BackwardInputPass, BackwardWeightPass
from .interchange import read_actions, write_actions
from .layout import Layout
from .registry import (
    AUTO_SCHEDULE,
    DEEPSPEED_BUILTIN,
    DEFAULT_SCHEDULE,
    available_schedules,
    get_schedule,
    register_schedule,
    register_schedule_source,
    schedule_name,
    schedule_source,
    schedule_variants,
)
from .zero_bubble import SplitOneFOneBSchedule, ZBH1Schedule

__all__ = [
    "AUTO_SCHEDULE",
    "DEEPSPEED_BUILTIN",
    "DEFAULT_SCHEDULE",
    "BackwardInputPass",
    "BackwardWeightPass",
    "ComputeOrderSchedule",
    "Layout",
    "GPipeSchedule",
    "OneFOneBSchedule",
    "Pass",
    "SplitOneFOneBSchedule",
    "ZBH1Schedule",
    "available_schedules",
    "get_schedule",
    "lower",
    "read_actions",
    "register_schedule",
    "register_schedule_source",
    "schedule_name",
    "schedule_source",
    "schedule_variants",
    "write_actions",
]
