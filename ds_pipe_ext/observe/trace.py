"""Trace a real run instruction by instruction, and measure its bubble against theory and the simulator.

The engine calls :meth:`InstructionTracer.record` around every instruction ``train_batch`` executes, so the
events carry DeepSpeed's own instruction names. :meth:`InstructionTracer.save` gathers every rank's events into
one Chrome trace (Perfetto, chrome://tracing), one row per rank named by stage and replica.

Measured bubble: per step and pipeline, the span from the first instruction to the last backward, minus the
time each stage computes (forward and backward passes), over stages x span. The gradient reduction and
optimizer step are left out, as they are in the (K-1)/(M+K-1) formula and the simulator.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepspeed.runtime.pipe.schedule import (
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
)

from ..schedules import Layout, get_schedule
from .simulation import INSTRUCTION_SPECS, TimelineEvent, ideal_bubble_fraction, simulate, stage_bubble_fractions

TRACE_FILE = "trace.json"
#: Trace files name instructions by class; this reads them back.
_INSTRUCTIONS: dict[str, type[PipeInstruction]] = {cls.__name__: cls for cls in INSTRUCTION_SPECS}
_BUFFER_FILLS = (LoadMicroBatch, RecvActivation)


class InstructionTracer:
    """Records (instruction, micro-batch, start, end, chunk) on one rank; cheap enough to leave on (see bench/).

    ``layout`` is where the run's stages live (with virtual stages, which chunks each rank holds); the trace file
    keeps it, so the micro-batches, costs and pictures of a traced run are told apart per chunk.
    """

    def __init__(
        self,
        directory: str | Path,
        schedule: str,
        rank: int,
        stage: int,
        replica: int,
        synchronize=None,
        layout: Layout | None = None,
    ):
        self.directory = Path(directory)
        self.schedule = schedule
        self.rank, self.stage, self.replica = rank, stage, replica
        self.layout = layout
        self.synchronize = synchronize or (lambda: None)
        self.events: list[tuple[str, int | None, int | None, int, float, float, int]] = []
        self.origin = time.perf_counter()
        self._step = 0
        self._forwards: dict[int, int] = defaultdict(int)  # per chunk
        self._buffer_micro_batch: dict[int, int] = {}

    @classmethod
    def for_rank(
        cls, directory: str | Path, schedule: str, topology: Any, rank: int, layout: Layout | None = None
    ) -> InstructionTracer:
        """A tracer for ``rank`` of ``topology``, synchronising the accelerator around instructions."""
        from deepspeed.accelerator import get_accelerator

        coord = topology.get_coord(rank)
        accelerator = get_accelerator()
        sync = None if accelerator.device_name() == "cpu" else accelerator.synchronize
        return cls(directory, schedule, rank, coord.pipe, getattr(coord, "data", 0), sync, layout)

    def align(self) -> None:
        """Start the clock right after a barrier, so the ranks' timelines line up."""
        from deepspeed import comm as dist

        dist.barrier()
        self.origin = time.perf_counter()

    def record(self, instruction: PipeInstruction, start: float, end: float) -> None:
        buffer_id = getattr(instruction, "buffer_id", None)
        chunk = instruction.kwargs.get("chunk", 0)
        if isinstance(instruction, _BUFFER_FILLS):
            micro_batch = self._forwards[chunk]
        elif isinstance(instruction, ForwardPass):
            micro_batch = self._forwards[chunk]
            self._buffer_micro_batch[buffer_id] = micro_batch  # each chunk has buffers of its own
            self._forwards[chunk] += 1
        else:
            micro_batch = self._buffer_micro_batch.get(buffer_id)
        name = type(instruction).__name__
        self.events.append((name, buffer_id, micro_batch, self._step, start - self.origin, end - self.origin, chunk))
        if isinstance(instruction, OptimizerStep):
            self._step += 1
            self._forwards.clear()
            self._buffer_micro_batch.clear()

    def save(self) -> Path | None:
        """Gather all ranks' events (a collective) and write ``DIRECTORY/trace.json`` on global rank 0."""
        from deepspeed import comm as dist

        mine = {"rank": self.rank, "stage": self.stage, "replica": self.replica, "events": self.events}
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if dist.get_rank() != 0:
            return None
        path = self.directory / TRACE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(chrome_trace(gathered, self.schedule, self.layout)))
        return path


