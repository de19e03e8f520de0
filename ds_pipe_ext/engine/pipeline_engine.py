"""The engine hook: run any registered ``PipeSchedule`` through DeepSpeed's own ``train_batch``.

DeepSpeed's ``PipelineEngine`` hard-wires 1F1B in two ways: ``train_batch`` runs ``TrainSchedule``, and the engine
keeps a single ``self.loss`` on the last stage and a single received gradient (``self.grad_layer``), so a schedule
that runs several forwards before their backwards (GPipe) would backpropagate the wrong micro-batch (DeepSpeed
issue 3900). ``SchedulePipelineEngine`` runs its own schedule where ``train_batch`` hands ``TrainSchedule`` to
``_exec_schedule`` (the one hook, the same in every supported DeepSpeed release), and keeps the loss and the
received gradient per pipeline buffer, as DeepSpeed's own ``DualPipeVEngine`` does. Everything else (receives,
reduction, optimizer step, precision, ZeRO) is DeepSpeed's.

DeepSpeed's ``p2p.send`` blocks until the neighbour posts the matching receive (a rendezvous, on gloo at least), so
every transfer stops both stages until they meet. A schedule that keeps a stage busy while its neighbour waits for
nothing (zero-bubble's W passes) then loses that time at the next send. Here ``SendActivation`` and ``SendGrad``
post an ``isend`` and go on, and each run of transfers in a step posts its sends before it waits for a receive.
Each send is waited for a few sends later, when the schedule guarantees it has arrived (:func:`send_window`), so
that the tensors in flight stay bounded without ever waiting on a neighbour; every send is complete before
``train_batch`` returns.
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

from ..schedules import BackwardInputPass, BackwardWeightPass
from ..schedules.instructions import transfer_runs, uses_split_backward
from .split_backward import backward_input, backward_weight, check_engine_can_split

__all__ = ["SchedulePipelineEngine", "send_window"]


def send_window(
    schedule_cls: type[ds_schedule.PipeSchedule], micro_batches: int, stages: int, sender: int, receiver: int
) -> int:
    """How many sends from ``sender`` to its neighbour ``receiver`` may be in flight: the send that many back is
    sure to have arrived when the next is posted, so waiting for it never waits on the neighbour.

    A stage sends micro-batch j's activation after its forward, which takes one of its n buffers; every activation
    sent whose gradient has not come back still holds a buffer (``RecvGrad`` reads it), so the activation n sends
    back has had its gradient, and had arrived. A stage sends j's input gradient after receiving j's activation,
    which the previous stage (n' buffers) sent only after the gradient n' sends back had arrived. This holds for
    every schedule :func:`~ds_pipe_ext.observe.simulation.validate` accepts: its buffer rules are these.
    """
    owner = sender if receiver > sender else receiver
    return schedule_cls(micro_batches=micro_batches, stages=stages, stage_id=owner).num_pipe_buffers()


class SchedulePipelineEngine(PipelineEngine):
    """A ``PipelineEngine`` that trains with ``schedule_cls`` and keeps losses and gradients per buffer.

    :func:`ds_pipe_ext.initialize` builds it: ``deepspeed.initialize`` builds DeepSpeed's engine, exactly as it
    would, and :meth:`adopt` makes that engine this class (it adds methods, no state DeepSpeed sets up).
    """

    schedule_cls: type[ds_schedule.PipeSchedule]
    tracer: Any

    @classmethod
    def adopt(
        cls, engine: PipelineEngine, schedule_cls: type[ds_schedule.PipeSchedule], tracer: Any = None
    ) -> SchedulePipelineEngine:
        """Turn DeepSpeed's ``engine`` into a ``SchedulePipelineEngine`` running ``schedule_cls``.

        ``tracer``: an optional :class:`~ds_pipe_ext.observe.trace.InstructionTracer`, called around every
        instruction of ``train_batch``; without one, tracing costs nothing.
        """
        if type(engine) is not PipelineEngine:
            raise TypeError(
                f"ds_pipe_ext runs its schedules on DeepSpeed's PipelineEngine; deepspeed.initialize built a "
                f"{type(engine).__name__} for this model (use schedule 'deepspeed' to keep it)"
            )
        engine.__class__ = cls
        engine._start(schedule_cls, tracer)
        return engine

    def _start(self, schedule_cls: type[ds_schedule.PipeSchedule], tracer: Any) -> None:
        self.schedule_cls = schedule_cls
        self.tracer = tracer
        self._pending_sends: dict[int, deque[list[Any]]] = {}  # per neighbour stage, one entry per send, in order
        self._failed_batch: BaseException | None = None
        for key in ("losses", "grads", "pending_weight_grads"):
            self.pipe_buffers[key] = [None] * self.num_pipe_buffers
        neighbours = [stage for stage in (self.stage_id - 1, self.stage_id + 1) if 0 <= stage < self.num_stages]
        self._send_windows = {
            stage: send_window(schedule_cls, self.micro_batches, self.num_stages, self.stage_id, stage)
            for stage in neighbours
        }
        if uses_split_backward(self._schedule()):
            check_engine_can_split(self)  # once, on every rank, before the first batch

    def _schedule(self) -> ds_schedule.PipeSchedule:
        """This stage's part of the engine's training schedule."""
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
        """I: the gradient of the stage input, for ``SendGrad``; what the weights' gradients need waits for W.

        On the last stage I starts from the unscaled loss: DeepSpeed's hook on the stage output
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
        """Run ``pipe_schedule``, or this engine's schedule where ``train_batch`` hands over ``TrainSchedule``."""
        if type(pipe_schedule) is ds_schedule.TrainSchedule:
            pipe_schedule = self._schedule()
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
        self._reserve_pipe_buffers(pipe_schedule.num_pipe_buffers())
        self.fwd_outputs = []
        for step_cmds in pipe_schedule:
            for group in transfer_runs(step_cmds):
                for cmd in group:
                    self._exec_instruction(cmd)

    def _exec_instruction(self, cmd: ds_schedule.PipeInstruction) -> None:
        handler = self._INSTRUCTION_MAP.get(type(cmd))
        if handler is None:
            raise RuntimeError(f"{self.__class__.__name__} does not understand instruction {cmd!r}")
        if self.tracer is None:
            return handler(self, **cmd.kwargs)
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
