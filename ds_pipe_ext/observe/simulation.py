"""Schedules as data: replay every stage's instruction stream to validate it and to time it.

DeepSpeed's engine trusts its schedule: a receive without its send hangs the job, and a buffer reused too early
silently trains on the wrong activations. Replaying the streams of all stages together, as
:class:`~ds_pipe_ext.engine.SchedulePipelineEngine` runs them (sends do not wait; receives wait for their send),
turns those failures into a :class:`ScheduleError` that names the stage, step and instruction, and yields the
timeline the schedule would produce for given per-stage costs. Each step runs as the engine runs it
(:func:`~ds_pipe_ext.schedules.instructions.transfer_runs`): a run of sends and receives posts its sends first.

What each instruction does is declared once, in :data:`INSTRUCTION_SPECS`; a new instruction (say, the two halves of
a split backward) is taught to the simulator by adding an entry there and, if it has its own cost, a default to
:data:`DEFAULT_COSTS`.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from deepspeed.runtime.pipe.schedule import (
    BackwardPass,
    ForwardPass,
    LoadMicroBatch,
    OptimizerStep,
    PipeInstruction,
    PipeSchedule,
    RecvActivation,
    RecvGrad,
    ReduceGrads,
    ReduceTiedGrads,
    SendActivation,
    SendGrad,
)

from ..schedules import BackwardInputPass, BackwardWeightPass, get_schedule
from ..schedules.instructions import transfer_runs

__all__ = [
    "DEFAULT_COSTS",
    "INSTRUCTION_SPECS",
    "InstructionSpec",
    "Link",
    "ScheduleError",
    "SimulationResult",
    "TimelineEvent",
    "bubble_fraction",
    "ideal_bubble_fraction",
    "simulate",
    "stage_bubble_fractions",
    "validate",
]

Costs = Mapping[str, float | Sequence[float]]


class ScheduleError(ValueError):
    """A schedule that would hang, lose a micro-batch or corrupt a buffer on DeepSpeed's engine."""


@dataclass(frozen=True)
class Slot:
    """One of the per-buffer-id slots of ``PipelineEngine.pipe_buffers`` (with one received gradient per buffer)."""

    meaning: str
    exists: Callable[[bool, bool], bool]  # (is first stage, is last stage) -> does this stage have the slot


SLOTS: dict[str, Slot] = {
    "batch": Slot("loaded micro-batch", lambda first, last: first or last),  # inputs on stage 0, labels on the last
    "input": Slot("received activation", lambda first, last: not first),
    "output": Slot("activation", lambda first, last: True),  # forward outputs (and the loss on the last stage)
    "grad": Slot("received gradient", lambda first, last: not last),
}


@dataclass(frozen=True)
class Link:
    """One direction of point-to-point traffic, seen from one side: ``peer`` is -1 (previous stage) or +1."""

    peer: int
    payload: str
    sends: bool

    def counterpart(self) -> Link:
        return Link(-self.peer, self.payload, not self.sends)


@dataclass(frozen=True)
class InstructionSpec:
    """What one instruction class does to its stage, as far as validation and timing are concerned.

    An instruction acts on one micro-batch: the next one from the data iterator (``loads``), the one its matching send
    carried (a receiving ``link``), or the one held by the slots it ``reads`` in its buffer. ``work`` names what it
    completes for that micro-batch; every item of work an instruction can do on a stage must be done exactly once per
    micro-batch there. A slot's contents are still needed while the work of an instruction reading that slot is
    pending, and ``writes`` may not overwrite them then. An instruction applies on a stage whose ``link`` peer exists
    and which has all the slots it ``writes``.
    """

    work: tuple[str, ...] = ()
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    frees: tuple[str, ...] = ()
    after: tuple[str, ...] = ()  # work that must already be done for the micro-batch
    link: Link | None = None
    loads: bool = False
    cost: str | None = None  # key of DEFAULT_COSTS; a receive takes the sender's "send" cost
    compute: bool = False  # counts as busy time for the bubble
    first_waits: bool = False  # the first send on a link waits for its receive (DeepSpeed's send with the shapes)
    end_of_batch: bool = False  # must come after all work, in the order of INSTRUCTION_SPECS, once each


_SEND_ACTIVATION = Link(+1, "activation", sends=True)
_SEND_GRAD = Link(-1, "grad", sends=True)

