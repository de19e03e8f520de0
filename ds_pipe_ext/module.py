"""``ds_pipe_ext.PipelineModule``: DeepSpeed's ``PipelineModule`` that partitions with any registered method.

DeepSpeed creates its process groups in ``__init__`` before it partitions, so a bad partition spec there fails
after the first collective, and on each rank in its own way. Here the spec, the stage count and the method's
inputs are checked first, on every rank alike, and DeepSpeed's ``_partition_layers`` hook then dispatches to the
registry of :mod:`ds_pipe_ext.partition`.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import replace
from typing import Any

import deepspeed.pipe
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import logger

from .partition import PartitionContext, SampleInput, get_partition_method, partition_report
from .planner import auto  # noqa: F401  (registers partition_method="auto")
from .schedules import AUTO_SCHEDULE, schedule_name

_DEEPSPEED_INIT = inspect.signature(deepspeed.pipe.PipelineModule.__init__)


class PipelineModule(deepspeed.pipe.PipelineModule):
    """A drop-in ``deepspeed.pipe.PipelineModule``: same arguments, and DeepSpeed's partition methods (``uniform``,
    ``parameters``, ``type:REGEX``) give DeepSpeed's exact stages. ``partition_method`` also accepts every method
    registered with :func:`ds_pipe_ext.register_partition_method` (``manual:0,9,22``, ``type:conv:3|linear:1``,
    ``flops``, ``memory``, ``profile``, ...). At start-up rank 0 prints a partition report instead of DeepSpeed's
    layer list; every rank keeps it as ``self.partition_report``.

    Keyword-only arguments, for the methods that need them:
        sample_input: the micro-batch the first stage receives (a tensor, a tuple of tensors, or a function that
            returns one); ``flops``, ``memory`` and ``profile`` run the layers on its shapes.
        micro_batches: micro-batches per step (gradient accumulation steps), for ``memory`` (activations in
            flight) and ``profile`` (the optimizer step's share per micro-batch).
        schedule: the schedule the engine will run (a registered name, ``"deepspeed"`` included), for the
            activations in flight and the predicted step time; default: none named, planned as 1F1B.
            :func:`ds_pipe_ext.initialize` refuses a run whose schedule disagrees with it. ``"auto"`` (with
            ``partition_method="auto"``): the planner chooses it with the partition; ``self.schedule`` is then
            the choice and ``self.plan`` the plan, and ``initialize`` runs it.
        memory_budget: bytes per device; ``memory`` then picks the split that fits with the fewest FLOPs on
            the slowest stage, ``auto`` the fastest measured plan that fits.
        profile_cache: a JSON file where ``profile`` keeps its measurements, so restarts agree and skip measuring.
    """

    def __init__(
        self,
        *args: Any,
        sample_input: SampleInput | None = None,
        micro_batches: int | None = None,
        schedule: str | None = None,
        memory_budget: float | None = None,
        profile_cache: str | os.PathLike | None = None,
        **kwargs: Any,
    ):
        bound = _DEEPSPEED_INIT.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        arguments["layers"] = list(arguments["layers"])
        topology = arguments["topology"]
        num_stages = topology.get_dim("pipe") if topology is not None else arguments["num_stages"]
        self._partition_context = PartitionContext(
            layers=arguments["layers"],
            num_stages=num_stages,
            sample_input=sample_input,
            micro_batches=micro_batches,
            schedule=schedule and schedule_name(schedule),
            memory_budget=memory_budget,
            cache_path=profile_cache,
        )
        spec = get_partition_method(arguments["partition_method"])
        if num_stages is not None:  # else DeepSpeed raises its own error before any collective
            spec.check(self._partition_context)
        #: The schedule named here (after partitioning, the plan's choice for "auto"), if any; and the one the
        #: partition planned for when it depended on one unnamed.
        self.schedule = self._partition_context.schedule
        self.partition_schedule: str | None = None
        #: The planner's plan, for partition_method="auto".
        self.plan = None
        super().__init__(*bound.args[1:], **bound.kwargs)
        self._mark_stage_parameters()

    def _mark_stage_parameters(self) -> None:
        """Make DeepSpeed's gradient norm (clipping) sum over every stage, not only stage 0.

        DeepSpeed's ``clip_grad_norm_`` sums the squared norms over the pipeline group but counts a parameter only
        on the group's rank 0 unless the parameter is marked ``model_parallel`` (held by this rank alone). A stage's
        own layers are exactly that; tied layers are replicated across stages, so they stay counted once, on
        stage 0. Without this, with DeepSpeed's default ``gradient_clipping`` of 1.0 a pipeline clips by stage 0's
        norm and trains differently from the same model without a pipeline.
        """
        tied = {id(p) for p in self.tied_modules.parameters()}
        for parameter in self.parameters():
            if id(parameter) not in tied:
                parameter.model_parallel = True

    def _check_ranks_agree(self) -> None:
        """Every rank must cut the same stages, or the pipeline deadlocks at its first send: fail loudly instead."""
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, list(self.parts), group=self.world_group)
        if any(parts != gathered[0] for parts in gathered):
            raise RuntimeError(
                f"ranks disagree on the stage boundaries: {gathered}. A partition method must give every rank the "
                "same result (measure on one rank and share it, or pass a profile_cache)"
            )

    def _partition_layers(self, method: str = "uniform") -> None:
        spec = get_partition_method(method)
        ctx = replace(
            self._partition_context,
            layers=self._layer_specs,
            num_stages=self.num_stages,
            device=get_accelerator().device_name(self.local_rank),
            data_parallel_size=self._topo.get_dim("data"),
        )
        if self.global_rank == 0:
            logger.info(f"Partitioning pipeline stages with method {spec}")
        self.parts = spec(ctx)
        self.plan = ctx.chosen_plan
        if ctx.schedule == AUTO_SCHEDULE:
            self.schedule = ctx.chosen_schedule
            ctx = ctx.variant(schedule=self.schedule)
        elif ctx.schedule is None and (ctx.depends_on_schedule or ctx.chosen_schedule is not None):
            self.partition_schedule = ctx.schedule_name
        self._check_ranks_agree()
        self.partition_report = partition_report(ctx, self.parts, method=str(spec))
        if self.global_rank == 0:
            print(self.partition_report.format(), flush=True)
        stage_id = self._topo.get_coord(self.global_rank).pipe
        self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])
