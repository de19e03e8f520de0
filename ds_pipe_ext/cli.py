"""``ds-pipe``: look at a pipeline before (and after) you launch it.

Subcommands: ``plan`` (partition report), ``schedule`` (draw a schedule), ``topo`` (rank layout),
``trace`` (draw and measure a traced run). Each one is a thin shell over a library function.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

# ---- subcommands: each section adds its parser and its handler ----------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ds-pipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


_SUBCOMMANDS: list = []


def _add_topo(sub) -> None:
    parser = sub.add_parser("topo", help="lay out pipeline x data (x model) ranks and show the traffic between them")
    parser.add_argument("--world", type=int, required=True, help="number of ranks")
    parser.add_argument("--pipe", type=int, required=True, help="pipeline stages")
    parser.add_argument("--data", type=int, default=None, help="data-parallel replicas (default: whatever is left)")
    parser.add_argument("--model", type=int, default=1, help="model-parallel (tensor-slice) ranks per stage")
    parser.add_argument(
        "--ranks-per-node", type=int, default=None, help="mark traffic that crosses nodes and compare axis orders"
    )
    parser.set_defaults(handler=_run_topo)


def _run_topo(args: argparse.Namespace) -> int:
    import sys

    from .topology import describe, make_topology

    try:
        picture = describe(make_topology(args.world, args.pipe, args.data, args.model), args.ranks_per_node)
    except ValueError as error:
        print(f"ds-pipe topo: error: {error}", file=sys.stderr)
        return 2
    print(picture)
    return 0


_SUBCOMMANDS.append(_add_topo)


def _cost(text: str) -> float | list[float]:
    try:
        values = [float(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or one per stage, like 1,1,2,1; got {text!r}") from None
    return values[0] if len(values) == 1 else values


def _add_schedule(sub) -> None:
    parser = sub.add_parser("schedule", help="simulate a training schedule, check it and draw its timeline")
    parser.add_argument(
        "--schedule", default="1f1b", help="a registered schedule (gpipe, 1f1b, ...) or deepspeed (its TrainSchedule)"
    )
    parser.add_argument("--stages", type=int, required=True, help="pipeline stages K")
    parser.add_argument("--micro-batches", type=int, required=True, help="micro-batches per batch M")
    parser.add_argument("--out", default=None, help="picture to write, .png or .svg")
    for kind, default in (("forward", 1), ("backward", 2), ("send", 0)):
        explain = f"{kind} time: one number or one per stage (default {default})"
        parser.add_argument(f"--{kind}-cost", type=_cost, default=None, help=explain)
    parser.set_defaults(handler=_run_schedule)


def _run_schedule(args: argparse.Namespace) -> int:
    import sys

    from .draw import draw_schedule
    from .simulation import ideal_bubble_fraction, simulate

    schedule = args.schedule
    if schedule.lower() == "deepspeed":
        from deepspeed.runtime.pipe.schedule import TrainSchedule

        schedule = TrainSchedule
    costs = {kind: getattr(args, f"{kind}_cost") for kind in ("forward", "backward", "send")}
    costs = {kind: value for kind, value in costs.items() if value is not None}
    try:
        if args.out:
            result = draw_schedule(schedule, args.stages, args.micro_batches, args.out, costs)
        else:
            result = simulate(schedule, args.stages, args.micro_batches, costs)
    except ValueError as error:
        print(f"ds-pipe schedule: error: {error}", file=sys.stderr)
        return 2
    ideal = ideal_bubble_fraction(args.stages, args.micro_batches)
    print(f"{args.schedule}: {args.stages} stages, {args.micro_batches} micro-batches")
    print(f"bubble fraction: {result.bubble_fraction:.4f}  ((K-1)/(M+K-1) = {ideal:.4f})")
    print(f"makespan: {result.makespan:g}")
    print(f"peak buffers per stage: {' '.join(str(peak) for peak in result.peak_buffers)}")
    if args.out:
        print(f"wrote {args.out}")
    return 0


_SUBCOMMANDS.append(_add_schedule)


def _add_trace(sub) -> None:
    parser = sub.add_parser("trace", help="measure the bubble of a traced run and draw its timeline")
    parser.add_argument("trace", help="the --trace DIR of a run (or its trace.json)")
    parser.add_argument("--out", default=None, help="picture to write, .png or .svg")
    parser.add_argument("--step", type=int, default=None, help="step to draw (default: the last)")
    parser.add_argument("--replica", type=int, default=0, help="data-parallel replica to draw")
    parser.set_defaults(handler=_run_trace)


def _run_trace(args: argparse.Namespace) -> int:
    import sys

    from .draw import draw_timeline
    from .trace import bubble_report, load_trace

    try:
        run = load_trace(args.trace)
    except FileNotFoundError as error:
        print(f"ds-pipe trace: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{run.schedule}: {run.stages} stages x {run.replicas} replicas, {run.micro_batches} micro-batches, "
        f"{run.steps} steps traced"
    )
    report = bubble_report(run)
    print(report.format())
    if args.out:
        step = run.steps - 1 if args.step is None else args.step
        title = f"{run.schedule} measured, step {step}: bubble {report.measured:.3f} (theory {report.theoretical:.3f})"
        draw_timeline(run.timeline(step, args.replica), run.stages, args.out, title=title, xlabel="seconds")
        print(f"wrote {args.out}")
    return 0


_SUBCOMMANDS.append(_add_trace)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
