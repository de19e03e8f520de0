"""Pipeline timelines as pictures: one row per stage, time left to right, a box per forward and backward.

The same drawing serves simulated schedules and traced runs, so times are plain floats in any unit. Idle time is
left empty: the bubble is what you see between the boxes. With virtual stages each row is a pipeline rank, named
with the stages it holds, and each of its chunks is a shade of the pass's colour (chunk 0 the full colour, later
chunks lighter), so a box says which pass, which micro-batch (its label) and which chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, PipeInstruction, PipeSchedule

from ..schedules import BackwardInputPass, BackwardWeightPass, Layout
from .simulation import Costs, SimulationResult, TimelineEvent, ideal_bubble_fraction, simulate

__all__ = ["BOX_COLOURS", "box_colour", "draw_schedule", "draw_timeline"]

#: Instructions drawn as labelled boxes, and their colours. Anything else that takes time is a thin grey strip.
BOX_COLOURS: dict[type[PipeInstruction], str] = {
    ForwardPass: "#4c72b0",
    BackwardPass: "#dd8452",
    BackwardInputPass: "#dd8452",  # I: the critical half of a split backward, coloured as a whole one
    BackwardWeightPass: "#55a868",  # W: the half that fills bubbles
}
_OTHER_COLOUR = "#9e9e9e"
_SUFFIXES = (".png", ".svg")
_LABEL_POINTS = 8
_LABEL_CHAR_INCHES = 0.65 * _LABEL_POINTS / 72  # a label is drawn only in a box at least this wide per character
_INCHES_PER_SHORTEST_BOX = 0.32
_AXES_INCHES = (4.0, 22.0)  # narrowest and widest time axis
_MARGIN_INCHES = 2.4  # stage names on the left, legend on the right
_LIGHTEST_CHUNK = 0.6  # how far towards white the last chunk's shade goes


def box_colour(instruction: type[PipeInstruction], chunk: int = 0, chunks: int = 1) -> str:
    """The colour of a box: the pass's colour, shaded towards white for the later of ``chunks`` chunks."""
    from matplotlib.colors import to_hex, to_rgb

    base = BOX_COLOURS[instruction]
    if chunks <= 1 or chunk == 0:
        return base
    towards_white = _LIGHTEST_CHUNK * chunk / (chunks - 1)
    return to_hex(tuple(c + (1.0 - c) * towards_white for c in to_rgb(base)))


def draw_timeline(
    events: Sequence[TimelineEvent],
    stages: int,
    path: str | Path,
    title: str | None = None,
    xlabel: str = "time",
    layout: Layout | None = None,
) -> Path:
    """Draw ``events`` (simulated or traced) to ``path``, a .png or .svg file, and return the path.

    ``layout``: which chunks (virtual stages) each of the ``stages`` rows holds; with several, the rows are named
    by the stages they hold and the chunks are told apart by shade (without a layout, by the events' chunks)."""
    path = Path(path)
    if path.suffix.lower() not in _SUFFIXES:
        raise ValueError(f"cannot draw to {path.name!r}: give a path ending in {' or '.join(_SUFFIXES)}")
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError as error:
        raise ImportError("drawing pipelines needs matplotlib: pip install ds_pipe_ext[plot]") from error

    origin = min((event.start for event in events), default=0.0)
    span = max((event.end for event in events), default=1.0) - origin or 1.0
    boxes = [event for event in events if event.instruction in BOX_COLOURS and event.end > event.start]
    chunks = layout.chunks if layout is not None else 1 + max((event.chunk for event in events), default=0)
    shortest = min((event.end - event.start for event in boxes), default=span)
    axes_width = min(max(_INCHES_PER_SHORTEST_BOX * span / shortest, _AXES_INCHES[0]), _AXES_INCHES[1])
    figure = Figure(figsize=(axes_width + _MARGIN_INCHES, 0.5 * stages + 1.3), layout="constrained")
    FigureCanvasAgg(figure)  # never whatever GUI backend pyplot would pick
    axes = figure.subplots()

    for event in events:
        start, width = event.start - origin, event.end - event.start
        if event.instruction in BOX_COLOURS and width > 0:
            axes.broken_barh(
                [(start, width)],
                (event.stage - 0.4, 0.8),
                facecolors=box_colour(event.instruction, event.chunk, chunks),
                edgecolor="white",
                linewidth=1.0,
            )
            label = "" if event.micro_batch is None else str(event.micro_batch)
            if width / span * axes_width >= _LABEL_CHAR_INCHES * len(label):
                axes.text(start + width / 2, event.stage, label, ha="center", va="center", fontsize=_LABEL_POINTS)
        elif width > 0:
            axes.broken_barh([(start, width)], (event.stage + 0.3, 0.1), facecolors=_OTHER_COLOUR)

    axes.set_xlim(0, span)
    axes.set_ylim(stages - 0.5, -0.5)
    axes.set_yticks(range(stages), [_row_name(rank, layout, chunks) for rank in range(stages)])
    axes.set_xlabel(xlabel)
    axes.spines[["top", "right"]].set_visible(False)
    if title:
        axes.set_title(title, loc="left", fontsize=10)
    drawn = {(event.instruction, event.chunk) for event in boxes}
    legend = [
        Patch(color=box_colour(cls, chunk, chunks), label=cls.__name__ + (f", chunk {chunk}" if chunks > 1 else ""))
        for cls in BOX_COLOURS
        for chunk in range(chunks)
        if (cls, chunk) in drawn
    ]
    if legend:
        axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # keep labels as text in SVG
        figure.savefig(path, dpi=150)
    return path


def _row_name(rank: int, layout: Layout | None, chunks: int) -> str:
    if chunks == 1:
        return f"stage {rank}"
    if layout is None:
        return f"rank {rank}"
    return f"rank {rank}: stages {', '.join(str(layout.stage(rank, chunk)) for chunk in range(layout.chunks))}"


def draw_schedule(
    schedule: str | type[PipeSchedule],
    stages: int,
    micro_batches: int,
    path: str | Path,
    costs: Costs | None = None,
) -> SimulationResult:
    """Simulate ``schedule`` and draw its timeline, with its bubble and the ideal (K-1)/(M+K-1) in the title."""
    result = simulate(schedule, stages, micro_batches, costs)
    name = schedule if isinstance(schedule, str) else schedule.__name__
    title = (
        f"{name}, K={stages} stages, M={micro_batches} micro-batches: bubble {result.bubble_fraction:.3f}, "
        f"(K-1)/(M+K-1) = {ideal_bubble_fraction(stages, micro_batches):.3f}"
    )
    if result.layout.chunks > 1:
        title = title.replace(" stages,", f" ranks x {result.layout.chunks} chunks ({result.layout.placement}),", 1)
    draw_timeline(result.timeline, stages, path, title=title, layout=result.layout)
    return result