def chrome_trace(ranks: list[dict], schedule: str, layout: Layout | None = None) -> dict:
    """Chrome trace-event JSON: one thread per rank, one complete event ("X") per instruction, times in us.

    ``stage`` in an event's arguments is the pipeline rank's place in the pipeline; with virtual stages (a
    ``layout`` of several chunks per rank) ``chunk`` says which of the rank's chunks ran it and ``global_stage``
    which stage of the model that is, and the trace keeps the layout."""
    events = []
    virtual = layout is not None and layout.chunks > 1
    for info in ranks:
        rank = info["rank"]
        label = f"rank {rank}: stage {info['stage']}, replica {info['replica']}"
        if virtual:
            held = ", ".join(str(layout.stage(info["stage"], chunk)) for chunk in range(layout.chunks))
            label = f"rank {rank}: pipeline rank {info['stage']} (stages {held}), replica {info['replica']}"
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": label}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
        for name, buffer_id, micro_batch, step, start, end, *chunk in info["events"]:
            args = {
                "stage": info["stage"],
                "replica": info["replica"],
                "step": step,
                "buffer_id": buffer_id,
                "micro_batch": micro_batch,
            }
            if virtual:
                args["chunk"] = chunk[0] if chunk else 0
                args["global_stage"] = layout.stage(info["stage"], args["chunk"])
            events.append(
                {
                    "name": name,
                    "ph": "X",
                    "pid": 0,
                    "tid": rank,
                    "ts": start * 1e6,
                    "dur": (end - start) * 1e6,
                    "args": args,
                }
            )
    other = {"schedule": schedule}
    if virtual:
        other["layout"] = {"ranks": layout.ranks, "chunks": layout.chunks, "placement": layout.placement}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


@dataclass(frozen=True)
class TracedRun:
    """A loaded trace: events per (step, replica) as simulator-style timelines, in seconds. ``stages`` counts
    pipeline ranks; ``layout`` says which chunks (virtual stages) each holds."""

    schedule: str
    stages: int
    replicas: int
    steps: int
    micro_batches: int
    timelines: dict[tuple[int, int], list[TimelineEvent]]
    layout: Layout | None = None

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", Layout(self.stages))

    def schedule_class(self) -> type[PipeSchedule]:
        """The traced schedule, with the run's chunks per rank."""
        schedule = get_schedule(self.schedule)
        return schedule.with_chunks(self.layout.chunks) if self.layout.chunks > 1 else schedule

    def timeline(self, step: int, replica: int = 0) -> list[TimelineEvent]:
        """The pipelined part of one step on one replica (no gradient reduction or optimizer step)."""
        return self.timelines[(step, replica)]


def load_trace(directory: str | Path) -> TracedRun:
    path = Path(directory)
    path = path / TRACE_FILE if path.is_dir() else path
    if not path.exists():
        raise FileNotFoundError(f"no trace at {path}: run the example with --trace DIR first")
    timelines: dict[tuple[int, int], list[TimelineEvent]] = defaultdict(list)
    stages = replicas = steps = 0
    trace = json.loads(path.read_text())
    for event in trace["traceEvents"]:
        if event["ph"] != "X":
            continue
        args = event["args"]
        stages, replicas = max(stages, args["stage"] + 1), max(replicas, args["replica"] + 1)
        steps = max(steps, args["step"] + 1)
        instruction = _INSTRUCTIONS[event["name"]]
        if INSTRUCTION_SPECS[instruction].end_of_batch:
            continue
        start = event["ts"] / 1e6
        timelines[(args["step"], args["replica"])].append(
            TimelineEvent(
                args["stage"], instruction, args["micro_batch"], start, start + event["dur"] / 1e6, args.get("chunk", 0)
            )
        )
    complete = {key: sorted(events, key=lambda e: e.start) for key, events in timelines.items() if key[0] < steps}
    forwards = [e for e in complete.get((0, 0), []) if e.instruction is ForwardPass and (e.stage, e.chunk) == (0, 0)]
    layout = trace["otherData"].get("layout")
    layout = Layout(**layout) if layout else Layout(stages)
    return TracedRun(trace["otherData"]["schedule"], stages, replicas, steps, len(forwards), complete, layout)


@dataclass(frozen=True)
class BubbleReport:
    """Measured bubble of a traced run next to (K-1)/(M+K-1) (GPipe's and 1F1B's, with equal stages) and the
    simulator's prediction for the run's schedule from its measured per-stage pass times.

    The bubble is per pipeline rank; with virtual stages (``chunks`` per rank) the pass costs are per stage of the
    model, each of the ``chunks x stages`` stages. ``measured`` spans the whole step (loads, gradient reductions and
    the optimizer step count as bubble); ``measured_pipelined`` spans the passes only, from the first to the last
    on any rank: the part (K-1)/(M+K-1) and the simulator describe."""

    stages: int
    micro_batches: int
    measured_per_stage: list[float]
    measured: float
    theoretical: float
    predicted: float
    forward_cost: list[float]
    backward_cost: list[float]
    send_cost: float
    chunks: int = 1
    measured_pipelined: float | None = None

    def format(self) -> str:
        rank = "rank" if self.chunks > 1 else "stage"
        per_stage = ", ".join(f"{rank} {s}: {b:.3f}" for s, b in enumerate(self.measured_per_stage))
        costs = ", ".join(
            f"stage {s}: forward {f * 1e3:.1f} ms, backward {b * 1e3:.1f} ms"
            for s, (f, b) in enumerate(zip(self.forward_cost, self.backward_cost))
        )
        virtual = f", {self.chunks} virtual stages per rank" if self.chunks > 1 else ""
        passes = self.measured_pipelined
        passes_only = f"; between the first and the last pass {passes:.3f}" if passes is not None else ""
        return (
            f"bubble (K={self.stages}{virtual}, M={self.micro_batches}): measured {self.measured:.3f} ({per_stage})"
            f"{passes_only}; GPipe/1F1B theory (K-1)/(M+K-1) {self.theoretical:.3f}; "
            f"simulator from measured costs {self.predicted:.3f}\n"
            f"measured costs per micro-batch: {costs}; send {self.send_cost * 1e3:.2f} ms"
        )


