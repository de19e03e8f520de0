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
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.runtime.pipe import p2p
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.engine import PipelineEngine

from .. import compat
from ..observe.simulation import ScheduleError, validate
from ..schedules import BackwardInputPass, BackwardWeightPass
from ..schedules.instructions import RECEIVES, SENDS, transfer_runs, uses_split_backward
from ..schedules.layout import Layout
from .channels import Channels, Shapes
from .split_backward import backward_input, backward_weight, check_engine_can_split

__all__ = ["SchedulePipelineEngine", "send_window"]


def send_window(
    schedule_cls: type[ds_schedule.PipeSchedule], micro_batches: int, stages: int, link: tuple[int, int]
) -> int:
    """How many sends on ``link`` (from global stage, to global stage) may be in flight: the send that many back is
    sure to have arrived when the next is posted, so waiting for it never waits on the neighbour.

    A stage sends micro-batch j's activation after its forward, which takes one of its chunk's n buffers; every
    activation sent whose gradient has not come back still holds a buffer (``RecvGrad`` reads it), so the
    activation n sends back has had its gradient, and had arrived. A stage sends j's input gradient after
    receiving j's activation, which the previous stage (n' buffers) sent only after the gradient n' sends back had
    arrived. So on either direction of a link the window is the buffer count of the link's lower stage. This holds
    for every schedule :func:`~ds_pipe_ext.observe.simulation.validate` accepts: its buffer rules are these.
    """
    probe = schedule_cls(micro_batches=micro_batches, stages=stages, stage_id=0)
    layout = getattr(probe, "layout", None) or Layout(stages)
    owner = schedule_cls(micro_batches=micro_batches, stages=stages, stage_id=layout.location(min(link))[0])
    return getattr(owner, "buffers_per_chunk", None) or owner.num_pipe_buffers()


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
        self.layout: Layout = getattr(self._schedule(), "layout", None) or Layout(self.num_stages)
        self._active_chunk: int | None = None
        self._pending_sends: dict[tuple[int, int], deque[list[Any]]] = defaultdict(deque)  # per link, per send
        self._handovers: dict[tuple[int, int], deque[list[torch.Tensor]]] = defaultdict(deque)
        self._shapes: dict[tuple[int, int], Shapes] = {}  # per link: sent or received ahead of its first activation
        self._send_windows: dict[tuple[int, int], int] = {}
        self._failed_batch: BaseException | None = None
        for key in ("losses", "grads", "pending_weight_grads"):
            self.pipe_buffers[key] = [None] * self.num_pipe_buffers
        self._check_layout()
        if uses_split_backward(self._schedule()):
            check_engine_can_split(self)  # once, on every rank, before the first batch
        self._check_transport()
        if self._posts_own_transfers():  # creating process groups is a collective: every rank does it here
            self.channels = Channels(self.grid._topo.get_axis_comm_lists("pipe"), self.layout, self.global_rank)

    def _check_layout(self) -> None:
        """The module must hold the chunks the schedule runs, placed as it needs them."""
        chunks = getattr(self.module, "virtual_stages", 1)
        placement = getattr(self.module, "placement", self.layout.placement)
        if (chunks, placement) != (self.layout.chunks, self.layout.placement if chunks > 1 else placement):
            raise ValueError(
                f"schedule {self.schedule_cls.__name__} runs {self.layout.chunks} chunk(s) per stage placed "
                f"'{self.layout.placement}', the module holds {chunks} placed '{placement}': build "
                f"ds_pipe_ext.PipelineModule(virtual_stages={self.layout.chunks}, schedule=...) for this schedule"
            )

    def _check_transport(self) -> None:
        """Refuse, on every rank before the first batch, a schedule that would hang on this backend as this engine
        posts its transfers: the simulator replays it under that model (nccl's for any backend but gloo)."""
        backend = "gloo" if dist.get_backend() == "gloo" else "nccl"
        transport = "engine" if self._posts_own_transfers() else "blocking"
        if transport == "blocking" and getattr(self.schedule_cls, "chunks", 1) > 1:
            raise ValueError(
                f"schedule {self.schedule_cls.__name__} runs virtual stages, whose transfers go to the rank holding "
                "the neighbouring stage; this run has partitioned or dynamically shaped activations, which go through "
                "DeepSpeed's own send and receive (to the next and previous rank only). Turn off activation "
                "partitioning and dynamic shapes, or use a schedule without virtual stages"
            )
        try:
            validate(self.schedule_cls, self.num_stages, self.micro_batches, backend=backend, transport=transport)
        except ScheduleError as error:
            how = (
                f"on {dist.get_backend()}"
                if transport == "engine"
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
            self.loss = compat.loss_for_backward(self, self.pipe_buffers["losses"][buffer_id])
            self.pipe_buffers["losses"][buffer_id] = None
        else:
            self.grad_layer = self.pipe_buffers["grads"][buffer_id]
            self.pipe_buffers["grads"][buffer_id] = None
        with compat.running_engine_backward(self):
            super()._exec_backward_pass(buffer_id)

    def _exec_backward_input_pass(self, buffer_id: int) -> None:
        """I: the gradient of the stage input, for ``SendGrad``; what the weights' gradients need waits for W.

        On the last stage I starts from the loss as ``engine.backward`` would
        (:func:`ds_pipe_ext.compat.split_backward_loss`: divided by the accumulation steps once, on the loss or by
        DeepSpeed's hook on the stage output as the release does, then scaled as ``engine.backward`` scales it, for
        fp16's loss scaling). The first stage has no input gradient to compute: its W runs the whole backward. Around
        the autograd call, what DeepSpeed does around a backward (:meth:`_before_backward_half`,
        :meth:`_flush_low_precision_grads`), so that the weights whose gradients I computes (those that join the input
        path twice) are accumulated as one backward's would be.
        """
        if self.is_first_stage():
            return
        with ExitStack() as stack:
            if self.is_last_stage():
                loss = self.pipe_buffers["losses"][buffer_id]
                outputs, grads = [stack.enter_context(compat.split_backward_loss(self, loss))], [None]
                self.pipe_buffers["losses"][buffer_id] = None
            else:
                outputs, grads = self.pipe_buffers["outputs"][buffer_id], self.pipe_buffers["grads"][buffer_id]
                self.pipe_buffers["grads"][buffer_id] = None
                if torch.is_tensor(outputs):
                    outputs, grads = [outputs], [grads]
                else:
                    outputs = [output for output in outputs if output.is_floating_point()]
            inputs = self.pipe_buffers["inputs"][buffer_id]
            stack.enter_context(compat.running_engine_backward(self))
            self._before_backward_half()
            pending = backward_input(
                outputs, grads, [inputs] if torch.is_tensor(inputs) else inputs, self.module.parameters()
            )
            self._flush_low_precision_grads()
        self.pipe_buffers["pending_weight_grads"][buffer_id] = pending

    def _exec_backward_weight_pass(self, buffer_id: int) -> None:
        """W: accumulate the weight gradients into ``.grad``, then free the micro-batch's activations.

        Around it, what DeepSpeed does around a backward; after the last stage's W, what ends ``engine.backward``
        (``_backward_epilogue``: the bf16 optimizer's accumulation into its fp32 gradients, ZeRO's epilogue), once per
        micro-batch as DeepSpeed runs it.
        """
        if self.is_first_stage():
            return self._exec_backward_pass(buffer_id)
        with compat.running_engine_backward(self):
            self._before_backward_half()
            backward_weight(self.pipe_buffers["pending_weight_grads"][buffer_id])
            if self.is_last_stage():
                self._backward_epilogue()
            else:
                self._flush_low_precision_grads()
        self.pipe_buffers["pending_weight_grads"][buffer_id] = None
        self.pipe_buffers["outputs"][buffer_id] = None
        self.pipe_buffers["output_tensors"][buffer_id] = None

    def _before_backward_half(self) -> None:
        """What DeepSpeed does before each backward of a stage with its BF16_Optimizer: clear the bf16 gradients.
        They hold nothing unaccounted for: each half ends by accumulating them (:meth:`_flush_low_precision_grads`),
        so that every micro-batch's gradient reaches the optimizer's gradient buffer once, on its own, in the order
        of the W passes, as one backward per micro-batch would deliver it."""
        if self.using_bf16_optimizer:
            self.optimizer.clear_lp_grads()

    def _flush_low_precision_grads(self) -> None:
        """What DeepSpeed does after each backward of a stage with its BF16_Optimizer: add the bf16 gradients into
        its own (fp32, or bf16) gradient buffer, unless its gradient hooks did (``immediate_grad_update``). The
        other optimizers accumulate in their gradient hooks (ZeRO) or in ``.grad`` (fp32, fp16) as autograd runs."""
        if self.using_bf16_optimizer:
            self.optimizer.update_hp_grads(clear_lp_grads=False)

    def _posts_own_transfers(self) -> bool:
        """Whether this engine posts the transfers itself, each on its link's channel (:mod:`.channels`).
        Partitioned activations and gradients, and activations whose shapes change, go through DeepSpeed's own
        handlers instead: one blocking send or receive at a time, shapes sent with every activation."""
        partitioned = self.is_pipe_partitioned or self.is_grad_partitioned
        return p2p.can_send_recv() and not (partitioned or self.dynamic_shape)

    # ---- chunks: which of this rank's virtual stages an instruction runs on

    def is_first_stage(self) -> bool:
        """On a chunk: whether it is the pipeline's first stage; between instructions: whether this rank holds it."""
        return self._holds(0) if getattr(self, "layout", None) else super().is_first_stage()

    def is_last_stage(self) -> bool:
        """On a chunk: whether it is the pipeline's last stage; between instructions: whether this rank holds it."""
        return self._holds(self.layout.stages - 1) if getattr(self, "layout", None) else super().is_last_stage()

    def _holds(self, stage: int) -> bool:
        rank, chunk = self.layout.location(stage)
        return rank == self.stage_id and self._active_chunk in (None, chunk)

    def _loss_stage_global_rank(self) -> int:
        return self.grid.stage_to_global(self.layout.location(self.layout.stages - 1)[0])

    def _stage(self, cmd: ds_schedule.PipeInstruction) -> int:
        return self.layout.stage(self.stage_id, cmd.kwargs.get("chunk", 0))

    def _exec_load_micro_batch(self, buffer_id: int, label_buffer: int | None = None) -> None:
        """DeepSpeed's load. A rank that holds both the first and the last stage (the v placement) loads each
        micro-batch once, as both, and files the labels where its last stage's chunk reads them."""
        if label_buffer is None:
            return super()._exec_load_micro_batch(buffer_id)
        with self._on_chunk(None):
            super()._exec_load_micro_batch(buffer_id)
        labels = self.pipe_buffers["labels"]
        labels[label_buffer], labels[buffer_id] = labels[buffer_id], None

    # ---- transfers

    def _exec_transfers(self, transfers: list[ds_schedule.PipeInstruction]) -> None:
        """Post a run of sends and receives, each on its link's channel, then wait for the receives and file what
        arrived. A transfer between two chunks of this rank is handed over in place.

        A send's tensors stay referenced until the send window retires them (:meth:`_retire_old_send`) or the
        batch ends.
        """
        start = time.perf_counter()
        receives = []
        for cmd in transfers:
            stage = self._stage(cmd)
            if isinstance(cmd, SENDS):
                link = (stage, stage + 1) if isinstance(cmd, ds_schedule.SendActivation) else (stage, stage - 1)
                activation = isinstance(cmd, ds_schedule.SendActivation)
                outputs = self.pipe_buffers["outputs"][cmd.buffer_id]
                tensors = self._activations_to_send(cmd.buffer_id) if activation else self._grads_to_send(cmd.buffer_id)
                self._send(link, tensors, announce=activation, as_tuple=activation and not torch.is_tensor(outputs))
                if self.tracer is not None:
                    self.tracer.record(cmd, start, time.perf_counter())
            else:
                link = (stage - 1, stage) if isinstance(cmd, ds_schedule.RecvActivation) else (stage + 1, stage)
                receives.append((cmd, link, self._post_receive(cmd, link)))
        waited = time.perf_counter()
        for cmd, link, posted in receives:
            tensors, as_tuple = self._finish_receive(cmd, link, posted)
            if isinstance(cmd, ds_schedule.RecvActivation):
                self._file_activations(cmd.buffer_id, tensors, as_tuple)
            else:
                self._file_grads(cmd.buffer_id, tensors)
            if self.tracer is not None:
                self.tracer.synchronize()
                self.tracer.record(cmd, waited, now := time.perf_counter())
                waited = now

    def _send(self, link: tuple[int, int], tensors: list[torch.Tensor], announce: bool, as_tuple: bool) -> None:
        if self.layout.location(link[1])[0] == self.stage_id:
            self._handovers[link].append((tensors, as_tuple))
            return
        group, peer = self.channels.group(link), self.channels.peer(link)
        sends = []
        if announce and link not in self._shapes:
            self._shapes[link] = Shapes.of(tensors, as_tuple)  # sent once, ahead of the link's first activation
            sends.append(dist.isend(self._shapes[link].encode(self.device), peer, group=group))
        self._retire_old_send(link)
        sends += [dist.isend(tensor, peer, group=group) for tensor in tensors]
        self._pending_sends[link].append(sends)

    def _post_receive(self, cmd: ds_schedule.PipeInstruction, link: tuple[int, int]) -> Any:
        """Post the receive if its shapes are known (a gradient's are those of the output it is for); else post the
        receive of the shapes message that comes ahead of the link's first activation."""
        if self.layout.location(link[0])[0] == self.stage_id:
            return None
        group, peer = self.channels.group(link), self.channels.peer(link)
        if isinstance(cmd, ds_schedule.RecvGrad):
            tensors = self._grad_buffers(cmd.buffer_id)
        elif link in self._shapes:
            tensors = self._shapes[link].empty(self.device)
        else:
            message = Shapes.message(self.device)
            return ("shapes", message, [dist.irecv(message, peer, group=group)])
        return ("tensors", tensors, [dist.irecv(tensor, peer, group=group) for tensor in tensors])

    def _finish_receive(
        self, cmd: ds_schedule.PipeInstruction, link: tuple[int, int], posted: Any
    ) -> tuple[list[torch.Tensor], bool]:
        """Wait for a posted receive: the tensors, and whether the sender's output was a tuple."""
        if posted is None:
            tensors, as_tuple = self._handovers[link].popleft()
            if isinstance(cmd, ds_schedule.RecvActivation):  # a new leaf, as a received activation is
                tensors = [tensor.detach() for tensor in tensors]
            return tensors, as_tuple
        kind, tensors, works = posted
        if kind == "shapes":
            works[0].wait()
            self._shapes[link] = Shapes.decode(tensors)
            _, tensors, works = self._post_receive(cmd, link)
        for work in works:
            work.wait()
        shapes = self._shapes.get(link)
        return tensors, shapes is not None and shapes.as_tuple

    def _activations_to_send(self, buffer_id: int) -> list[torch.Tensor]:
        outputs = self.pipe_buffers["outputs"][buffer_id]
        tensors = [outputs] if torch.is_tensor(outputs) else list(outputs)
        if self.has_attention_mask or self.has_bool_tensors:
            tensors[-1] = tensors[-1].half()  # as DeepSpeed does: NCCL cannot send bool tensors
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

    def _file_activations(self, buffer_id: int, tensors: list[torch.Tensor], as_tuple: bool) -> None:
        if self.has_attention_mask or self.has_bool_tensors:
            tensors[-1] = tensors[-1].bool()
        for tensor in tensors:
            tensor.requires_grad_(tensor.is_floating_point())
        self.pipe_buffers["inputs"][buffer_id] = tuple(tensors) if as_tuple else tensors[0]

    def _grad_buffers(self, buffer_id: int) -> list[torch.Tensor]:
        """Fresh tensors for the gradients of this buffer's (floating-point) outputs."""
        outputs = self.pipe_buffers["outputs"][buffer_id]
        outputs = [outputs] if torch.is_tensor(outputs) else [t for t in outputs if t.is_floating_point()]
        return [torch.empty_like(output) for output in outputs]

    def _file_grads(self, buffer_id: int, tensors: list[torch.Tensor]) -> None:
        single = torch.is_tensor(self.pipe_buffers["outputs"][buffer_id])
        self.pipe_buffers["grads"][buffer_id] = tensors[0] if single else tensors

    def _retire_old_send(self, link: tuple[int, int]) -> None:
        """Keep at most the send window of sends on ``link`` in flight: the oldest has surely arrived by now
        (:func:`send_window`), so waiting for it does not wait on the neighbour."""
        if link not in self._send_windows:
            self._send_windows[link] = send_window(self.schedule_cls, self.micro_batches, self.num_stages, link)
        sends = self._pending_sends[link]
        if len(sends) >= self._send_windows[link]:
            for work in sends.popleft():
                work.wait()  # arrived already: returns at once (gloo's is_completed() stays False until wait())

    def _wait_for_sends(self) -> None:
        for sends in self._pending_sends.values():
            for works in sends:
                for work in works:
                    work.wait()
        self._pending_sends.clear()

    def eval_batch(self, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``eval_batch``; not yet with virtual stages, whose forward-only schedule is not written."""
        if self.layout.chunks > 1:
            raise NotImplementedError(
                f"eval_batch runs DeepSpeed's InferenceSchedule, one stage per rank; this engine's schedule "
                f"{self.schedule_cls.__name__} runs {self.layout.chunks} virtual stages per rank, for which no "
                "forward-only schedule exists yet: evaluate with a model built without virtual stages"
            )
        return super().eval_batch(*args, **kwargs)

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
        own_transfers = self._posts_own_transfers()
        for step_cmds in pipe_schedule:
            for group in transfer_runs(step_cmds):
                if own_transfers and isinstance(group[0], SENDS + RECEIVES):
                    self._exec_transfers(group)
                    continue
                for cmd in group:
                    self._exec_instruction(cmd)

    def _exec_instruction(self, cmd: ds_schedule.PipeInstruction) -> None:
        handler = self._INSTRUCTION_MAP.get(type(cmd))
        if handler is None:
            raise RuntimeError(f"{self.__class__.__name__} does not understand instruction {cmd!r}")
        kwargs = dict(cmd.kwargs)
        with self._on_chunk(kwargs.pop("chunk", 0)):
            if self.tracer is None:
                return handler(self, **kwargs)
            self.tracer.synchronize()
            start = time.perf_counter()
            handler(self, **kwargs)
            self.tracer.synchronize()
            self.tracer.record(cmd, start, time.perf_counter())

    @contextmanager
    def _on_chunk(self, chunk: int | None) -> Iterator[None]:
        """Run on this rank's ``chunk``: its layers (a module with virtual stages), its place in the pipeline."""
        previous, self._active_chunk = self._active_chunk, chunk
        activate = getattr(self.module, "activate_chunk", None)
        if activate is not None and chunk is not None:
            activate(chunk)
        try:
            yield
        finally:
            self._active_chunk = previous

    def save_trace(self) -> Any:
        """Write the trace of every rank into one Chrome trace file (a collective); its path on global rank 0."""
        if self.tracer is None:
            raise RuntimeError("this engine is not tracing: pass trace_dir= to ds_pipe_ext.initialize")
        return self.tracer.save()

    # ---- where DeepSpeed releases differ (ds_pipe_ext.compat) ----

    def _backward_prologue_per_tensor(self, grad: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's hook on a stage output (0.18.3 on): divide by the accumulation steps on the last stage only."""
        return compat.stage_output_grad(self, grad)

    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds_schedule.LoadMicroBatch: _exec_load_micro_batch,
        ds_schedule.ForwardPass: _exec_forward_pass,
        ds_schedule.BackwardPass: _exec_backward_pass,
        ds_schedule.RecvGrad: _exec_recv_grads,
        BackwardInputPass: _exec_backward_input_pass,
        BackwardWeightPass: _exec_backward_weight_pass,
    }