INSTRUCTION_SPECS: dict[type[PipeInstruction], InstructionSpec] = {
    LoadMicroBatch: InstructionSpec(work=("load",), writes=("batch",), loads=True),
    RecvActivation: InstructionSpec(
        work=("recv_activation",), writes=("input",), link=_SEND_ACTIVATION.counterpart(), cost="send"
    ),
    ForwardPass: InstructionSpec(
        work=("forward",), reads=("batch", "input"), writes=("output",), cost="forward", compute=True
    ),
    SendActivation: InstructionSpec(
        work=("send_activation",), reads=("output",), link=_SEND_ACTIVATION, cost="send", first_waits=True
    ),
    RecvGrad: InstructionSpec(
        work=("recv_grad",), reads=("output",), writes=("grad",), link=_SEND_GRAD.counterpart(), cost="send"
    ),
    BackwardPass: InstructionSpec(
        work=("backward_input", "backward_weight"),
        reads=("output", "grad"),
        frees=("output", "grad"),
        cost="backward",
        compute=True,
    ),
    SendGrad: InstructionSpec(
        work=("send_grad",), reads=("input",), frees=("input",), after=("backward_input",), link=_SEND_GRAD, cost="send"
    ),
    BackwardInputPass: InstructionSpec(
        work=("backward_input",), reads=("output", "grad"), frees=("grad",), cost="backward_input", compute=True
    ),
    BackwardWeightPass: InstructionSpec(
        work=("backward_weight",),
        reads=("output",),
        after=("backward_input",),
        frees=("output",),
        cost="backward_weight",
        compute=True,
    ),
    ReduceTiedGrads: InstructionSpec(end_of_batch=True),
    ReduceGrads: InstructionSpec(end_of_batch=True),
    OptimizerStep: InstructionSpec(end_of_batch=True),
}

#: Seconds (or any unit) per instruction kind; a caller's value may be one number or one per stage.
DEFAULT_COSTS: dict[str, float] = {
    "forward": 1.0,
    "backward": 2.0,
    "send": 0.0,
    "backward_input": 1.0,  # the halves of a split backward: by default, half of "backward" each
    "backward_weight": 1.0,
}
_HALF_OF_BACKWARD = ("backward_input", "backward_weight")


@dataclass(frozen=True)
class TimelineEvent:
    """One instruction executed by one stage (simulated or traced)."""

    stage: int
    instruction: type[PipeInstruction]
    micro_batch: int | None
    start: float
    end: float

    @property
    def name(self) -> str:
        return self.instruction.__name__


@dataclass(frozen=True)
class SimulationResult:
    """The timeline of one batch, and the two numbers that tell schedules apart: idle time and activation memory."""

    stages: int
    micro_batches: int
    timeline: list[TimelineEvent]
    peak_buffers: list[int]  # per stage: most micro-batches forwarded but not yet backwarded at once

    @property
    def makespan(self) -> float:
        return max((event.end for event in self.timeline), default=0.0)

    @property
    def bubble_fraction(self) -> float:
        return bubble_fraction(self.timeline, self.stages)


def ideal_bubble_fraction(stages: int, micro_batches: int) -> float:
    """(K-1)/(M+K-1): the bubble of GPipe and 1F1B when every stage costs the same and communication is free."""
    return (stages - 1) / (micro_batches + stages - 1)


def stage_bubble_fractions(timeline: Sequence[TimelineEvent], stages: int) -> list[float]:
    """Per stage, the share of the whole run's span it spends outside compute: idle, waiting or communicating."""
    if not timeline:
        return [0.0] * stages
    start = min(event.start for event in timeline)
    span = max(event.end for event in timeline) - start
    busy = [0.0] * stages
    for event in timeline:
        if is_compute(event.instruction):
            busy[event.stage] += event.end - event.start
    return [1.0 - time / span if span > 0 else 0.0 for time in busy]


def is_compute(instruction: type[PipeInstruction]) -> bool:
    """Whether ``instruction`` is a pass (forward or backward), the time that counts as busy."""
    spec = INSTRUCTION_SPECS.get(instruction)
    return spec is not None and spec.compute


def bubble_fraction(timeline: Sequence[TimelineEvent], stages: int) -> float:
    """Time stages spend outside compute over stages x span, for simulated and traced timelines alike."""
    return sum(stage_bubble_fractions(timeline, stages)) / stages


