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

from collections import defaultdict
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
    shapes_first: bool = False  # a link's first transfer exchanges the tensor shapes first, blocking, as DeepSpeed does
    end_of_batch: bool = False  # must come after all work, in the order of INSTRUCTION_SPECS, once each


_SEND_ACTIVATION = Link(+1, "activation", sends=True)
_SEND_GRAD = Link(-1, "grad", sends=True)

INSTRUCTION_SPECS: dict[type[PipeInstruction], InstructionSpec] = {
    LoadMicroBatch: InstructionSpec(work=("load",), writes=("batch",), loads=True),
    RecvActivation: InstructionSpec(
        work=("recv_activation",),
        writes=("input",),
        link=_SEND_ACTIVATION.counterpart(),
        cost="send",
        shapes_first=True,
    ),
    ForwardPass: InstructionSpec(
        work=("forward",), reads=("batch", "input"), writes=("output",), cost="forward", compute=True
    ),
    SendActivation: InstructionSpec(
        work=("send_activation",), reads=("output",), link=_SEND_ACTIVATION, cost="send", shapes_first=True
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


def validate(
    schedule: str | type[PipeSchedule],
    stages: int,
    micro_batches: int,
    backend: str = "gloo",
    posting: str = "batched",
) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` trains one batch correctly on DeepSpeed's engine.

    Checked on every stage: each micro-batch is loaded (first and last stage), forwarded and backwarded exactly once,
    in dependency order; sends and receives pair up one for one and in order between every two stages, without
    deadlock; no buffer is overwritten while its contents are needed, and every buffer id is below
    ``num_pipe_buffers()``; ReduceTiedGrads, ReduceGrads and OptimizerStep come last.

    ``backend`` is the model of the transport. ``"gloo"``: a send is buffered and does not wait; a receive waits
    for its send. ``"nccl"``: the sends and receives between two ranks run in the order they were posted and a send
    completes only once its receive is posted (NCCL buffers nothing past a small size), so a stage waits for every
    transfer of a batch; a batch progresses as a group. ``posting`` is how the engine posts them: ``"batched"``,
    each run of transfers in a step at once (ds_pipe_ext's engine); ``"blocking"``, one at a time, each send
    waiting for its receive (DeepSpeed's own handlers, which ds_pipe_ext's engine uses for partitioned or
    dynamically shaped activations). Either way a link's first activation is preceded by a blocking exchange of
    the tensor shapes, as DeepSpeed does.
    """
    simulate(schedule, stages, micro_batches, backend=backend, posting=posting)


def simulate(
    schedule: str | type[PipeSchedule],
    stages: int,
    micro_batches: int,
    costs: Costs | None = None,
    backend: str = "gloo",
    posting: str = "batched",
) -> SimulationResult:
    """Validate ``schedule`` (see :func:`validate`) and time it: ``costs`` maps "forward", "backward" and "send"
    (one p2p transfer, from when both ends have posted it, at the sending stage's value) to a number or one number
    per stage; other instructions take no time. Defaults: :data:`DEFAULT_COSTS`. A schedule that splits the
    backward takes "backward_input" and "backward_weight", each half of "backward" unless given."""
    schedule_class = _schedule_class(schedule)
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {stages=}, {micro_batches=}")
    if (backend, posting) not in _MODELS:
        raise ValueError(
            f"backend must be 'gloo' or 'nccl' and posting 'batched' or 'blocking', got {backend!r}, {posting!r}"
        )
    per_stage = _per_stage_costs(costs or {}, stages)
    timeline, peaks = _replay(schedule_class, stages, micro_batches, per_stage, backend, posting)
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


@dataclass
class _Unit:
    """What a stage executes in one go: a local instruction, a batch of sends and receives posted together, or the
    blocking exchange of tensor shapes that precedes a link's first activation (``shapes``)."""

    step: int
    kind: str  # "local", "batch" or "shapes"
    instructions: list[PipeInstruction]


@dataclass
class _Transfer:
    """One posted send or receive, and the micro-batch it carries (known for a send when it is posted)."""

    stage: int
    instruction: PipeInstruction
    posted: float
    shapes: bool
    position: int = 0  # among the transfers in its direction between its two stages
    micro_batch: int | None = None


class _StageReplay:
    """One stage's instruction stream and the state the engine would hold for it: what each buffer slot holds."""

    def __init__(self, schedule: PipeSchedule, micro_batches: int, posting: str) -> None:
        self.stage = schedule.stage_id
        self.is_first = schedule.stage_id == 0
        self.is_last = schedule.stage_id == schedule.stages - 1
        self.num_buffers = schedule.num_pipe_buffers()
        self.units = self._units(schedule, posting)
        self.index = 0
        self.posted: list[_Transfer] | None = None
        self.step, self.instruction = 0, None
        self.clock = 0.0
        self.slots = {name for name, slot in SLOTS.items() if slot.exists(self.is_first, self.is_last)}
        self.held: dict[tuple[str, int], int] = {}  # (slot, buffer id) -> micro-batch
        self.done: list[set[str]] = [set() for _ in range(micro_batches)]
        self.required = {item for spec in INSTRUCTION_SPECS.values() if self._applies(spec) for item in spec.work}
        self.loaded = 0
        self.batch_ended = False
        self.peak_activations = 0

    def _units(self, schedule: PipeSchedule, posting: str) -> list[_Unit]:
        units, shapes_sent = [], set()
        for step, step_cmds in enumerate(schedule):
            groups = transfer_runs(step_cmds) if posting == "batched" else [[cmd] for cmd in step_cmds]
            for group in groups:
                specs = [self.spec(step, instruction) for instruction in group]
                if not any(spec.link for spec in specs):
                    units += [_Unit(step, "local", [instruction]) for instruction in group]
                    continue
                for instruction, spec in zip(group, specs):
                    if spec.shapes_first and spec.link not in shapes_sent:
                        shapes_sent.add(spec.link)
                        units.append(_Unit(step, "shapes", [instruction]))
                units.append(_Unit(step, "batch", group))
        return units

    def spec(self, step: int, instruction: PipeInstruction) -> InstructionSpec:
        spec = INSTRUCTION_SPECS.get(type(instruction))
        if spec is None:
            self.step, self.instruction = step, instruction
            raise self.error(f"unknown instruction; describe {type(instruction).__name__} in INSTRUCTION_SPECS")
        return spec

    @property
    def finished(self) -> bool:
        return self.index == len(self.units)

    @property
    def unit(self) -> _Unit:
        return self.units[self.index]

    def where(self) -> str:
        return f"stage {self.stage}, step {self.step}, {self.instruction!r}"

    def error(self, problem: str) -> ScheduleError:
        return ScheduleError(f"{self.where()}: {problem}")

    def peer(self, link: Link) -> int:
        """The neighbour a send or receive on ``link`` talks to."""
        if not self._has_peer(link):
            raise self.error(f"stage {self.stage} has no {'previous' if link.peer < 0 else 'next'} stage")
        return self.stage + link.peer

    def at(self, instruction: PipeInstruction) -> InstructionSpec:
        """Make ``instruction`` (of the current unit) the one errors name, and return its spec."""
        self.step, self.instruction = self.unit.step, instruction
        return INSTRUCTION_SPECS[type(instruction)]

    def run(self, instruction: PipeInstruction, start: float, end: float, incoming: int | None = None) -> TimelineEvent:
        """Execute ``instruction`` on the micro-batch it acts on, checking the buffers."""
        spec = self.at(instruction)
        micro_batch = None if spec.end_of_batch else self._apply(instruction, spec, incoming)
        if spec.end_of_batch:
            self._end_batch()
        return TimelineEvent(self.stage, type(instruction), micro_batch, start, end)

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
        ending = [
            type(i).__name__
            for unit in self.units
            if unit.kind == "local"
            for i in unit.instructions
            if INSTRUCTION_SPECS[type(i)].end_of_batch
        ]
        if ending != expected:
            raise ScheduleError(
                f"stage {self.stage}: a batch must end with {', '.join(expected)} (once each, in this order); "
                f"this stage has {', '.join(ending) or 'none of them'}"
            )


def _replay(
    schedule: type[PipeSchedule],
    stages: int,
    micro_batches: int,
    costs: Mapping[str, Sequence[float]],
    backend: str,
    posting: str,
) -> tuple[list[TimelineEvent], list[int]]:
    """Run all stages' streams together as a discrete-event simulation of :class:`SchedulePipelineEngine`.

    A stage runs local instructions back to back. A batch of transfers is posted at once; between two stages the
    k-th send meets the k-th receive (no tags, as DeepSpeed sends), and the tensor arrives the sender's "send" cost
    after both are posted. The stage goes on when its receives have arrived and, where a send waits for its receive
    (nccl, a shapes exchange, or DeepSpeed's blocking posting), its sends have been received. When no stage can move
    and some have not finished, the schedule deadlocks.
    """
    replays = [
        _StageReplay(schedule(micro_batches=micro_batches, stages=stages, stage_id=stage), micro_batches, posting)
        for stage in range(stages)
    ]
    sends: dict[tuple[int, int], list[_Transfer]] = defaultdict(list)  # (sender, receiver) -> in posting order
    receives: dict[tuple[int, int], list[_Transfer]] = defaultdict(list)
    sends_wait = backend == "nccl" or posting == "blocking"
    timeline: list[TimelineEvent] = []
    moved = True
    while moved:
        moved = False
        for replay in replays:
            while not replay.finished:
                unit = replay.unit
                if unit.kind == "local":
                    (instruction,) = unit.instructions
                    spec = replay.at(instruction)
                    start = replay.clock
                    replay.clock += costs[spec.cost][replay.stage] if spec.cost else 0.0
                    timeline.append(replay.run(instruction, start, replay.clock))
                else:
                    if replay.posted is None:
                        replay.posted = _post(replay, unit, sends, receives)
                    partners = [_partner(replay, transfer, sends, receives) for transfer in replay.posted]
                    if any(p is None and _waits(t, sends_wait) for t, p in zip(replay.posted, partners)):
                        break
                    timeline += _complete(replay, unit, partners, costs, sends_wait)
                    replay.posted = None
                replay.index += 1
                moved = True
    blocked = [replay for replay in replays if not replay.finished]
    if blocked:
        waits = [_waiting(replay, sends, receives, replays, sends_wait) for replay in blocked]
        raise ScheduleError(
            f"deadlock ({_MODELS[backend, posting]}): {'; '.join(waits)}. A transfer must meet its counterpart, "
            "in the same order on both ends of the link, without either side waiting for the other first."
        )
    for (sender, receiver), posted in sends.items():
        unmatched = posted[len(receives[(sender, receiver)]) :]
        if unmatched:
            first = unmatched[0]
            payload = INSTRUCTION_SPECS[type(first.instruction)].link.payload
            raise ScheduleError(
                f"stage {sender} sends micro-batch {first.micro_batch}'s {payload} to stage {receiver}, which never "
                "receives it"
            )
    for replay in replays:
        replay.check_complete()
    timeline.sort(key=lambda event: (event.start, event.stage))
    return timeline, [replay.peak_activations for replay in replays]


def _waits(transfer: _Transfer, sends_wait: bool) -> bool:
    """Whether ``transfer`` holds its stage up until it meets its counterpart."""
    return transfer.shapes or sends_wait or not INSTRUCTION_SPECS[type(transfer.instruction)].link.sends


_MODELS = {
    ("gloo", "batched"): "gloo: sends do not wait, receives wait for their send",
    ("nccl", "batched"): "nccl: a send waits for its receive and a batch for all its transfers",
    ("gloo", "blocking"): "DeepSpeed's blocking send and receive, one at a time",
    ("nccl", "blocking"): "DeepSpeed's blocking send and receive, one at a time",
}


def _post(
    replay: _StageReplay,
    unit: _Unit,
    sends: dict[tuple[int, int], list[_Transfer]],
    receives: dict[tuple[int, int], list[_Transfer]],
) -> list[_Transfer]:
    """Post the unit's transfers at the stage's clock; a send's micro-batch (and its effect on the buffers, which
    the engine frees once the tensor is handed over) is settled when it is posted."""
    posted = []
    for instruction in unit.instructions:
        spec = replay.at(instruction)
        peer = replay.peer(spec.link)
        transfer = _Transfer(replay.stage, instruction, replay.clock, shapes=unit.kind == "shapes")
        if spec.link.sends and not transfer.shapes:
            transfer.micro_batch = replay._apply(instruction, spec, None)
        queue = sends[(replay.stage, peer)] if spec.link.sends else receives[(peer, replay.stage)]
        transfer.position = len(queue)
        queue.append(transfer)
        posted.append(transfer)
    return posted


def _partner(
    replay: _StageReplay,
    transfer: _Transfer,
    sends: dict[tuple[int, int], list[_Transfer]],
    receives: dict[tuple[int, int], list[_Transfer]],
) -> _Transfer | None:
    """The transfer ``transfer`` meets (the same position on the other end of the link), once it is posted."""
    spec = INSTRUCTION_SPECS[type(transfer.instruction)]
    peer = replay.stage + spec.link.peer
    theirs = receives if spec.link.sends else sends
    pair = (replay.stage, peer) if spec.link.sends else (peer, replay.stage)
    if transfer.position >= len(theirs[pair]):
        return None
    partner = theirs[pair][transfer.position]
    partner_spec = INSTRUCTION_SPECS[type(partner.instruction)]
    if partner.shapes != transfer.shapes or partner_spec.link != spec.link.counterpart():
        replay.at(transfer.instruction)
        what = "the tensor shapes" if partner.shapes else f"{partner.instruction!r}"
        raise replay.error(f"meets {what} of stage {peer}: transfers between two stages must pair up in order")
    return partner


def _complete(
    replay: _StageReplay,
    unit: _Unit,
    partners: list[_Transfer],
    costs: Mapping[str, Sequence[float]],
    sends_wait: bool,
) -> list[TimelineEvent]:
    """Finish a posted unit once every transfer in it has met its partner: the events, and the stage's clock."""
    events, waited, finish = [], replay.clock, replay.clock
    for transfer, partner in zip(replay.posted, partners):
        spec = INSTRUCTION_SPECS[type(transfer.instruction)]
        if spec.link.sends and not _waits(transfer, sends_wait):
            events.append(
                TimelineEvent(replay.stage, type(transfer.instruction), transfer.micro_batch, waited, transfer.posted)
            )
            continue
        sender = transfer if spec.link.sends else partner
        cost = 0.0 if transfer.shapes else costs[spec.cost][sender.stage]
        start, waited = waited, max(waited, max(transfer.posted, partner.posted) + cost)
        finish = max(finish, waited)
        if transfer.shapes:
            continue
        if spec.link.sends:
            events.append(TimelineEvent(replay.stage, type(transfer.instruction), transfer.micro_batch, start, waited))
        else:
            events.append(replay.run(transfer.instruction, start, waited, incoming=partner.micro_batch))
    replay.clock = finish
    return events


def _waiting(
    replay: _StageReplay,
    sends: dict[tuple[int, int], list[_Transfer]],
    receives: dict[tuple[int, int], list[_Transfer]],
    replays: list[_StageReplay],
    sends_wait: bool,
) -> str:
    """Where a blocked stage stands: its step, what it posted, and the stages it waits for."""
    unit = replay.unit
    peers = sorted(
        replay.stage + INSTRUCTION_SPECS[type(t.instruction)].link.peer
        for t in replay.posted
        if _partner(replay, t, sends, receives) is None and _waits(t, sends_wait)
    )
    if unit.kind == "shapes":
        what = f"the tensor shapes before {unit.instructions[0]!r}"
    elif len(unit.instructions) == 1:
        what = repr(unit.instructions[0])
    else:
        what = f"batch [{', '.join(map(repr, unit.instructions))}]"
    waits = [f"stage {peer}" + (", which has finished" if replays[peer].finished else "") for peer in peers]
    return f"stage {replay.stage}, step {unit.step}, {what} waits for {' and '.join(waits)}"
