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
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from ..observe.simulation import ScheduleError, validate
from ..schedules import BackwardInputPass, BackwardWeightPass
from ..schedules.instructions import RECEIVES, SENDS, transfer_runs
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
        split = (BackwardInputPass, BackwardWeightPass)
        if any(isinstance(cmd, split) for step in self._schedule() for cmd in step):
            check_engine_can_split(self)  # once, on every rank, before the first batch
        self._check_transport()

    def _check_transport(self) -> None:
        """Refuse, on every rank before the first batch, a schedule that would hang on this backend as this engine
        posts its transfers: the simulator replays it under that model (nccl's for any backend but gloo)."""
        backend = "gloo" if dist.get_backend() == "gloo" else "nccl"
        posting = "batched" if self._posts_in_batches() else "blocking"
        try:
            validate(self.schedule_cls, self.num_stages, self.micro_batches, backend=backend, posting=posting)
        except ScheduleError as error:
            how = (
                f"on {dist.get_backend()}, where a send waits for its receive"
                if posting == "batched"
                else "with DeepSpeed's blocking send and receive (this run has partitioned or dynamically shaped "
                "activations)"
            )
            raise ValueError(
                f"schedule {self.schedule_cls.__name__} cannot run {how}: {error} Use schedule '1f1b', which runs "
                "everywhere."
            ) from None

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

    def _posts_in_batches(self) -> bool:
        """Whether a step's transfers go out as one ``batch_isend_irecv``. Partitioned activations and gradients, and
        activations whose shapes change, go through DeepSpeed's own handlers instead: one blocking send or receive
        at a time, shapes sent with every activation."""
        partitioned = self.is_pipe_partitioned or self.is_grad_partitioned
        return p2p.can_send_recv() and not (partitioned or self.dynamic_shape)

    def _exec_transfers(self, transfers: list[ds_schedule.PipeInstruction]) -> None:
        """Post a run of sends and receives as one batch, wait for the receives, and file what arrived.

        A send's tensors stay referenced until the send window retires them (:meth:`_retire_old_send`) or the batch
        ends. Before the first activation on a link DeepSpeed's blocking exchange of the tensor shapes runs, as in
        its own engine.
        """
        ops, posted = [], []  # per instruction: (instruction, neighbour stage, its ops' slice, what to do on arrival)
        for cmd in transfers:
            if isinstance(cmd, ds_schedule.SendActivation):
                stage, tensors, arrival = self.next_stage, self._activations_to_send(cmd.buffer_id), None
            elif isinstance(cmd, ds_schedule.SendGrad):
                stage, tensors, arrival = self.prev_stage, self._grads_to_send(cmd.buffer_id), None
            elif isinstance(cmd, ds_schedule.RecvActivation):
                stage, tensors = self.prev_stage, self._activation_buffers()
                arrival = partial(self._file_activations, cmd.buffer_id, tensors)
            else:
                stage, tensors = self.next_stage, self._grad_buffers(cmd.buffer_id)
                arrival = partial(self._file_grads, cmd.buffer_id, tensors)
            if arrival is None:
                self._retire_old_send(stage)
            operation = dist.irecv if arrival else dist.isend
            rank = self.grid.stage_to_global(stage_id=stage)
            posted.append((cmd, stage, slice(len(ops), len(ops) + len(tensors)), arrival))
            ops += [dist.P2POp(operation, tensor, rank) for tensor in tensors]
        start = time.perf_counter()
        works = dist.batch_isend_irecv(ops)
        waited = time.perf_counter()
        for cmd, stage, span, arrival in posted:
            if arrival is None:
                self._pending_sends.setdefault(stage, deque()).append(works[span])
                if self.tracer is not None:
                    self.tracer.record(cmd, start, waited)
        for cmd, _, span, arrival in posted:
            if arrival is None:
                continue
            for work in works[span]:
                work.wait()
            arrival()
            if self.tracer is not None:
                self.tracer.synchronize()
                self.tracer.record(cmd, waited, now := time.perf_counter())
                waited = now

    def _activations_to_send(self, buffer_id: int) -> list[torch.Tensor]:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        tensors = [outputs] if torch.is_tensor(outputs) else list(outputs)
        if self.has_attention_mask or self.has_bool_tensors:
            tensors[-1] = tensors[-1].half()  # as DeepSpeed does: NCCL cannot send bool tensors
        if self.first_output_send:
            self.first_output_send = False
            self._send_tensor_meta(tensors[0] if torch.is_tensor(outputs) else tuple(tensors), self.next_stage)
        return tensors

    def _grads_to_send(self, buffer_id: int) -> list[torch.Tensor]:
        inputs = self.pipe_buffers["inputs"][buffer_id]
        self.pipe_buffers["inputs"][buffer_id] = None
        if torch.is_tensor(inputs):
            grads = [inputs.grad]
        else:
            if self.has_attention_mask or self.has_bool_tensors:
                inputs = inputs[:-1]  # the mask has no gradient; DeepSpeed's receiver does not expect one
            grads = [tensor.grad for tensor in inputs if tensor.is_floating_point()]
        if any(grad is None for grad in grads):
            raise RuntimeError(f"SendGrad(buffer_id={buffer_id}): a stage input has no gradient")
        return grads

    def _activation_buffers(self) -> list[torch.Tensor]:
        """Fresh tensors for one micro-batch's activations, shaped as the first activation announced."""
        if self.pipe_recv_buf is None:
            self.pipe_recv_buf = self._recv_tensor_meta(self.prev_stage)
        shapes = [self.pipe_recv_buf] if torch.is_tensor(self.pipe_recv_buf) else self.pipe_recv_buf
        return [torch.empty_like(tensor) for tensor in shapes]

    def _file_activations(self, buffer_id: int, tensors: list[torch.Tensor]) -> None:
        if self.has_attention_mask or self.has_bool_tensors:
            tensors[-1] = tensors[-1].bool()
        for tensor in tensors:
            tensor.requires_grad_(tensor.is_floating_point())
        single = torch.is_tensor(self.pipe_recv_buf)
        self.pipe_buffers["inputs"][buffer_id] = tensors[0] if single else tuple(tensors)

    def _grad_buffers(self, buffer_id: int) -> list[torch.Tensor]:
        """Fresh tensors for the gradients of this buffer's (floating-point) outputs."""
        outputs = self.pipe_buffers["outputs"][buffer_id]
        outputs = [outputs] if torch.is_tensor(outputs) else [t for t in outputs if t.is_floating_point()]
        return [torch.empty_like(output) for output in outputs]

    def _file_grads(self, buffer_id: int, tensors: list[torch.Tensor]) -> None:
        single = torch.is_tensor(self.pipe_buffers["outputs"][buffer_id])
        self.pipe_buffers["grads"][buffer_id] = tensors[0] if single else tensors

    def _retire_old_send(self, stage: int) -> None:
        """Keep at most the send window of sends to ``stage`` in flight: the oldest has surely arrived by now
        (:func:`send_window`), so waiting for it does not wait on the neighbour."""
        sends = self._pending_sends.setdefault(stage, deque())
        if len(sends) >= self._send_windows[stage]:
            for work in sends.popleft():
                work.wait()  # gloo's is_completed() stays False until wait()

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
        batched = self._posts_in_batches()
        for step_cmds in pipe_schedule:
            for group in transfer_runs(step_cmds):
                if batched and isinstance(group[0], SENDS + RECEIVES):
                    self._exec_transfers(group)
                    continue
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
        BackwardInputPass: _exec_backward_input_pass,
        BackwardWeightPass: _exec_backward_weight_pass,
    }