def validate(schedule: str | type[PipeSchedule], stages: int, micro_batches: int) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` trains one batch correctly on DeepSpeed's engine.

    Checked on every stage: each micro-batch is loaded (first and last stage), forwarded and backwarded exactly once,
    in dependency order; sends and receives match one for one and in order on every link, without deadlock (sends
    do not block, receives do); no buffer is overwritten while its contents are needed, and every buffer id is below
    ``num_pipe_buffers()``; ReduceTiedGrads, ReduceGrads and OptimizerStep come last.
    """
    simulate(schedule, stages, micro_batches)


def simulate(
    schedule: str | type[PipeSchedule], stages: int, micro_batches: int, costs: Costs | None = None
) -> SimulationResult:
    """Validate ``schedule`` and time it: ``costs`` maps "forward", "backward" and "send" (one p2p transfer, from
    when both ends have reached it, at the sending stage's value) to a number or one number per stage; other
    instructions take no time. Defaults: :data:`DEFAULT_COSTS`. A schedule that splits the backward takes
    "backward_input" and "backward_weight", each half of "backward" unless given."""
    schedule_class = _schedule_class(schedule)
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {stages=}, {micro_batches=}")
    timeline, peaks = _replay(schedule_class, stages, micro_batches, _per_stage_costs(costs or {}, stages))
    return SimulationResult(stages, micro_batches, timeline, peaks)


def _schedule_class(schedule: str | type[PipeSchedule]) -> type[PipeSchedule]:
    if isinstance(schedule, str):
        return get_schedule(schedule)
    if isinstance(schedule, type) and issubclass(schedule, PipeSchedule):
        return schedule
    raise TypeError(f"expected a registered schedule name or a PipeSchedule subclass, got {schedule!r}")


def _per_stage_costs(costs: Costs, stages: int) -> dict[str, list[float]]:
    unknown = sorted(set(costs) - set(DEFAULT_COSTS))
    if unknown:
        raise ValueError(f"unknown cost {', '.join(map(repr, unknown))}; known costs: {', '.join(DEFAULT_COSTS)}")
    per_stage = {}
    for key, value in {**DEFAULT_COSTS, **costs}.items():
        values = [float(value)] * stages if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) != stages:
            raise ValueError(f"cost {key!r} has {len(values)} values; give one number or one per stage ({stages})")
        if min(values) < 0:
            raise ValueError(f"cost {key!r} is negative: {values}")
        per_stage[key] = values
    for key in set(_HALF_OF_BACKWARD) - set(costs):
        per_stage[key] = [value / 2 for value in per_stage["backward"]]
    return per_stage


class _StageReplay:
    """One stage's instruction stream and the state the engine would hold for it: what each buffer slot holds."""

    def __init__(self, schedule: PipeSchedule, micro_batches: int) -> None:
        self.stage = schedule.stage_id
        self.is_first = schedule.stage_id == 0
        self.is_last = schedule.stage_id == schedule.stages - 1
        self.num_buffers = schedule.num_pipe_buffers()
        self.stream = [
            (step, instruction)
            for step, step_cmds in enumerate(schedule)
            for group in transfer_runs(step_cmds)
            for instruction in group
        ]
        self.position = 0
        self.clock = 0.0
        self.slots = {name for name, slot in SLOTS.items() if slot.exists(self.is_first, self.is_last)}
        self.held: dict[tuple[str, int], int] = {}  # (slot, buffer id) -> micro-batch
        self.done: list[set[str]] = [set() for _ in range(micro_batches)]
        self.required = {item for spec in INSTRUCTION_SPECS.values() if self._applies(spec) for item in spec.work}
        self.loaded = 0
        self.batch_ended = False
        self.peak_activations = 0

    @property
    def finished(self) -> bool:
        return self.position == len(self.stream)

    def current(self) -> tuple[PipeInstruction, InstructionSpec]:
        instruction = self.stream[self.position][1]
        spec = INSTRUCTION_SPECS.get(type(instruction))
        if spec is None:
            raise self.error(f"unknown instruction; describe {type(instruction).__name__} in INSTRUCTION_SPECS")
        return instruction, spec

    def where(self) -> str:
        step, instruction = self.stream[self.position]
        return f"stage {self.stage}, step {step}, {instruction!r}"

    def error(self, problem: str) -> ScheduleError:
        return ScheduleError(f"{self.where()}: {problem}")

    def peer(self, link: Link) -> int:
        """The neighbour the current send or receive talks to."""
        if not self._has_peer(link):
            raise self.error(f"stage {self.stage} has no {'previous' if link.peer < 0 else 'next'} stage")
        return self.stage + link.peer

    def run(self, start: float, duration: float, incoming: int | None = None) -> TimelineEvent:
        """Execute the current instruction on the micro-batch it acts on, checking the buffers, and move past it."""
        instruction, spec = self.current()
        micro_batch = None if spec.end_of_batch else self._apply(instruction, spec, incoming)
        if spec.end_of_batch:
            self._end_batch()
        self.position += 1
        self.clock = start + duration
        return TimelineEvent(self.stage, type(instruction), micro_batch, start, self.clock)

    def _applies(self, spec: InstructionSpec) -> bool:
        return (spec.link is None or self._has_peer(spec.link)) and set(spec.writes) <= self.slots

    def _has_peer(self, link: Link) -> bool:
        return not (self.is_first and link.peer < 0) and not (self.is_last and link.peer > 0)

    def _apply(self, instruction: PipeInstruction, spec: InstructionSpec, incoming: int | None) -> int:
        if self.batch_ended:
            raise self.error("comes after the end-of-batch instructions (ReduceGrads, OptimizerStep)")
        missing = sorted(set(spec.writes) - self.slots)
        if missing:
            raise self.error(f"stage {self.stage} has no {' or '.join(SLOTS[slot].meaning for slot in missing)} buffer")
        buffer = instruction.buffer_id
        if not 0 <= buffer < self.num_buffers:
            raise self.error(f"buffer_id {buffer} is out of range: num_pipe_buffers() is {self.num_buffers}")
        micro_batch = self._micro_batch(buffer, spec, incoming)
        for item in spec.after:
            if item in self.required and item not in self.done[micro_batch]:
                raise self.error(f"micro-batch {micro_batch} has not had its {item} yet")
        for slot in self.slots.intersection(spec.writes):
            self._write(slot, buffer, micro_batch)
        for item in spec.work:
            if item in self.done[micro_batch]:
                raise self.error(f"micro-batch {micro_batch} gets its {item} a second time")
            self.done[micro_batch].add(item)
        for slot in spec.frees:
            self.held.pop((slot, buffer), None)
        live_activations = sum(1 for slot, _ in self.held if slot == "output")
        self.peak_activations = max(self.peak_activations, live_activations)
        return micro_batch

    def _micro_batch(self, buffer: int, spec: InstructionSpec, incoming: int | None) -> int:
        if spec.loads:
            if self.loaded == len(self.done):
                raise self.error(f"loads more than the {len(self.done)} micro-batches of the batch")
            self.loaded += 1
            return self.loaded - 1
        held = {slot: self.held.get((slot, buffer)) for slot in spec.reads if slot in self.slots}
        for slot, micro_batch in held.items():
            if micro_batch is None:
                raise self.error(f"buffer {buffer} holds no {SLOTS[slot].meaning}")
        if not held and incoming is None:
            raise self.error("acts on no micro-batch: its spec neither loads, receives nor reads one")
        if incoming is not None:
            for slot, micro_batch in held.items():
                if micro_batch != incoming:
                    raise self.error(
                        f"receives micro-batch {incoming}'s {spec.link.payload} into buffer {buffer}, "
                        f"which holds the {SLOTS[slot].meaning} of micro-batch {micro_batch}"
                    )
            return incoming
        if len(set(held.values())) > 1:
            contents = ", ".join(f"{SLOTS[slot].meaning} of micro-batch {mb}" for slot, mb in held.items())
            raise self.error(f"buffer {buffer} mixes micro-batches: {contents}")
        return next(iter(held.values()))

    def _write(self, slot: str, buffer: int, micro_batch: int) -> None:
        previous = self.held.get((slot, buffer))
        if previous is not None and previous != micro_batch:
            pending = sorted(self._pending_readers(slot, previous))
            if pending:
                raise self.error(
                    f"overwrites buffer {buffer}'s {SLOTS[slot].meaning} of micro-batch {previous}, "
                    f"still needed for its {', '.join(pending)}"
                )
        self.held[(slot, buffer)] = micro_batch

    def _pending_readers(self, slot: str, micro_batch: int) -> set[str]:
        readers = {item for spec in INSTRUCTION_SPECS.values() if slot in spec.reads for item in spec.work}
        return (readers & self.required) - self.done[micro_batch]

    def _end_batch(self) -> None:
        missing = self.missing_work()
        if missing:
            raise self.error(f"comes before {missing}; a stage's end-of-batch instructions must follow all its work")
        self.batch_ended = True

    def missing_work(self) -> str:
        for micro_batch, done in enumerate(self.done):
            for item in sorted(self.required - done):
                providers = [cls.__name__ for cls, spec in INSTRUCTION_SPECS.items() if item in spec.work]
                return f"the {item} of micro-batch {micro_batch} ({' or '.join(providers)})"
        return ""

    def check_complete(self) -> None:
        missing = self.missing_work()
        if missing:
            raise ScheduleError(f"stage {self.stage}: the schedule never does {missing}")
        expected = [cls.__name__ for cls, spec in INSTRUCTION_SPECS.items() if spec.end_of_batch]
        ending = [type(i).__name__ for _, i in self.stream if INSTRUCTION_SPECS[type(i)].end_of_batch]
        if ending != expected:
            raise ScheduleError(
                f"stage {self.stage}: a batch must end with {', '.join(expected)} (once each, in this order); "
                f"this stage has {', '.join(ending) or 'none of them'}"
            )


def _replay(
    schedule: type[PipeSchedule], stages: int, micro_batches: int, costs: Mapping[str, Sequence[float]]
) -> tuple[list[TimelineEvent], list[int]]:
    """Run all stages' streams together as a discrete-event simulation of :class:`SchedulePipelineEngine`.

    A stage runs local instructions back to back. A send posts its tensor and goes on, as the engine's ``isend``
    does; a receive waits until its neighbour has posted the matching send, and the transfer then takes the
    sender's "send" cost. The first activation on each link goes through DeepSpeed's send, which waits for the
    receive. When no stage can move and some have not finished, the schedule deadlocks.
    """
    replays = [
        _StageReplay(schedule(micro_batches=micro_batches, stages=stages, stage_id=stage), micro_batches)
        for stage in range(stages)
    ]
    posted: dict[tuple[int, int, str], deque[tuple[int, float, float]]] = defaultdict(deque)  # (from, to, payload)
    links_used: set[tuple[int, int, str]] = set()
    timeline: list[TimelineEvent] = []
    moved = True
    while moved:
        moved = False
        for replay in replays:
            while not replay.finished:
                _, spec = replay.current()
                if spec.link is None:
                    duration = costs[spec.cost][replay.stage] if spec.cost else 0.0
                    timeline.append(replay.run(replay.clock, duration))
                elif spec.link.sends:
                    link = (replay.stage, replay.peer(spec.link), spec.link.payload)
                    transfer = costs[spec.cost][replay.stage]
                    if spec.first_waits and link not in links_used:
                        receiver = replays[link[1]]
                        if receiver.finished or posted[link] or receiver.current()[1].link != spec.link.counterpart():
                            break
                        end = max(replay.clock, receiver.clock) + transfer
                        sent = replay.run(replay.clock, end - replay.clock)
                        timeline.append(receiver.run(receiver.clock, end - receiver.clock, incoming=sent.micro_batch))
                    else:
                        sent = replay.run(replay.clock, 0.0)
                        posted[link].append((sent.micro_batch, sent.start, transfer))
                    links_used.add(link)
                    timeline.append(sent)
                else:
                    queue = posted[(replay.peer(spec.link), replay.stage, spec.link.payload)]
                    if not queue:
                        break
                    micro_batch, sent_at, transfer = queue.popleft()
                    start = replay.clock
                    timeline.append(replay.run(start, max(start, sent_at) + transfer - start, incoming=micro_batch))
                moved = True
    blocked = [replay for replay in replays if not replay.finished]
    if blocked:
        waits = []
        for replay in blocked:
            peer = replay.peer(replay.current()[1].link)
            finished = ", which has finished" if replays[peer].finished else ""
            waits.append(f"{replay.where()} waits for stage {peer}{finished}")
        raise ScheduleError(
            f"deadlock: {'; '.join(waits)}. A receive must match a send that its neighbour reaches without waiting "
            "for this stage, in the same order on both ends of the link."
        )
    for (sender, receiver, payload), queue in posted.items():
        if queue:
            raise ScheduleError(
                f"stage {sender} sends micro-batch {queue[0][0]}'s {payload} to stage {receiver}, which never "
                "receives it"
            )
    for replay in replays:
        replay.check_complete()
    timeline.sort(key=lambda event: (event.start, event.stage))
    return timeline, [replay.peak_activations for replay in replays]
