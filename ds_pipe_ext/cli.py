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

    from .observe.simulation import ideal_bubble_fraction, simulate

    schedule = args.schedule
    costs = {kind: getattr(args, f"{kind}_cost") for kind in ("forward", "backward", "send")}
    costs = {kind: value for kind, value in costs.items() if value is not None}
    try:
        if args.out:
            from .observe.draw import draw_schedule

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

    from .observe.draw import draw_timeline
    from .observe.trace import bubble_report, load_trace

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


def _add_plan(sub) -> None:
    parser = sub.add_parser("plan", help="compare partition methods on an example model, without launching a job")
    parser.add_argument("--model", choices=("alexnet", "vgg19"), default="alexnet")
    parser.add_argument("--image-size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch")
    parser.add_argument("--stages", type=int, default=2, help="pipeline stages")
    parser.add_argument("--micro-batches", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--schedule", default="1f1b", help="a registered schedule, or deepspeed")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["uniform", "parameters", "type:conv", "flops", "memory", "profile"],
        help="partition methods to compare (any registered name, e.g. manual:0,12,22 'type:conv:3|linear:1')",
    )
    parser.add_argument(
        "--costs",
        choices=("profile", "flops"),
        default="profile",
        help="what every method's stages are timed with: measured seconds (default) or counted FLOPs",
    )
    parser.add_argument("--memory-budget-mib", type=float, default=None, help="per-device budget for 'memory'")
    parser.add_argument("--link-gbps", type=float, default=None, help="link between stages in GB/s (default: free)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per layer when measuring")
    parser.add_argument("--details", action="store_true", help="also print each method's per-stage report")
    parser.add_argument("--json", action="store_true", help="print each method's boundaries and stage costs as JSON")
    parser.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    import json
    import sys

    from .models.vision import build_layers, check_image_size, sample_batch
    from .partition import PartitionContext, compare_partitions, format_comparison

    try:
        check_image_size(args.model, args.image_size)
        ctx = PartitionContext(
            layers=build_layers(args.model),
            num_stages=args.stages,
            sample_input=sample_batch(args.image_size, args.micro_batch),
            micro_batches=args.micro_batches,
            schedule=args.schedule,
            memory_budget=None if args.memory_budget_mib is None else args.memory_budget_mib * 2**20,
            seconds_per_byte=0.0 if args.link_gbps is None else 1 / (args.link_gbps * 1e9),
            repeats=args.repeats,
        )
        reports = compare_partitions(ctx, args.methods, costs=args.costs)
    except ValueError as error:
        print(f"ds-pipe plan: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({report.method: report.to_dict() for report in reports}, indent=1))
        return 0
    print(
        f"{args.model} at {args.image_size} px, micro-batch {args.micro_batch}, {args.micro_batches} micro-batches, "
        f"{args.stages} stages, schedule {args.schedule}"
    )
    if args.costs == "profile":
        print(
            "costs: measured in this one process, layer by layer; in a real run every rank is busy at once, "
            "so run the job with --partition profile for the split that fits it"
        )
    else:
        print("costs: counted forward + backward FLOPs")
    print(format_comparison(reports))
    for report in reports if args.details else ():
        print()
        print(report.format())
    return 0


_SUBCOMMANDS.append(_add_plan)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
