"""The engine hook: run any registered ``PipeSchedule`` through DeepSpeed's own ``train_batch``.

DeepSpeed's ``PipelineEngine`` hard-wires 1F1B in two ways: ``_train_schedule`` returns ``TrainSchedule``,
and the engine keeps a single ``self.loss`` on the last stage and a single received gradient
(``self.grad_layer``), so a schedule that runs several forwards before their backwards (GPipe) would
backpropagate the wrong micro-batch (DeepSpeed issue 3900). ``SchedulePipelineEngine`` overrides the
``_train_schedule`` hook and keeps the loss and the received gradient per pipeline buffer, as DeepSpeed's
own ``DualPipeVEngine`` does. Its sends do not block (below); everything else (receives, reduction, optimizer
step) is DeepSpeed's.

DeepSpeed's ``p2p.send`` blocks until the neighbour posts the matching receive (a rendezvous, on gloo at least), so
every transfer stops both stages until they meet. A schedule that keeps a stage busy while its neighbour waits for
nothing (zero-bubble's W passes) then loses that time at the next send. Here ``SendActivation`` and ``SendGrad``
post an ``isend`` and go on. Each send is waited for a few sends later, when the schedule guarantees it has
arrived (:func:`send_window`), so that the tensors in flight stay bounded without ever
waiting on a neighbour; every send is complete before ``train_batch`` returns.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import torch
from deepspeed import comm as dist
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from .config import DEEPSPEED_BUILTIN, load_config, schedule_name
from .schedules import get_schedule
from .split_backward import (
    BackwardInputPass,
    BackwardWeightPass,
    backward_input,
    backward_weight,
    check_engine_can_split,
)


def send_window(
    schedule_cls: type[ds_schedule.PipeSchedule], micro_batches: int, stages: int, sender: int, receiver: int
) -> int:
    """How many sends from ``sender`` to its neighbour ``receiver`` may be in flight: the send that many back is
    sure to have arrived when the next is posted, so waiting for it never waits on the neighbour.

    A stage sends micro-batch j's activation after its forward, which takes one of its n buffers; every activation
    sent whose gradient has not come back still holds a buffer (``RecvGrad`` reads it), so the activation n sends
    back has had its gradient, and had arrived. A stage sends j's input gradient after receiving j's activation,
    which the previous stage (n' buffers) sent only after the gradient n' sends back had arrived. This holds for
    every schedule :func:`~ds_pipe_ext.simulation.validate` accepts: its buffer rules are these.
    """
    owner = sender if receiver > sender else receiver
    return schedule_cls(micro_batches=micro_batches, stages=stages, stage_id=owner).num_pipe_buffers()


class SchedulePipelineEngine(PipelineEngine):
    """A ``PipelineEngine`` that trains with ``schedule_cls`` and keeps losses and gradients per buffer.

    Args:
        schedule_cls: the ``PipeSchedule`` subclass ``train_batch`` runs.
        tracer: optional :class:`~ds_pipe_ext.trace.InstructionTracer`, called around every instruction of
            ``train_batch``. ``None`` leaves DeepSpeed's instruction loop untouched, so tracing off costs nothing.
    """

    def __init__(self, *args: Any, schedule_cls: type[ds_schedule.PipeSchedule], tracer: Any = None, **kwargs: Any):
        self.schedule_cls = schedule_cls
        self.tracer = tracer
        self._pending_sends: dict[int, deque[list[Any]]] = {}  # per neighbour stage, one entry per send, in order
        self._failed_batch: BaseException | None = None
        super().__init__(*args, **kwargs)
        for key in ("losses", "grads", "pending_weight_grads"):
            self.pipe_buffers[key] = [None] * self.num_pipe_buffers
        neighbours = [stage for stage in (self.stage_id - 1, self.stage_id + 1) if 0 <= stage < self.num_stages]
        self._send_windows = {
            stage: send_window(schedule_cls, self.micro_batches, self.num_stages, self.stage_id, stage)
            for stage in neighbours
        }
        split = (BackwardInputPass, BackwardWeightPass)
        if any(isinstance(cmd, split) for step in self._train_schedule() for cmd in step):
            check_engine_can_split(self)  # once, on every rank, before the first batch

    def _train_schedule(self) -> ds_schedule.PipeSchedule:
        return self.schedule_cls(micro_batches=self.micro_batches, stages=self.num_stages, stage_id=self.stage_id)

    def _exec_forward_pass(self, buffer_id: int) -> None:
        super()._exec_forward_pass(buffer_id)
        if self.is_last_stage() and torch.is_grad_enabled():
            self.pipe_buffers["losses"][buffer_id] = self.loss

    def _exec_recv_grads(self, buffer_id: int) -> None:
        super()._exec_recv_grads(buffer_id)
        # DeepSpeed receives into one reused tensor; keep this buffer's gradient until its backward.
        grad = self.grad_layer
        self.pipe_buffers["grads"][buffer_id] = grad.clone() if torch.is_tensor(grad) else [g.clone() for g in grad]

    def _exec_backward_pass(self, buffer_id: int) -> None:
        if self.is_last_stage():
            self.loss = self.pipe_buffers["losses"][buffer_id]
            self.pipe_buffers["losses"][buffer_id] = None
        else:
            self.grad_layer = self.pipe_buffers["grads"][buffer_id]
            self.pipe_buffers["grads"][buffer_id] = None
        super()._exec_backward_pass(buffer_id)

    def _exec_backward_input_pass(self, buffer_id: int) -> None:
        """B: the gradient of the stage input, for ``SendGrad``; what the weights' gradients need waits for W.

        On the last stage B starts from the unscaled loss: DeepSpeed's hook on the stage output
        (``_backward_prologue_per_tensor``) divides the gradient by the accumulation steps, as it does for any
        backward it did not start itself. The first stage has no input gradient to compute: its W runs the
        whole backward.
        """
        if self.is_first_stage():
            return
        if self.is_last_stage():
            outputs, grads = [self.pipe_buffers["losses"][buffer_id]], [None]
            self.pipe_buffers["losses"][buffer_id] = None
        else:
            outputs, grads = self.pipe_buffers["outputs"][buffer_id], self.pipe_buffers["grads"][buffer_id]
            self.pipe_buffers["grads"][buffer_id] = None
            if torch.is_tensor(outputs):
                outputs, grads = [outputs], [grads]
            else:
                outputs = [output for output in outputs if output.is_floating_point()]
        inputs = self.pipe_buffers["inputs"][buffer_id]
        self._running_engine_backward = True  # DeepSpeed's output hook refuses backwards it does not know of
        try:
            pending = backward_input(
                outputs, grads, [inputs] if torch.is_tensor(inputs) else inputs, self.module.parameters()
            )
        finally:
            self._running_engine_backward = False
        self.pipe_buffers["pending_weight_grads"][buffer_id] = pending

    def _exec_backward_weight_pass(self, buffer_id: int) -> None:
        """W: accumulate the weight gradients into ``.grad``, then free the micro-batch's activations."""
        if self.is_first_stage():
            return self._exec_backward_pass(buffer_id)
        backward_weight(self.pipe_buffers["pending_weight_grads"][buffer_id])
        self.pipe_buffers["pending_weight_grads"][buffer_id] = None
        self.pipe_buffers["outputs"][buffer_id] = None
        self.pipe_buffers["output_tensors"][buffer_id] = None

    def _sends_can_overlap(self) -> bool:
        """Partitioned activations and gradients go through DeepSpeed's own (blocking) sends; and so does the first
        activation, which carries the tensor metadata the receiver allocates its buffer from."""
        partitioned = self.is_pipe_partitioned or self.is_grad_partitioned
        return p2p.can_send_recv() and not (partitioned or self.dynamic_shape)

    def _exec_send_activations(self, buffer_id: int) -> None:
        if self.first_output_send or not self._sends_can_overlap():
            return super()._exec_send_activations(buffer_id)
        outputs = self.pipe_buffers["outputs"][buffer_id]
        tensors = [outputs] if torch.is_tensor(outputs) else list(outputs)
        if self.has_attention_mask or self.has_bool_tensors:
            tensors[-1] = tensors[-1].half()  # as DeepSpeed does: NCCL cannot send bool tensors
        self._isend(tensors, self.next_stage)

    def _exec_send_grads(self, buffer_id: int) -> None:
        if not self._sends_can_overlap():
            return super()._exec_send_grads(buffer_id)
        inputs = self.pipe_buffers["inputs"][buffer_id]
        if torch.is_tensor(inputs):
            grads = [inputs.grad]
        else:
            if self.has_attention_mask or self.has_bool_tensors:
                inputs = inputs[:-1]  # the mask has no gradient; DeepSpeed's receiver does not expect one
            grads = [tensor.grad for tensor in inputs if tensor.is_floating_point()]
        if any(grad is None for grad in grads):
            raise RuntimeError(f"SendGrad(buffer_id={buffer_id}): a stage input has no gradient")
        self._isend(grads, self.prev_stage)
        self.pipe_buffers["inputs"][buffer_id] = None

    def _isend(self, tensors: list[torch.Tensor], stage: int) -> None:
        sends = self._pending_sends.setdefault(stage, deque())
        if len(sends) >= self._send_windows[stage]:
            for work in sends.popleft():
                work.wait()  # arrived already: returns at once (gloo's is_completed() stays False until wait())
        rank = self.grid.stage_to_global(stage_id=stage)
        sends.append([dist.isend(tensor, rank) for tensor in tensors])

    def _wait_for_sends(self) -> None:
        for sends in self._pending_sends.values():
            for works in sends:
                for work in works:
                    work.wait()
        self._pending_sends.clear()

    def _exec_schedule(self, pipe_schedule: ds_schedule.PipeSchedule) -> None:
        if self._failed_batch is not None:
            raise RuntimeError(
                "a previous batch failed part-way through the pipeline, so the stages are out of step; restart the "
                "job (from a checkpoint)"
            ) from self._failed_batch
        try:
            self._exec_instructions(pipe_schedule)
        except BaseException as error:
            self._failed_batch = error
            self._pending_sends.clear()
            raise
        self._wait_for_sends()

    def _exec_instructions(self, pipe_schedule: ds_schedule.PipeSchedule) -> None:
        if self.tracer is None:
            return super()._exec_schedule(pipe_schedule)
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        for step_cmds in pipe_schedule:
            for cmd in step_cmds:
                handler = self._INSTRUCTION_MAP.get(type(cmd))
                if handler is None:
                    raise RuntimeError(f"{self.__class__.__name__} does not understand instruction {cmd!r}")
                self.tracer.synchronize()
                start = time.perf_counter()
                handler(self, **cmd.kwargs)
                self.tracer.synchronize()
                self.tracer.record(cmd, start, time.perf_counter())

    def save_trace(self) -> Any:
        """Write the trace of every rank into one Chrome trace file (a collective); its path on global rank 0."""
        if self.tracer is None:
            raise RuntimeError("this engine is not tracing: pass trace_dir= to ds_pipe_ext.initialize")
        return self.tracer.save()

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.ForwardPass: _exec_forward_pass,
        ds_schedule.BackwardPass: _exec_backward_pass,
        ds_schedule.RecvGrad: _exec_recv_grads,
        ds_schedule.SendActivation: _exec_send_activations,
        ds_schedule.SendGrad: _exec_send_grads,
        BackwardInputPass: _exec_backward_input_pass,
        BackwardWeightPass: _exec_backward_weight_pass,
    }


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
    :class:`SchedulePipelineEngine` running ``schedule`` (a registered name), or the config's
    ``"pipeline": {"schedule": ...}``, default ``"1f1b"``; ``"deepspeed"`` returns DeepSpeed's own engine
    untouched. With ``trace_dir``, every instruction is timed and ``engine.save_trace()`` writes
    ``trace_dir/trace.json``. Anything else is passed to ``deepspeed.initialize`` unchanged.
    """
    import deepspeed
    from deepspeed.constants import TORCH_DISTRIBUTED_DEFAULT_PORT
    from deepspeed.pipe import PipelineModule

    common = dict(
        args=args,
        model=model,
        optimizer=optimizer,
        model_parameters=model_parameters,
        training_data=training_data,
        lr_scheduler=lr_scheduler,
        dist_init_required=dist_init_required,
        collate_fn=collate_fn,
    )
    distributed_port = distributed_port or TORCH_DISTRIBUTED_DEFAULT_PORT
    ds_kwargs = dict(
        common,
        distributed_port=distributed_port,
        mpu=mpu,
        config=config,
        mesh_param=mesh_param,
        config_params=config_params,
    )
    if not isinstance(model, PipelineModule):
        return deepspeed.initialize(**ds_kwargs)

    config_dict = load_config(args, config if config is not None else config_params)
    name = schedule_name(schedule, config_dict)
    if name == DEEPSPEED_BUILTIN:
        if trace_dir is not None:
            raise ValueError(
                "tracing runs inside ds_pipe_ext's engine; use schedule '1f1b' (the same instructions as "
                "DeepSpeed's built-in) to trace"
            )
        return deepspeed.initialize(**ds_kwargs)
    if mpu is not None:
        raise ValueError("mpu must be None with pipeline parallelism: the PipelineModule's topology defines it")

    from deepspeed import set_optimizer_flags
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime import zero
    from deepspeed.runtime.config import DeepSpeedConfig

    from .trace import InstructionTracer

    zero.partition_parameters.shutdown_init_context()
    dist.init_distributed(
        dist_backend=get_accelerator().communication_backend_name(),
        distributed_port=distributed_port,
        dist_init_required=dist_init_required,
    )
    tracer = None if trace_dir is None else InstructionTracer.for_rank(trace_dir, name, model._topo, dist.get_rank())
    config_class = DeepSpeedConfig(config_dict, model.mpu())
    set_optimizer_flags(config_class, model)
    engine = SchedulePipelineEngine(
        **common,
        mpu=model.mpu(),
        config=config_dict,
        config_class=config_class,
        schedule_cls=get_schedule(name),
        tracer=tracer,
    )
    zero.partition_parameters.restore_init_context()
    engine._configure_python_gc()
    if tracer is not None:
        tracer.align()
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
