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

from .config import check_schedule_fits
from .partition import PartitionContext, SampleInput, get_partition_method, partition_report
from .planner import auto  # noqa: F401  (registers partition_method="auto")
from .schedules import AUTO_SCHEDULE, Layout, available_schedules, get_schedule, schedule_name, schedule_source

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
        virtual_stages: model chunks per pipeline rank (virtual stages): the partition cuts ranks x virtual_stages
            stages, placed as the schedule needs them (loop: rank r holds stages r, r + K, ...; v: r and 2K-1-r),
            for schedules such as ``interleaved-1f1b``, ``zb-v`` and ``dualpipev``. Name the schedule too; a
            ``csv:PATH`` schedule runs exactly the chunks and placement its rows hold.
    """

    def __init__(
        self,
        *args: Any,
        sample_input: SampleInput | None = None,
        micro_batches: int | None = None,
        schedule: str | None = None,
        memory_budget: float | None = None,
        profile_cache: str | os.PathLike | None = None,
        virtual_stages: int = 1,
        **kwargs: Any,
    ):
        bound = _DEEPSPEED_INIT.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = bound.arguments
        arguments["layers"] = list(arguments["layers"])
        topology = arguments["topology"]
        ranks = topology.get_dim("pipe") if topology is not None else arguments["num_stages"]
        schedule = schedule and schedule_name(schedule)
        self.virtual_stages = virtual_stages
        self.placement = virtual_placement(schedule, virtual_stages)
        if ranks is not None and schedule and schedule_source(schedule):  # a file written for other sizes
            check_schedule_fits(schedule, ranks, micro_batches, virtual_stages)
        num_stages = None if ranks is None else ranks * virtual_stages
        self._partition_context = PartitionContext(
            layers=arguments["layers"],
            num_stages=num_stages,
            virtual_stages=virtual_stages,
            sample_input=sample_input,
            micro_batches=micro_batches,
            schedule=schedule,
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
            num_stages=self.num_stages * self.virtual_stages,
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
        self.layout = Layout(self.num_stages, self.virtual_stages, self.placement)
        rank = self._topo.get_coord(self.global_rank).pipe
        stages = [self.layout.stage(rank, chunk) for chunk in range(self.virtual_stages)]
        self.chunk_bounds = [(self.parts[stage], self.parts[stage + 1]) for stage in stages]
        self._set_bounds(*self.chunk_bounds[0])

    # ---- virtual stages: one set of layers per chunk, one of them active at a time

    def stage_owner(self, layer_idx: int) -> int:
        """The pipeline rank that holds ``layer_idx`` (DeepSpeed finds the ranks of tied layers with it)."""
        stage = next(s for s in range(len(self.parts) - 1) if self.parts[s] <= layer_idx < self.parts[s + 1])
        return self.layout.location(stage)[0]

    def _build(self) -> None:
        self.chunk_funcs: list[list[Any]] = []
        for start, stop in self.chunk_bounds:
            self._set_bounds(start, stop)
            self.forward_funcs = []
            super()._build()
            self.chunk_funcs.append(self.forward_funcs)
        self.chunk_checkpointable: list[list[bool]] = [[] for _ in self.chunk_bounds]
        self.activate_chunk(0)

    def activate_chunk(self, chunk: int) -> None:
        """Make ``chunk``'s layers the ones ``forward`` runs (and checkpoints save and load)."""
        self.active_chunk = chunk
        self.forward_funcs = self.chunk_funcs[chunk]
        self.is_checkpointable_results = self.chunk_checkpointable[chunk]
        self._set_bounds(*self.chunk_bounds[chunk])

    def _each_chunk(self) -> Any:
        for chunk in range(len(self.chunk_bounds)):
            self.activate_chunk(chunk)
            yield chunk
        self.activate_chunk(0)

    def _precompute_checkpointable_values(self) -> None:
        for chunk in self._each_chunk():
            self.is_checkpointable_results_interval = None  # cached per interval: not across chunks
            super()._precompute_checkpointable_values()
            self.chunk_checkpointable[chunk] = self.is_checkpointable_results

    def save_state_dict(self, *args: Any, **kwargs: Any) -> None:
        for _ in self._each_chunk():
            super().save_state_dict(*args, **kwargs)

    def load_state_dir(self, *args: Any, **kwargs: Any) -> None:
        for _ in self._each_chunk():
            super().load_state_dir(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        for _ in self._each_chunk():
            super().compile(*args, **kwargs)


def virtual_placement(schedule: str | None, virtual_stages: int) -> str:
    """Where a module with ``virtual_stages`` chunks per rank places them: as ``schedule`` needs, else loop; or a
    ValueError naming the fix when the schedule cannot run that many chunks per rank (checked before any process
    group exists, so a script can call it on its arguments)."""
    if isinstance(virtual_stages, bool) or not isinstance(virtual_stages, int) or virtual_stages < 1:
        raise ValueError(
            f"virtual_stages must be a whole number of chunks per rank, at least 1, got {virtual_stages!r}"
        )
    schedule_cls = get_schedule(schedule) if schedule and schedule.lower() != AUTO_SCHEDULE else None
    if hasattr(schedule_cls, "check_sizes"):  # written for one layout (csv:PATH): its chunks, or an error naming both
        schedule_cls.with_chunks(virtual_stages)
    needed = getattr(schedule_cls, "chunks", 1)
    placement = getattr(schedule_cls, "placement", "loop")
    if virtual_stages > 1 and needed == 1:
        named = f"schedule {schedule!r} runs one chunk per rank" if schedule else "no schedule is named"
        virtual = " or ".join(repr(name) for name in virtual_schedules())
        raise ValueError(
            f"virtual_stages={virtual_stages} needs a schedule with virtual stages ({named}): pass schedule={virtual}, "
            "or leave virtual_stages at 1"
        )
    if needed > 1 and virtual_stages == 1:
        how_many = f"virtual_stages={needed}" + ("" if placement == "v" else " (or more)")
        raise ValueError(f"schedule {schedule!r} runs virtual stages: pass {how_many}")
    if placement == "v" and virtual_stages != 2:
        loop = [name for name in virtual_schedules() if get_schedule(name).placement == "loop"]
        raise ValueError(
            f"schedule {schedule!r} places two chunks per rank in a V (rank r holds stages r and 2K-1-r), not "
            f"{virtual_stages}: pass virtual_stages=2"
            + (f", or use {' or '.join(map(repr, loop))} for {virtual_stages} chunks per rank" if loop else "")
        )
    Layout(1, virtual_stages, placement)  # refuses a count the placement cannot hold
    return placement


def virtual_schedules() -> list[str]:
    """The registered schedules that run virtual stages (more than one chunk per rank)."""
    return [name for name in available_schedules() if getattr(get_schedule(name), "chunks", 1) > 1]