def bubble_report(run: TracedRun, skip_steps: int = 1) -> BubbleReport:
    """Measure the bubble over every step after ``skip_steps`` warm-up steps and every replica."""
    keys = [key for key in run.timelines if key[0] >= min(skip_steps, run.steps - 1)]
    per_stage, pipelined = (
        [
            statistics.fmean(column)
            for column in zip(*(stage_bubble_fractions(run.timelines[key], run.stages, window) for key in keys))
        ]
        for window in ("step", "passes")
    )
    traced = {event.instruction for key in keys for event in run.timelines[key]}
    costs = {
        spec.cost: _median_cost(run, keys, cls)
        for cls, spec in INSTRUCTION_SPECS.items()
        if spec.compute and cls in traced
    }
    forward_cost = INSTRUCTION_SPECS[ForwardPass].cost
    forward = costs[forward_cost]
    backward = [sum(per_stage) for per_stage in zip(*(v for k, v in costs.items() if k != forward_cost))]
    costs["send"] = transfer_time((run.timelines[key] for key in keys), run.layout)
    predicted = simulate(run.schedule_class(), run.stages, run.micro_batches, costs=costs).bubble_fraction
    return BubbleReport(
        run.stages,
        run.micro_batches,
        per_stage,
        statistics.fmean(per_stage),
        ideal_bubble_fraction(run.stages, run.micro_batches),
        predicted,
        forward,
        backward,
        costs["send"],
        run.layout.chunks,
        statistics.fmean(pipelined),
    )


# receive -> (its send, where the sender is), from the instruction semantics the simulator uses
_SENDS = {
    receive: (send, spec.link.peer)
    for receive, spec in INSTRUCTION_SPECS.items()
    if spec.link is not None and not spec.link.sends
    for send, send_spec in INSTRUCTION_SPECS.items()
    if send_spec.link == spec.link.counterpart()
}
_SEND_CLASSES = {send for send, _ in _SENDS.values()}


def transfer_time(timelines: Iterable[Sequence[TimelineEvent]], layout: Layout | None = None) -> float:
    """The median time a tensor takes to arrive once both ends have reached the transfer: a receive ends that long
    after the later of its own start and its send's (sends do not wait, so the send's end says nothing). With
    virtual stages (``layout``) the sender is the rank and chunk holding the neighbouring stage; a hand-over between
    two chunks of one rank is no transfer and is left out."""
    times = []
    for timeline in timelines:
        where = layout or Layout(1 + max((e.stage for e in timeline), default=0))
        sends = {
            (e.stage, e.chunk, e.instruction, e.micro_batch): e for e in timeline if e.instruction in _SEND_CLASSES
        }
        for receive in timeline:
            if receive.instruction in _SENDS:
                send_class, peer = _SENDS[receive.instruction]
                neighbour = where.stage(receive.stage, receive.chunk) + peer
                if not 0 <= neighbour < where.stages:
                    continue
                rank, chunk = where.location(neighbour)
                send = sends.get((rank, chunk, send_class, receive.micro_batch))
                if send is not None and rank != receive.stage:
                    times.append(max(0.0, receive.end - max(receive.start, send.start)))
    return statistics.median(times) if times else 0.0


def _median_cost(run: TracedRun, keys: list[tuple[int, int]], instruction: type[PipeInstruction]) -> list[float]:
    """Per stage (with virtual stages, per stage of the model), the median over micro-batches of the time spent in
    ``instruction``.

    The median, not the mean: one descheduled instruction on a shared machine should not move the prediction.
    """
    per_micro_batch: dict[tuple[int, int, int, int, int | None], float] = defaultdict(float)
    for step, replica in keys:
        for event in run.timelines[(step, replica)]:
            if event.instruction is instruction:
                key = (event.stage, event.chunk, step, replica, event.micro_batch)
                per_micro_batch[key] += event.end - event.start
    return [
        statistics.median([t for (rank, chunk, *_), t in per_micro_batch.items() if (rank, chunk) == held] or [0.0])
        for held in map(run.layout.location, range(run.layout.stages))
    ]
