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
from dataclasses import dataclass, field

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
from ..schedules.layout import Layout

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
    """One instruction executed by one stage, i.e. pipeline rank, on one of its chunks (simulated or traced)."""

    stage: int
    instruction: type[PipeInstruction]
    micro_batch: int | None
    start: float
    end: float
    chunk: int = 0

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
    peak_per_stage: list[int]  # the same per global stage (with virtual stages, per chunk)
    layout: Layout | None = None  # which chunks (virtual stages) each stage holds; None: one each
    #: Per stage, every mix of activations it held at once: micro-batches forwarded but not backwarded, by chunk.
    held_at_once: list[frozenset[tuple[int, ...]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layout is None:
            object.__setattr__(self, "layout", Layout(self.stages))

    def peak_activation_bytes(self, per_micro_batch: Sequence[float]) -> list[float]:
        """Per stage (pipeline rank), the most activation bytes it holds at once when global stage g keeps
        ``per_micro_batch[g]`` bytes per micro-batch: exact with chunks of different sizes, whose peaks need not
        coincide."""
        layout = self.layout
        return [
            max(
                (sum(n * per_micro_batch[layout.stage(rank, c)] for c, n in enumerate(mix)) for mix in mixes),
                default=0.0,
            )
            for rank, mixes in enumerate(self.held_at_once)
        ]

    @property
    def makespan(self) -> float:
        return max((event.end for event in self.timeline), default=0.0)

    @property
    def bubble_fraction(self) -> float:
        return bubble_fraction(self.timeline, self.stages)


def ideal_bubble_fraction(stages: int, micro_batches: int) -> float:
    """(K-1)/(M+K-1): the bubble of GPipe and 1F1B when every stage costs the same and communication is free."""
    return (stages - 1) / (micro_batches + stages - 1)


def stage_bubble_fractions(timeline: Sequence[TimelineEvent], stages: int, window: str = "step") -> list[float]:
    """Per stage, the share of a span it spends outside compute: idle, waiting or communicating. ``window="step"``:
    the whole timeline, so the loads, the gradient reductions and the optimizer step count as bubble too;
    ``"passes"``: from the first pass on any stage to the last, the pipelined part that (K-1)/(M+K-1) describes."""
    if window not in ("step", "passes"):
        raise ValueError(f"window must be 'step' or 'passes', got {window!r}")
    framing = [e for e in timeline if is_compute(e.instruction)] if window == "passes" else timeline
    if not framing:
        return [0.0] * stages
    start = min(event.start for event in framing)
    span = max(event.end for event in framing) - start
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


#: How transfers reach the other stage, as the simulator models them.
TRANSPORTS = {
    "engine": "ds_pipe_ext's engine: a process group per direction of each link, transfers posted without waiting",
    "shared": "one process group for all transfers, posted without waiting",
    "blocking": "DeepSpeed's own handlers: one process group, one blocking transfer at a time",
}


def validate(
    schedule: str | type[PipeSchedule],
    stages: int,
    micro_batches: int,
    backend: str = "gloo",
    transport: str = "engine",
) -> None:
    """Raise :class:`ScheduleError` unless ``schedule`` trains one batch correctly on DeepSpeed's engine.

    Checked on every stage: each micro-batch is loaded (first and last stage), forwarded and backwarded exactly once
    on each chunk, in dependency order; sends and receives pair up one for one and in order on every channel,
    between the same two stages, without deadlock; no buffer is overwritten while its contents are needed, and every
    buffer id is below ``num_pipe_buffers()``; ReduceTiedGrads, ReduceGrads and OptimizerStep come last.

    The model of the transfers: on a channel (a process group between two ranks) the transfers run in the order
    each rank posted them, and the k-th send meets the k-th receive (no tags, as on NCCL). ``backend="gloo"``: a
    send is buffered and completes on its own; ``"nccl"``: a send completes only once its receive is posted (NCCL
    buffers nothing past a small size), so a send holds up what its rank posted after it on that channel.
    ``transport`` (:data:`TRANSPORTS`): ``"engine"``, ds_pipe_ext's engine, each direction of each link between two
    stages its own channel, each step's transfers posted at once and only the receives waited for; ``"shared"``,
    the same posting on one channel per pair of ranks; ``"blocking"``, DeepSpeed's own handlers (which the engine
    uses for partitioned or dynamically shaped activations): one channel per pair, each transfer waited for before
    the next. A link's first activation carries the tensor shapes ahead of it; with DeepSpeed's handlers that is a
    blocking exchange of its own.
    """
    simulate(schedule, stages, micro_batches, backend=backend, transport=transport)


def simulate(
    schedule: str | type[PipeSchedule],
    stages: int,
    micro_batches: int,
    costs: Costs | None = None,
    backend: str = "gloo",
    transport: str = "engine",
) -> SimulationResult:
    """Validate ``schedule`` (see :func:`validate`) and time it: ``costs`` maps "forward", "backward" and "send"
    (one p2p transfer, from when both ends have posted it, at the sending stage's value) to a number, one number
    per stage (pipeline rank) or, with virtual stages, one per global stage; other instructions take no time.
    Defaults: :data:`DEFAULT_COSTS`. A schedule that splits the backward takes "backward_input" and
    "backward_weight", each half of "backward" unless given."""
    schedule_class = _schedule_class(schedule)
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"need at least one stage and one micro-batch, got {stages=}, {micro_batches=}")
    if backend not in ("gloo", "nccl") or transport not in TRANSPORTS:
        raise ValueError(
            f"backend must be 'gloo' or 'nccl' and transport one of {', '.join(TRANSPORTS)}, got {backend!r}, "
            f"{transport!r}"
        )
    layout = getattr(schedule_class(micro_batches=micro_batches, stages=stages, stage_id=0), "layout", None)
    per_stage = _per_stage_costs(costs or {}, layout or Layout(stages))
    try:
        timeline, peaks, chunk_peaks, held = _replay(
            schedule_class, stages, micro_batches, per_stage, backend, transport
        )
    except ScheduleError as error:
        locate = getattr(schedule_class, "locate", None)  # a schedule read from a file names the file's cells
        if locate is None:
            raise
        raise ScheduleError(locate(str(error))) from None
    return SimulationResult(stages, micro_batches, timeline, peaks, chunk_peaks, layout, held)


def _schedule_class(schedule: str | type[PipeSchedule]) -> type[PipeSchedule]:
    if isinstance(schedule, str):
        return get_schedule(schedule)
    if isinstance(schedule, type) and issubclass(schedule, PipeSchedule):
        return schedule
    raise TypeError(f"expected a registered schedule name or a PipeSchedule subclass, got {schedule!r}")


def _per_stage_costs(costs: Costs, layout: Layout) -> dict[str, list[float]]:
    """Every cost per global stage."""
    unknown = sorted(set(costs) - set(DEFAULT_COSTS))
    if unknown:
        raise ValueError(f"unknown cost {', '.join(map(repr, unknown))}; known costs: {', '.join(DEFAULT_COSTS)}")
    per_stage = {}
    for key, value in {**DEFAULT_COSTS, **costs}.items():
        values = [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]
        if len(values) in (1, layout.ranks):
            values = [values[layout.location(stage)[0] % len(values)] for stage in range(layout.stages)]
        if len(values) != layout.stages:
            counts = f"{layout.ranks}" + (f" or one per global stage ({layout.stages})" if layout.chunks > 1 else "")
            raise ValueError(f"cost {key!r} has {len(values)} values; give one number or one per stage ({counts})")
        if min(values) < 0:
            raise ValueError(f"cost {key!r} is negative: {values}")
        per_stage[key] = values
    for key in set(_HALF_OF_BACKWARD) - set(costs):
        per_stage[key] = [value / 2 for value in per_stage["backward"]]
    return per_stage


@dataclass
class _Unit:
    """What a stage executes in one go: a local instruction, or a batch of sends and receives posted together.
    ``shapes[i]`` marks the message with the tensor shapes that goes ahead of a link's first activation."""

    step: int
    kind: str  # "local" or "batch"
    instructions: list[PipeInstruction]
    shapes: list[bool] = field(default_factory=list)

    def describe(self) -> str:
        entries = [f"the shapes for {i!r}" if shapes else repr(i) for i, shapes in zip(self.instructions, self.shapes)]
        return entries[0] if len(entries) == 1 else f"batch [{', '.join(entries)}]"


@dataclass
class _Transfer:
    """One posted send or receive: between which ranks, from and to which global stage, and the micro-batch it
    carries (known for a send when it is posted)."""

    stage: int
    peer: int
    instruction: PipeInstruction
    posted: float
    shapes: bool
    link: tuple[int, int]  # (global stage it leaves, global stage it enters)
    channel: tuple  # the process group it goes over
    sends: bool
    position: int = 0  # among the transfers in its direction on its channel
    micro_batch: int | None = None
    previous: _Transfer | None = None  # what this rank posted before it on the same channel
    done: float | None = None  # when it completed

    @property
    def local(self) -> bool:
        """A hand-over between two chunks of one rank: the receive takes what the send left, at once."""
        return self.peer == self.stage


def _chunk(instruction: PipeInstruction) -> int:
    return instruction.kwargs.get("chunk", 0)


class _StageReplay:
    """One pipeline rank's instruction stream and the state the engine would hold for it: what each buffer slot
    holds, and what work each of its chunks has done for each micro-batch."""

    def __init__(self, schedule: PipeSchedule, micro_batches: int, transport: str) -> None:
        self.stage = schedule.stage_id
        self.layout: Layout = getattr(schedule, "layout", None) or Layout(schedule.stages)
        self._slots: dict[int, set[str]] = {}
        self.num_buffers = schedule.num_pipe_buffers()
        self.units = self._units(schedule, transport)
        self.index = 0
        self.posted: list[_Transfer] | None = None
        self.step, self.instruction = 0, None
        self.clock = 0.0
        self.held: dict[tuple[str, int], int] = {}  # (slot, buffer id) -> micro-batch
        self.done: dict[tuple[int, int], set[str]] = {}  # (chunk, micro-batch) -> work done
        self.micro_batches = micro_batches
        self.required = {
            chunk: {item for spec in INSTRUCTION_SPECS.values() if self._applies(spec, chunk) for item in spec.work}
            for chunk in range(self.layout.chunks)
        }
        self.loaded = 0
        self.batch_ended = False
        self.peak_activations = 0
        self.output_chunk: dict[int, int] = {}  # buffer id -> the chunk whose activations it holds
        self.peak_by_chunk = [0] * self.layout.chunks
        self.held_at_once: set[tuple[int, ...]] = set()

    def _units(self, schedule: PipeSchedule, transport: str) -> list[_Unit]:
        """The stream in the groups the engine executes. A link's first activation carries the tensor shapes ahead
        of it: in a batch, the sender posts both and the receiver posts the data once the shapes have arrived;
        with blocking posting, DeepSpeed's shapes exchange runs before the transfer. Transfers between two chunks of
        one rank are handed over in place, without shapes."""
        units, shapes_sent = [], set()
        for step, step_cmds in enumerate(schedule):
            blocking = transport == "blocking"
            groups = [[cmd] for cmd in step_cmds] if blocking else transfer_runs(step_cmds)
            for group in groups:
                specs = [self.spec(step, instruction) for instruction in group]
                if not any(spec.link for spec in specs):
                    units += [_Unit(step, "local", [instruction]) for instruction in group]
                    continue
                batch, shapes, later = [], [], []
                for instruction, spec in zip(group, specs):
                    key = (spec.link, _chunk(instruction))
                    if (
                        spec.shapes_first
                        and key not in shapes_sent
                        and self._peer_rank(instruction, spec) != self.stage
                    ):
                        shapes_sent.add(key)
                        if blocking:
                            units.append(_Unit(step, "batch", [instruction], [True]))
                        else:
                            batch.append(instruction)
                            shapes.append(True)
                            if not spec.link.sends:
                                later.append(instruction)
                                continue
                    batch.append(instruction)
                    shapes.append(False)
                units.append(_Unit(step, "batch", batch, shapes))
                if later:
                    units.append(_Unit(step, "batch", later, [False] * len(later)))
        return units

    def _peer_rank(self, instruction: PipeInstruction, spec: InstructionSpec) -> int | None:
        other = self.layout.stage(self.stage, _chunk(instruction)) + spec.link.peer
        return self.layout.location(other)[0] if 0 <= other < self.layout.stages else None

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

    def ends(self, chunk: int) -> tuple[bool, bool]:
        """Whether ``chunk`` is the pipeline's first stage, and whether it is the last."""
        stage = self.layout.stage(self.stage, chunk)
        return stage == 0, stage == self.layout.stages - 1

    def slots(self, chunk: int) -> set[str]:
        if chunk not in self._slots:
            self._slots[chunk] = {name for name, slot in SLOTS.items() if slot.exists(*self.ends(chunk))}
        return self._slots[chunk]

    def link(self, instruction: PipeInstruction, spec: InstructionSpec) -> tuple[int, int, tuple[int, int]]:
        """The rank a send or receive talks to, that rank's chunk, and the (from, to) global stages it links."""
        stage = self.layout.stage(self.stage, _chunk(instruction))
        other = stage + spec.link.peer
        if not 0 <= other < self.layout.stages:
            raise self.error(f"stage {self.stage} has no {'previous' if spec.link.peer < 0 else 'next'} stage")
        rank, chunk = self.layout.location(other)
        return rank, chunk, (stage, other) if spec.link.sends else (other, stage)

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
        return TimelineEvent(self.stage, type(instruction), micro_batch, start, end, _chunk(instruction))

    def _applies(self, spec: InstructionSpec, chunk: int) -> bool:
        first, last = self.ends(chunk)
        has_peer = spec.link is None or not ((first and spec.link.peer < 0) or (last and spec.link.peer > 0))
        return has_peer and set(spec.writes) <= self.slots(chunk)

    def _apply(self, instruction: PipeInstruction, spec: InstructionSpec, incoming: int | None) -> int:
        if self.batch_ended:
            raise self.error("comes after the end-of-batch instructions (ReduceGrads, OptimizerStep)")
        chunk = _chunk(instruction)
        if not 0 <= chunk < self.layout.chunks:
            raise self.error(f"chunk {chunk} is out of range: this stage holds {self.layout.chunks} chunk(s)")
        slots = self.slots(chunk)
        missing = sorted(set(spec.writes) - slots)
        if missing:
            raise self.error(f"stage {self.stage} has no {' or '.join(SLOTS[slot].meaning for slot in missing)} buffer")
        buffers = [instruction.buffer_id, *([instruction.label_buffer] if "label_buffer" in instruction.kwargs else [])]
        for buffer in buffers:
            if not 0 <= buffer < self.num_buffers:
                raise self.error(f"buffer_id {buffer} is out of range: num_pipe_buffers() is {self.num_buffers}")
        buffer = instruction.buffer_id
        micro_batch = self._micro_batch(buffer, spec, incoming, slots)
        done = self.done.setdefault((chunk, micro_batch), set())
        for item in spec.after:
            if item in self.required[chunk] and item not in done:
                raise self.error(f"micro-batch {micro_batch} has not had its {item} yet")
        last_chunk = self.layout.location(self.layout.stages - 1)[1]
        for slot in slots.intersection(spec.writes):
            for written, owner in zip(buffers, (chunk, last_chunk)):
                self._write(slot, written, micro_batch, owner)
        for item in spec.work:
            if item in done:
                raise self.error(f"micro-batch {micro_batch} gets its {item} a second time")
            done.add(item)
        if "label_buffer" in instruction.kwargs:  # the load counts for the chunk holding the last stage as well
            self.done.setdefault((self.layout.location(self.layout.stages - 1)[1], micro_batch), set()).update(
                spec.work
            )
        for slot in spec.frees:
            self.held.pop((slot, buffer), None)
        if "output" in spec.writes:
            self.output_chunk[buffer] = chunk
        live = [self.output_chunk[held_buffer] for slot, held_buffer in self.held if slot == "output"]
        self.peak_activations = max(self.peak_activations, len(live))
        self.peak_by_chunk[chunk] = max(self.peak_by_chunk[chunk], live.count(chunk))
        self.held_at_once.add(tuple(live.count(c) for c in range(self.layout.chunks)))
        return micro_batch

    def _micro_batch(self, buffer: int, spec: InstructionSpec, incoming: int | None, slots: set[str]) -> int:
        if spec.loads:
            if self.loaded == self.micro_batches:
                raise self.error(f"loads more than the {self.micro_batches} micro-batches of the batch")
            self.loaded += 1
            return self.loaded - 1
        held = {slot: self.held.get((slot, buffer)) for slot in spec.reads if slot in slots}
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

    def _write(self, slot: str, buffer: int, micro_batch: int, chunk: int) -> None:
        previous = self.held.get((slot, buffer))
        if previous is not None and previous != micro_batch:
            pending = sorted(self._pending_readers(slot, previous, chunk))
            if pending:
                raise self.error(
                    f"overwrites buffer {buffer}'s {SLOTS[slot].meaning} of micro-batch {previous}, "
                    f"still needed for its {', '.join(pending)}"
                )
        self.held[(slot, buffer)] = micro_batch

    def _pending_readers(self, slot: str, micro_batch: int, chunk: int) -> set[str]:
        readers = {item for spec in INSTRUCTION_SPECS.values() if slot in spec.reads for item in spec.work}
        return (readers & self.required[chunk]) - self.done.get((chunk, micro_batch), set())

    def _end_batch(self) -> None:
        missing = self.missing_work()
        if missing:
            raise self.error(f"comes before {missing}; a stage's end-of-batch instructions must follow all its work")
        self.batch_ended = True

    def missing_work(self) -> str:
        for micro_batch in range(self.micro_batches):
            for chunk, required in self.required.items():
                for item in sorted(required - self.done.get((chunk, micro_batch), set())):
                    providers = [cls.__name__ for cls, spec in INSTRUCTION_SPECS.items() if item in spec.work]
                    where = f" on chunk {chunk}" if self.layout.chunks > 1 else ""
                    return f"the {item} of micro-batch {micro_batch}{where} ({' or '.join(providers)})"
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
    transport: str,
) -> tuple[list[TimelineEvent], list[int], list[int], list[frozenset[tuple[int, ...]]]]:
    """Run all stages' streams together as a discrete-event simulation of :class:`SchedulePipelineEngine`.

    A stage runs local instructions back to back and posts a unit of transfers at once; it waits for the receives
    (and, with blocking posting, for every transfer). When no stage can move and some have not finished, the
    schedule deadlocks.
    """
    replays = [
        _StageReplay(schedule(micro_batches=micro_batches, stages=stages, stage_id=stage), micro_batches, transport)
        for stage in range(stages)
    ]
    network = _Network(costs, backend, transport)
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
                    stage = replay.layout.stage(replay.stage, _chunk(instruction))
                    replay.clock += costs[spec.cost][stage] if spec.cost else 0.0
                    timeline.append(replay.run(instruction, start, replay.clock))
                else:
                    if replay.posted is None:
                        replay.posted = [network.post(replay, entry) for entry in zip(unit.instructions, unit.shapes)]
                    if any(network.done(t) is None for t in replay.posted if network.waited(t)):
                        break
                    timeline += network.complete(replay)
                    replay.posted = None
                replay.index += 1
                moved = True
    blocked = [replay for replay in replays if not replay.finished]
    if blocked:
        raise ScheduleError(
            f"deadlock ({backend}, {TRANSPORTS[transport]}): {'; '.join(network.waiting(r, replays) for r in blocked)}."
            " A transfer must meet its counterpart, in the same order on both ends of its channel, without either "
            "side waiting for the other first."
        )
    network.check_all_received()
    for replay in replays:
        replay.check_complete()
    timeline.sort(key=lambda event: (event.start, event.stage))
    layout = replays[0].layout
    per_stage = [replays[rank].peak_by_chunk[chunk] for rank, chunk in map(layout.location, range(layout.stages))]
    held = [frozenset(replay.held_at_once) for replay in replays]
    return timeline, [replay.peak_activations for replay in replays], per_stage, held


