"""``ds_pipe_ext.initialize``: ``deepspeed.initialize`` with a choice of pipeline schedule.

It delegates: ``deepspeed.initialize`` builds the engine exactly as it would (its config handling, its process
groups, its choice of ``PipelineEngine`` or ``DualPipeVEngine``), and only then does the chosen schedule take the
engine over (:meth:`SchedulePipelineEngine.adopt`). Whatever a DeepSpeed release adds to that function applies
here unchanged.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import compat
from ..config import check_schedule_fits, gradient_accumulation_steps, load_config, resolve_schedule
from ..schedules import DEEPSPEED_BUILTIN, DEFAULT_SCHEDULE, get_schedule
from .pipeline_engine import SchedulePipelineEngine

__all__ = ["initialize"]


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: Any = None,
    model_parameters: Any = None,
    training_data: Any = None,
    lr_scheduler: Any = None,
    distributed_port: int | None = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Any = None,
    config: Any = None,
    mesh_param: Any = None,
    config_params: Any = None,
    *,
    schedule: str | None = None,
    trace_dir: str | None = None,
) -> tuple[Any, Any, Any, Any]:
    """``deepspeed.initialize`` with a choice of pipeline schedule.

    Same arguments and return values as ``deepspeed.initialize``. For a ``PipelineModule`` the engine is a
    :class:`SchedulePipelineEngine` running ``schedule``, the config's ``"pipeline": {"schedule": ...}`` or the
    module's ``schedule=`` (they must agree; :func:`ds_pipe_ext.config.resolve_schedule`), default ``"1f1b"``;
    ``"deepspeed"`` returns DeepSpeed's own engine untouched, as does DeepSpeed's ``DualPipeVModule`` unless a
    schedule is named. With ``trace_dir``, every instruction is timed and ``engine.save_trace()`` writes
    ``trace_dir/trace.json``. Anything else is passed to ``deepspeed.initialize`` unchanged.
    """
    import deepspeed
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
    from deepspeed.pipe import PipelineModule

    ds_kwargs = dict(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        distributed_port=distributed_port or TORCH_DISTRIBUTED_DEFAULT_PORT,
        mpu=mpu,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
        config=compat.config_for_deepspeed(config),
        mesh_param=mesh_param,
        config_params=compat.config_for_deepspeed(config_params),
    )
    if not isinstance(model, PipelineModule):
        if schedule is not None or trace_dir is not None:
            raise ValueError("schedule= and trace_dir= need a PipelineModule (ds_pipe_ext.PipelineModule)")
        return deepspeed.initialize(**ds_kwargs)

    config_dict = load_config(args, config if config is not None else config_params)
    default = DEEPSPEED_BUILTIN if compat.is_dualpipev_module(model) else DEFAULT_SCHEDULE
    name = resolve_schedule(schedule, config_dict, model, default=default)
    if name == DEEPSPEED_BUILTIN:
        if trace_dir is not None:
            raise ValueError(
                "tracing runs inside ds_pipe_ext's engine; use schedule '1f1b' (the same instructions as "
                "DeepSpeed's built-in) to trace"
            )
        return deepspeed.initialize(**ds_kwargs)
    if compat.is_dualpipev_module(model):
        raise ValueError(
            f"DeepSpeed's DualPipeVModule runs only DeepSpeed's DualPipeVEngine, not schedule {name!r}: leave the "
            "schedule unset (or 'deepspeed') for it"
        )

    chunks = getattr(model, "virtual_stages", 1)
    try:
        micro_batches = gradient_accumulation_steps(config_dict, model._topo.get_dim("data"))
    except ValueError:  # a config DeepSpeed completes itself: its micro-batches are known only to the engine
        micro_batches = None
    check_schedule_fits(name, model._topo.get_dim("pipe"), micro_batches, chunks)
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(**ds_kwargs)
    schedule_cls = get_schedule(name)
    if chunks > 1:
        schedule_cls = schedule_cls.with_chunks(chunks)
    tracer = None
    if trace_dir is not None:
        from deepspeed import comm as dist

        from ..observe.trace import InstructionTracer

        layout = getattr(model, "layout", None)
        tracer = InstructionTracer.for_rank(trace_dir, name, model._topo, dist.get_rank(), layout)
    SchedulePipelineEngine.adopt(engine, schedule_cls, tracer)
    if tracer is not None:
        tracer.align()
    return engine, engine_optimizer, loader, scheduler
