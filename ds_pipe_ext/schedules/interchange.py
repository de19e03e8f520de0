"""Schedules as ``torch.distributed.pipelining`` action text: read a CSV that torch or torchtitan wrote, write ours.

The format is torch's (``_Action.__repr__`` / ``_Action.from_str``, ``PipelineScheduleMulti._dump_csv`` and
``_load_csv``; torchtitan's ``pipeline_parallel_schedule_csv``): one CSV row per pipeline rank, one cell per time
step, each cell ``{stage}{kind}{micro_batch}`` (``0F1``, ``1I3``, ``0W1``, ``1B2``) with the stage a *global* stage
index, virtual stages counted, and an empty cell an idle step. Which stages a row holds says how they are placed
(:class:`~.layout.Layout`, loop or v). Communication and other non-compute actions (``SEND_F``, ``RECV_B``,
``UNSHARD``, ``REDUCE_GRAD``, ...) are skipped when reading: :func:`~.compute_order.lower` places every transfer
and the reduction itself. torch's overlapped pair ``(0F1;1B2)OVERLAP_F_B`` reads as its two passes in order.

``csv:PATH`` names a file as a schedule wherever a schedule is named (:func:`~.registry.register_schedule_source`):
a :class:`CsvSchedule`, lowered by the one lowering function like every other compute order.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from deepspeed.runtime.pipe.schedule import PipeSchedule

from .compute_order import ComputeOrderSchedule, Pass
from .layout import Layout
from .registry import get_schedule, register_schedule_source

__all__ = ["ActionTable", "CsvSchedule", "csv_schedule", "load_csv_schedule", "read_actions", "write_actions"]

#: A compute action: global stage, kind, micro-batch (torch's ``_action_regex``, compute kinds only).
_COMPUTE_ACTION = re.compile(r"(\d+)([FIBW])(\d+)")
#: torch's other action kinds: communication, FSDP and the gradient reduction, which the lowering does itself.
_SKIPPED_KINDS = ("UNSHARD", "RESHARD", "REDUCE_GRAD", "SEND_F", "RECV_F", "SEND_B", "RECV_B")
_SKIPPED_ACTION = re.compile(rf"\d+({'|'.join(_SKIPPED_KINDS)})\d*")
_OVERLAPPED = re.compile(r"\((.*)\)OVERLAP_F_B")


@dataclass(frozen=True)
class ActionTable:
    """What a CSV of actions says: each rank's compute order (``None`` for an empty cell), where its stages are
    (``layout``), the micro-batches, and for each entry of an order the CSV cell it came from (row and column
    0-based, and the cell's text), so that errors can point at the cell."""

    orders: tuple[tuple[Pass | None, ...], ...]
    layout: Layout
    micro_batches: int
    cells: tuple[tuple[tuple[int, str], ...], ...]  # per rank, per order entry: (column, cell text)
    source: str = "<text>"

    def where(self, rank: int, entry: int) -> str:
        """The cell of ``rank``'s ``entry``-th order entry, in words (1-based, as a spreadsheet shows it)."""
        if entry >= len(self.cells[rank]):
            return f"row {rank + 1} (rank {rank}), after its last action"
        column, text = self.cells[rank][entry]
        return f"row {rank + 1} (rank {rank}), column {column + 1}, action {text!r}"


def read_actions(text_or_path: str | os.PathLike) -> ActionTable:
    """Parse torch's action CSV (a path, or the text itself when it holds a comma or a line break).

    Raises a ValueError naming the row, the column and the cell for a cell that is no action, and one listing
    the stages each row holds when they fit neither the loop nor the v placement. Whether the passes make a
    schedule (each once, in dependency order, without deadlock) is the simulator's to say
    (:func:`ds_pipe_ext.observe.simulation.validate`).
    """
    text, source = _text(text_or_path)
    rows = list(csv.reader(io.StringIO(text)))
    while rows and not any(cell.strip() for cell in rows[-1]):
        rows.pop()  # blank lines at the end of the file
    if not rows:
        raise ValueError(f"{source}: no rows; write one row of actions per pipeline rank, e.g. 0F0,0B0")
    parsed: list[list[tuple[int, str, tuple[int, str, int] | None]]] = []
    for row, cells in enumerate(rows):
        parsed.append([])
        for column, cell in enumerate(cells):
            for action in _actions(cell, source, row, column):
                parsed[-1].append((column, cell.strip(), action))
    layout = _infer_layout(parsed, source)
    micro_batches = 1 + max(action[2] for entries in parsed for _, _, action in entries if action)
    orders = tuple(
        tuple(None if a is None else Pass(a[1], a[2], layout.location(a[0])[1]) for _, _, a in entries)
        for entries in parsed
    )  # each stage on its row's rank: _infer_layout placed them so
    positions = tuple(tuple((column, cell) for column, cell, _ in entries) for entries in parsed)
    return ActionTable(orders, layout, micro_batches, positions, source)


def write_actions(
    schedule: str | type[PipeSchedule], stages: int, micro_batches: int, chunks: int | None = None
) -> str:
    """The action CSV of a compute-order schedule (a registered name or a class) on ``stages`` pipeline ranks with
    ``micro_batches`` micro-batches (and ``chunks`` chunks per rank, default the schedule's own): one row per rank,
    the global stage of each pass, an empty cell for each step without a pass. torch's ``_load_csv`` (and so
    torchtitan's ``pipeline_parallel_schedule_csv``) reads it; :func:`read_actions` reads it back."""
    schedule_cls = get_schedule(schedule) if isinstance(schedule, str) else schedule
    if not (isinstance(schedule_cls, type) and issubclass(schedule_cls, ComputeOrderSchedule)):
        raise ValueError(
            f"schedule {schedule!r} is written as DeepSpeed instructions, not as a compute order: only compute "
            "orders have an action CSV (use 1f1b for DeepSpeed's own order)"
        )
    if chunks is not None:
        schedule_cls = schedule_cls.with_chunks(chunks)
    out = io.StringIO()
    writer = csv.writer(out)
    for rank in range(stages):
        schedule_obj = schedule_cls(micro_batches=micro_batches, stages=stages, stage_id=rank)
        layout = schedule_obj.layout
        writer.writerow(
            "" if p is None else f"{layout.stage(rank, p.chunk)}{p.kind}{p.micro_batch}" for p in schedule_obj.order()
        )
    return out.getvalue()


class CsvSchedule(ComputeOrderSchedule):
    """A schedule read from an action CSV (:func:`csv_schedule` makes one class per file): each rank runs its row.

    It runs only on the sizes it was written for: as many pipeline ranks as rows, the chunks per rank and the
    micro-batches the file holds; any other is refused with both numbers, before the schedule runs.
    """

    table: ActionTable

    def __init__(self, micro_batches: int, stages: int, stage_id: int):
        self.check_sizes(stages, micro_batches)
        super().__init__(micro_batches, stages, stage_id)

    @classmethod
    def check_sizes(cls, ranks: int, micro_batches: int | None = None) -> None:
        """Refuse a run whose pipeline ranks or micro-batches differ from the file's, naming both numbers."""
        written = cls.table
        if ranks != written.layout.ranks:
            raise ValueError(
                f"{written.source} has {written.layout.ranks} rows, one per pipeline rank ({written.layout.stages} "
                f"stages in all), but this run has {ranks} pipeline ranks: run with {written.layout.ranks} pipeline "
                "stages (-p), or write the CSV for this one"
            )
        if micro_batches is not None and micro_batches != written.micro_batches:
            raise ValueError(
                f"{written.source} schedules {written.micro_batches} micro-batches, but this run has {micro_batches} "
                f"(gradient_accumulation_steps): set it to {written.micro_batches}, or write the CSV for "
                f"{micro_batches}"
            )

    @classmethod
    def with_chunks(cls, chunks: int) -> type[ComputeOrderSchedule]:
        if chunks != cls.chunks:
            raise ValueError(
                f"{cls.table.source} places {cls.chunks} chunk(s) per rank ({cls.table.layout.stages} stages on "
                f"{cls.table.layout.ranks} rows), not {chunks}: pass virtual_stages={cls.chunks} (--virtual-stages "
                f"{cls.chunks}), or leave it unset"
            )
        return cls

    def order(self) -> list[Pass | None]:
        return list(self.table.orders[self.stage_id])

    @classmethod
    def locate(cls, message: str) -> str:
        """A simulator's error with each ``stage R, step S`` it names turned into the CSV cell that step runs
        (the lowering makes one step per order entry)."""
        located = re.sub(r"stage (\d+), step (\d+)", lambda m: cls.table.where(int(m[1]), int(m[2])), message, count=0)
        return f"{cls.table.source}: {located}"


def csv_schedule(text_or_path: str | os.PathLike) -> type[CsvSchedule]:
    """A :class:`CsvSchedule` class for an action CSV, placed and sized as the file says."""
    table = read_actions(text_or_path)
    name = f"CsvSchedule[{Path(table.source).name}]"
    attributes = {"table": table, "chunks": table.layout.chunks, "placement": table.layout.placement}
    return type(name, (CsvSchedule,), {**attributes, "__doc__": CsvSchedule.__doc__, "__module__": __name__})


def load_csv_schedule(path: str) -> type[CsvSchedule]:
    """The schedule ``csv:PATH`` names: one class per file and version (the registry asks on every lookup)."""
    try:
        stat = os.stat(path)
    except OSError as error:
        raise ValueError(f"schedule csv:{path}: cannot read the file ({error.strerror})") from None
    return _cached_csv_schedule(os.path.abspath(path), path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=64)
def _cached_csv_schedule(absolute: str, path: str, mtime_ns: int, size: int) -> type[CsvSchedule]:
    return csv_schedule(Path(path))


register_schedule_source("csv", load_csv_schedule)


def _text(text_or_path: str | os.PathLike) -> tuple[str, str]:
    """The CSV text and what to call it in errors: ``csv:PATH`` for a file."""
    if isinstance(text_or_path, str) and ("," in text_or_path or "\n" in text_or_path):
        return text_or_path, "<text>"
    path = Path(text_or_path)
    try:
        return path.read_text(), f"csv:{text_or_path}"
    except OSError as error:
        raise ValueError(f"schedule csv:{text_or_path}: cannot read the file ({error.strerror})") from None


def _actions(cell: str, source: str, row: int, column: int) -> list[tuple[int, str, int] | None]:
    """The compute actions in one cell: ``[None]`` for an empty one, ``[]`` for one the lowering does itself."""
    text = cell.strip()
    if not text:
        return [None]
    overlapped = _OVERLAPPED.fullmatch(text)
    parts = overlapped[1].split(";") if overlapped else [text]
    found = []
    for part in map(str.strip, parts):
        match = _COMPUTE_ACTION.fullmatch(part)
        if match:
            found.append((int(match[1]), match[2], int(match[3])))
        elif not _SKIPPED_ACTION.fullmatch(part):
            raise ValueError(
                f"{source}: row {row + 1} (rank {row}), column {column + 1}: {text!r} is not an action; write "
                "{stage}{F|I|B|W}{micro-batch} with the global stage, e.g. 0F1 or 3W2, or leave the cell empty"
            )
    return found


def _infer_layout(parsed: Sequence[Sequence[tuple[int, str, tuple[int, str, int] | None]]], source: str) -> Layout:
    """The placement whose ranks hold the stages each row runs: loop (row r: r, r + K, ...) or v (r and 2K-1-r)."""
    held = [sorted({action[0] for _, _, action in entries if action}) for entries in parsed]
    ranks = len(parsed)
    stages = 1 + max((stage for row in held for stage in row), default=-1)
    found = "; ".join(f"row {r + 1}: {', '.join(map(str, row)) or 'none'}" for r, row in enumerate(held))
    if stages == 0:
        raise ValueError(f"{source}: no compute actions (F, I, B or W) in any row")
    if stages % ranks == 0:
        for placement in ("loop", "v"):
            if placement == "v" and stages != 2 * ranks:
                continue
            layout = Layout(ranks, stages // ranks, placement)
            if all(layout.location(stage)[0] == rank for rank, row in enumerate(held) for stage in row):
                return layout
    raise ValueError(
        f"{source}: the stages each row holds fit no placement ({ranks} rows, stages 0 to {stages - 1}; {found}). "
        f"Row r must hold stages r, r + {ranks}, ... (loop) or r and {2 * ranks - 1}-r (v), and the stages must be "
        f"a multiple of the {ranks} rows"
    )