class _Network:
    """The channels between the stages: who posted what, what met what, and when each transfer completed."""

    def __init__(self, costs: Mapping[str, Sequence[float]], backend: str, transport: str) -> None:
        self.costs, self.backend, self.transport = costs, backend, transport
        self.queues: dict[tuple, list[_Transfer]] = defaultdict(list)  # (channel, sender, receiver, sends) -> posted
        self.last: dict[tuple[int, tuple], _Transfer] = {}  # (rank, channel) -> the rank's latest transfer on it

    def channel(self, rank: int, peer: int, link: tuple[int, int]) -> tuple:
        if rank == peer:
            return ("local", *link)
        if self.transport == "engine":
            return ("link", *link)
        return ("pair", min(rank, peer), max(rank, peer))

    def post(self, replay: _StageReplay, entry: tuple[PipeInstruction, bool]) -> _Transfer:
        """Post a send or receive at the stage's clock; a send's micro-batch (and its effect on the buffers, which
        the engine frees once the tensor is handed over) is settled when it is posted."""
        instruction, shapes = entry
        spec = replay.at(instruction)
        peer, _, link = replay.link(instruction, spec)
        channel = self.channel(replay.stage, peer, link)
        transfer = _Transfer(replay.stage, peer, instruction, replay.clock, shapes, link, channel, spec.link.sends)
        if transfer.sends and not shapes:
            transfer.micro_batch = replay._apply(instruction, spec, None)
        sender, receiver = (replay.stage, peer) if transfer.sends else (peer, replay.stage)
        queue = self.queues[(channel, sender, receiver, transfer.sends)]
        transfer.position = len(queue)
        queue.append(transfer)
        transfer.previous = self.last.get((replay.stage, channel))
        self.last[(replay.stage, channel)] = transfer
        return transfer

    def waited(self, transfer: _Transfer) -> bool:
        """Whether the stage waits for ``transfer`` before it goes on."""
        return not transfer.sends or (self.transport == "blocking" and not transfer.local)

    def partner(self, transfer: _Transfer) -> _Transfer | None:
        """The transfer ``transfer`` meets (the same position in the other direction of its channel), once posted;
        it must be the same kind of tensor between the same two stages."""
        sender, receiver = (transfer.stage, transfer.peer) if transfer.sends else (transfer.peer, transfer.stage)
        theirs = self.queues[(transfer.channel, sender, receiver, not transfer.sends)]
        if transfer.position >= len(theirs):
            return None
        partner = theirs[transfer.position]
        if partner.shapes != transfer.shapes or partner.link != transfer.link:
            what = "the tensor shapes" if partner.shapes else f"{partner.instruction!r}"
            mine = "the tensor shapes for " if transfer.shapes else ""
            raise ScheduleError(
                f"stage {transfer.stage}: {mine}{transfer.instruction!r} meets {what} of stage {transfer.peer}: "
                "transfers between two stages must pair up in order on their channel"
            )
        return partner

    def done(self, transfer: _Transfer, visiting: frozenset = frozenset()) -> float | None:
        """When ``transfer`` completed, if it can: once it heads its channel on its rank, and (a receive, or any
        transfer on nccl) once its partner heads the channel on the other rank; ``None`` while it cannot."""
        if transfer.done is not None or id(transfer) in visiting:
            return transfer.done
        visiting = visiting | {id(transfer)}
        start = self._start(transfer, visiting)
        if start is None:
            return None
        if transfer.sends and (self.backend == "gloo" or transfer.local):
            transfer.done = start
            return start
        partner = self.partner(transfer)
        if partner is None:
            return None
        partner_start = self._start(partner, visiting)
        if partner_start is None:
            return None
        sender = transfer if transfer.sends else partner
        cost = 0.0 if transfer.shapes or transfer.local else self.costs["send"][sender.link[0]]
        transfer.done = max(start, partner_start) + cost
        return transfer.done

    def _start(self, transfer: _Transfer, visiting: frozenset) -> float | None:
        if transfer.local or transfer.previous is None:
            return transfer.posted
        previous = self.done(transfer.previous, visiting)
        return None if previous is None else max(transfer.posted, previous)

    def complete(self, replay: _StageReplay) -> list[TimelineEvent]:
        """Finish a posted unit whose waited transfers completed: the events (waits in posting order), and the
        stage's clock."""
        events, waited = [], replay.clock
        for transfer in replay.posted:
            start = waited
            if self.waited(transfer):
                waited = max(waited, self.done(transfer))
            if transfer.shapes:
                continue
            chunk = _chunk(transfer.instruction)
            if transfer.sends:
                end = waited if self.waited(transfer) else transfer.posted
                events.append(
                    TimelineEvent(replay.stage, type(transfer.instruction), transfer.micro_batch, start, end, chunk)
                )
            else:
                incoming = self.partner(transfer).micro_batch
                events.append(replay.run(transfer.instruction, start, waited, incoming=incoming))
        replay.clock = waited
        return events

    def waiting(self, replay: _StageReplay, replays: list[_StageReplay]) -> str:
        """Where a blocked stage stands: its step, what it posted, and whom it waits for (and, for a transfer queued
        on its channel behind one of its own, behind which)."""
        waits = []
        for transfer in replay.posted:
            if not self.waited(transfer) or self.done(transfer) is not None:
                continue
            peer = f"stage {transfer.peer}" + (", which has finished" if replays[transfer.peer].finished else "")
            ahead = transfer.previous
            if ahead is not None and self.done(ahead) is None:
                peer += f" (queued on their channel behind {ahead.instruction!r})"
            waits.append(peer)
        return (
            f"stage {replay.stage}, step {replay.unit.step}, {replay.unit.describe()} waits for {' and '.join(waits)}"
        )

    def check_all_received(self) -> None:
        for (_, sender, receiver, sends), posted in self.queues.items():
            if not sends:
                continue
            for transfer in posted:
                if self.partner(transfer) is None:
                    payload = INSTRUCTION_SPECS[type(transfer.instruction)].link.payload
                    raise ScheduleError(
                        f"stage {sender} sends micro-batch {transfer.micro_batch}'s {payload} to stage {receiver}, "
                        "which never receives it"
                    )
