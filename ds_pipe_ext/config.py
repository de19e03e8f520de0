"""The user's choices, resolved once: the DeepSpeed config, the schedule, the batch sizes.

DeepSpeed checks batch sizes inside the engine with a bare assertion, after process groups exist. These
checks run first, on every rank, from the config alone, so a bad launch fails everywhere with one message. The
schedule can be named in three places (``initialize(schedule=)``, the config, ``PipelineModule(schedule=)``);
:func:`resolve_schedule` is the one place that decides which runs.
"""

from __future__ import annotations

from typing import Any

from .compat import check_loss_rank, load_ds_config
from .observe.simulation import validate
from .schedules.registry import AUTO_SCHEDULE, DEFAULT_SCHEDULE, get_schedule, schedule_name, schedule_source

__all__ = [
    "check_schedule_fits",
    "check_schedule_source",
    "gradient_accumulation_steps",
    "load_config",
    "resolve_schedule",
]


def load_config(args: Any = None, config: Any = None) -> dict:
    """The config as a dict, from ``args.deepspeed_config`` (a path) or ``config`` (a path or a dict)."""
    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("pass the DeepSpeed config either as --deepspeed_config or as config=, not both")
        config = args.deepspeed_config
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass --deepspeed_config ds_config.json (or config=)")
    return dict(config) if isinstance(config, dict) else load_ds_config(config)


def resolve_schedule(schedule: str | None, config: dict, module: Any = None, default: str = DEFAULT_SCHEDULE) -> str:
    """The schedule the run uses: whichever of ``schedule``, ``config["pipeline"]["schedule"]`` and the module's
    ``schedule`` is given (they must name the same one), else ``default``; checked against the registry.

    ``"auto"`` names the planner's choice: a ``ds_pipe_ext.PipelineModule`` built with ``schedule="auto"`` and
    ``partition_method="auto"`` chose one when it partitioned, and ``"auto"`` anywhere resolves to that choice.
    Without a module yet (a script checking its arguments) ``"auto"`` stays ``"auto"``, for the module to choose.

    A ``ds_pipe_ext.PipelineModule`` whose partition depended on the schedule (``memory`` counts the micro-batches
    it keeps in flight, ``auto`` times them) and was not told one planned for the default: a run with another
    schedule is refused.
    """
    named = {
        where: schedule_name(value)
        for where, value in (
            ("initialize(schedule=...)", schedule),
            ("the config's pipeline.schedule", config.get("pipeline", {}).get("schedule")),
            ("PipelineModule(schedule=...)", getattr(module, "schedule", None)),
        )
        if value
    }
    if AUTO_SCHEDULE in named.values() and module is not None:
        chosen = getattr(module, "schedule", None)
        if chosen in (None, AUTO_SCHEDULE):
            raise ValueError(
                "schedule 'auto' is the plan a ds_pipe_ext.PipelineModule makes when it partitions: build the module "
                "with schedule='auto' and partition_method='auto' (or name a registered schedule)"
            )
        named = {where: chosen if name == AUTO_SCHEDULE else name for where, name in named.items()}
    (first_where, name), *others = named.items() or [("the default", default)]
    for where, other in others:
        if other != name:
            raise ValueError(
                f"the schedule is named twice, differently: {name!r} in {first_where} and {other!r} in {where}; "
                "name it once, or the same in both places"
            )
    if schedule_source(name) is not None:
        check_schedule_source(name)
    planned = getattr(module, "partition_schedule", None)
    if planned is not None and planned != name:
        raise ValueError(
            f"PipelineModule's partition planned the activations of schedule {planned!r} (its default), but the run "
            f"uses {name!r} ({first_where}): pass schedule={name!r} to PipelineModule"
        )
    return name


def check_schedule_source(name: str) -> None:
    """Replay a schedule read from a file (``csv:PATH``) at the sizes it was written for, once it is chosen: a
    missing or repeated pass, a W before its I, or passes no order across ranks can satisfy is refused here,
    naming the file's row, column and action (:func:`ds_pipe_ext.observe.simulation.validate`)."""
    schedule = get_schedule(name)
    table = getattr(schedule, "table", None)
    if table is not None:
        validate(schedule, table.layout.ranks, table.micro_batches)


def check_schedule_fits(
    name: str, ranks: int, micro_batches: int | None, chunks: int = 1, on_this_deepspeed: bool = True
) -> None:
    """Refuse, before any collective, a schedule that cannot run ``ranks`` pipeline ranks of ``chunks`` chunks and
    ``micro_batches`` micro-batches: a CSV written for other sizes (the error names both numbers), interleaved
    rounds that do not divide the micro-batches; with ``on_this_deepspeed``, also a placement the installed
    DeepSpeed cannot train. ``micro_batches`` None: only what the ranks decide."""
    if name == AUTO_SCHEDULE:
        return
    schedule = get_schedule(name)
    check_sizes = getattr(schedule, "check_sizes", None)
    if check_sizes is not None:  # written for one size (csv:PATH)
        check_sizes(ranks, micro_batches)
        schedule.with_chunks(chunks)  # the file's chunks per rank, or an error naming both counts
    if micro_batches is not None:
        schedule = schedule.with_chunks(chunks) if chunks > 1 else schedule
        schedule(micro_batches=micro_batches, stages=ranks, stage_id=0)
    if on_this_deepspeed:
        check_loss_rank(getattr(schedule, "placement", "loop"), name)


def gradient_accumulation_steps(config: dict, data_parallel_size: int) -> int:
    """Micro-batches per step implied by the config, or a ValueError that says which size to change.

    DeepSpeed requires ``train_batch_size == micro_batch * accumulation_steps * data_parallel_size`` and
    fills in whichever one of the three is missing.
    """
    train = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    dp = data_parallel_size
    if train is not None and micro is not None:
        if train % (micro * dp):
            raise ValueError(
                f"train_batch_size {train} is not micro-batch {micro} x accumulation steps x data-parallel size "
                f"{dp}: make train_batch_size a multiple of {micro * dp}"
            )
        implied = train // (micro * dp)
        if gas is not None and gas != implied:
            raise ValueError(
                f"gradient_accumulation_steps {gas} disagrees with train_batch_size {train} = micro-batch {micro} x "
                f"accumulation steps x data-parallel size {dp} (which needs {implied}); drop one of the three"
            )
        return implied
    if train is not None and gas is not None:
        if train % (gas * dp):
            raise ValueError(
                f"train_batch_size {train} is not divisible by accumulation steps {gas} x data-parallel size {dp}"
            )
        return gas
    if micro is not None:
        return gas or 1
    raise ValueError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")
