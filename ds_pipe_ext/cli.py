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
    parser = sub.add_parser(
        "schedule",
        help="simulate a training schedule, check it and draw its timeline; read or write torch's action CSV",
        description="NAME (or --schedule NAME) is a registered schedule or csv:PATH, a schedule written as "
        "torch.distributed.pipelining action text (its rows give the stages, chunks and micro-batches).",
    )
    parser.add_argument("name", nargs="?", default=None, metavar="NAME", help="the schedule (same as --schedule)")
    parser.add_argument(
        "--schedule",
        default=None,
        help="a registered schedule (gpipe, 1f1b, ...), deepspeed (its TrainSchedule) or csv:PATH (default 1f1b)",
    )
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages K (a csv:PATH: its rows)")
    parser.add_argument(
        "--micro-batches", type=int, default=None, help="micro-batches per batch M (a csv:PATH: its own)"
    )
    parser.add_argument(
        "--virtual-stages",
        type=int,
        default=None,
        metavar="N",
        help="chunks per stage for a virtual-stage schedule (default: the schedule's own, 2)",
    )
    parser.add_argument("--out", default=None, help="picture to write, .png or .svg")
    parser.add_argument(
        "--csv", default=None, metavar="OUT", help="also write the schedule as torch's action CSV (one row per rank)"
    )
    for kind, default in (("forward", 1), ("backward", 2), ("send", 0)):
        explain = f"{kind} time: one number or one per stage (default {default})"
        parser.add_argument(f"--{kind}-cost", type=_cost, default=None, help=explain)
    parser.set_defaults(handler=_run_schedule)


def _run_schedule(args: argparse.Namespace) -> int:
    import sys

    from .observe.simulation import ideal_bubble_fraction, simulate

    costs = {kind: getattr(args, f"{kind}_cost") for kind in ("forward", "backward", "send")}
    costs = {kind: value for kind, value in costs.items() if value is not None}
    try:
        name, stages, micro_batches, schedule = _chosen_schedule(args)
        if args.out:
            from .observe.draw import draw_schedule

            result = draw_schedule(schedule, stages, micro_batches, args.out, costs)
        else:
            result = simulate(schedule, stages, micro_batches, costs)
        if args.csv:
            from pathlib import Path

            from .schedules import write_actions

            Path(args.csv).write_text(write_actions(schedule, stages, micro_batches))
    except ValueError as error:
        print(f"ds-pipe schedule: error: {error}", file=sys.stderr)
        return 2
    ideal = ideal_bubble_fraction(stages, micro_batches)
    layout = result.layout
    virtual = (
        f" x {layout.chunks} chunks placed '{layout.placement}' ({layout.stages} in all)" if layout.chunks > 1 else ""
    )
    print(f"{name}: {stages} stages{virtual}, {micro_batches} micro-batches")
    print(f"bubble fraction: {result.bubble_fraction:.4f}  ((K-1)/(M+K-1) = {ideal:.4f})")
    print(f"makespan: {result.makespan:g}")
    print(f"peak buffers per stage: {' '.join(str(peak) for peak in result.peak_buffers)}")
    for written in (args.out, args.csv):
        if written:
            print(f"wrote {written}")
    return 0


def _chosen_schedule(args: argparse.Namespace) -> tuple[str, int, int, str | type]:
    """The schedule ``ds-pipe schedule`` looks at: its name, stages, micro-batches, and the name or (with
    --virtual-stages) the class with those chunks. A csv:PATH brings its own sizes; given ones must match them."""
    from .config import check_schedule_fits
    from .module import virtual_placement
    from .schedules import get_schedule

    if args.name and args.schedule and args.name != args.schedule:
        raise ValueError(f"the schedule is named twice, differently: {args.name!r} and --schedule {args.schedule!r}")
    name = args.name or args.schedule or "1f1b"
    schedule = get_schedule(name)
    table = getattr(schedule, "table", None)  # read from a file: it knows its sizes
    stages = args.stages or (table and table.layout.ranks)
    micro_batches = args.micro_batches or (table and table.micro_batches)
    if not stages or not micro_batches:
        raise ValueError(f"schedule {name!r} needs --stages K and --micro-batches M")
    chunks = args.virtual_stages if args.virtual_stages is not None else getattr(schedule, "chunks", 1)
    virtual_placement(name, chunks)  # a ValueError naming the fix if it cannot
    check_schedule_fits(name, stages, micro_batches, chunks, on_this_deepspeed=False)
    return name, stages, micro_batches, name if args.virtual_stages is None else schedule.with_chunks(chunks)


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
    chunks = f" ({run.layout.chunks} chunks each, placed '{run.layout.placement}')" if run.layout.chunks > 1 else ""
    print(
        f"{run.schedule}: {run.stages} stages{chunks} x {run.replicas} replicas, {run.micro_batches} micro-batches, "
        f"{run.steps} steps traced"
    )
    report = bubble_report(run)
    print(report.format())
    if args.out:
        step = run.steps - 1 if args.step is None else args.step
        title = f"{run.schedule} measured, step {step}: bubble {report.measured:.3f} (theory {report.theoretical:.3f})"
        timeline = run.timeline(step, args.replica)
        draw_timeline(timeline, run.stages, args.out, title=title, xlabel="seconds", layout=run.layout)
        print(f"wrote {args.out}")
    return 0


_SUBCOMMANDS.append(_add_trace)


def _byte_count(text: str) -> float:
    """``6e9``, ``4GiB``, ``512MiB``, ``2GB``: a number of bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12}
    lowered = text.strip().lower()
    unit = next((name for name in units if lowered.endswith(name)), None)
    try:
        value = float(lowered[: -len(unit)] if unit else lowered.removesuffix("b")) * (units[unit] if unit else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 6e9, 4GiB or 512MiB; got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"a memory budget must be positive, got {text!r}")
    return value


def _add_plan(sub) -> None:
    from .models.examples import EXAMPLE_MODELS

    parser = sub.add_parser(
        "plan",
        help="compare partition methods, or (--auto) rank whole plans for a world and a memory budget",
        description="Without --auto: every partition method side by side for one pipeline. With --auto: every "
        "pipeline size x micro-batch count x schedule x optimal partition for --world ranks and --global-batch, "
        "ranked by predicted step time within --memory-budget. Under DeepSpeed's launcher (deepspeed --num_gpus N "
        "--no_local_rank --module ds_pipe_ext plan ...) every rank measures at once, as in training.",
    )
    parser.add_argument("--model", choices=tuple(EXAMPLE_MODELS), default="alexnet")
    parser.add_argument(
        "--size",
        "--image-size",
        dest="size",
        type=int,
        default=None,
        help="the model's input size: image side in pixels, or sequence length (default: the model's)",
    )
    parser.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch (not with --auto)")
    parser.add_argument(
        "--stages", type=int, nargs="+", default=None, help="pipeline stages (default 2; with --auto: all that fit)"
    )
    parser.add_argument(
        "--micro-batches", type=int, nargs="+", default=None, help="micro-batches per step (default 8; --auto: all)"
    )
    parser.add_argument("--schedule", default="1f1b", help="a registered schedule, or deepspeed (not with --auto)")
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
    parser.add_argument(
        "--memory-budget", type=_byte_count, default=None, help="bytes per rank, e.g. 6e9 or 4GiB ('memory', --auto)"
    )
    parser.add_argument("--memory-budget-mib", type=float, default=None, help="the same in MiB")
    parser.add_argument("--link-gbps", type=float, default=None, help="link between stages in GB/s (default: measured)")
    parser.add_argument("--repeats", type=int, default=5, help="measuring rounds (their median is the cost)")
    parser.add_argument("--details", action="store_true", help="also print each method's per-stage report")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    auto = parser.add_argument_group("--auto: plan the whole run")
    auto.add_argument("--auto", action="store_true", help="rank every plan for --world and --global-batch")
    auto.add_argument("--world", type=int, default=None, help="ranks (default: the launched world)")
    auto.add_argument("--global-batch", type=int, default=None, help="samples per step over all replicas")
    auto.add_argument("--schedules", nargs="+", default=None, help="schedules to consider (default: all registered)")
    auto.add_argument("--top", type=int, default=10, help="plans to list (0: all that fit)")
    auto.add_argument("--out", default=None, help="also write the JSON result to this file")
    parser.set_defaults(handler=_run_plan)


def _run_plan(args: argparse.Namespace) -> int:
    import sys

    from .models.examples import example_model
    from .partition import PartitionContext

    rank, world, device = _launched_ranks()
    example = example_model(args.model)
    size = args.size or example.default_size
    budget = args.memory_budget or (None if args.memory_budget_mib is None else args.memory_budget_mib * 2**20)
    try:
        example.check_size(size)
        template = PartitionContext(
            layers=example.build_layers(size),
            num_stages=1,
            device=device,
            memory_budget=budget,
            seconds_per_byte=None if args.link_gbps is None else 1 / (args.link_gbps * 1e9),
            repeats=args.repeats,
        )
        where = f"on {world} ranks at once (in situ)" if world > 1 else "in this one process"
        if world == 1 and args.link_gbps is None:
            where += " (transfers and all-reduces count as free: give --link-gbps, or launch on the ranks)"
        if args.auto:
            text = _plan_auto(args, example, size, template, world, where, write=rank == 0)
        else:
            text = _compare_methods(args, example, size, template, where)
    except ValueError as error:
        print(f"ds-pipe plan: error: {error}", file=sys.stderr)
        return 2
    finally:
        _leave_launched_ranks(world)
    if rank == 0:
        print(text)
    return 0


def _compare_methods(args: argparse.Namespace, example, size: int, template, where: str) -> str:
    import json
    from dataclasses import replace

    from .partition import compare_partitions, format_comparison

    stages, micro_batches = _one(args.stages, 2, "--stages"), _one(args.micro_batches, 8, "--micro-batches")
    ctx = replace(
        template,
        num_stages=stages,
        sample_input=example.sample_input(args.micro_batch, size),
        micro_batches=micro_batches,
        schedule=args.schedule,
    )
    reports = compare_partitions(ctx, args.methods, costs=args.costs)
    if args.json:
        return json.dumps({report.method: report.to_dict() for report in reports}, indent=1)
    lines = [
        f"{args.model} ({example.size_flag} {size}), micro-batch {args.micro_batch}, {micro_batches} micro-batches, "
        f"{stages} stages, schedule {args.schedule}",
        f"costs: measured {where}, median of {ctx.repeats} interleaved rounds; 'spread' is how far the middle half "
        "of the rounds lay apart on the least steady stage"
        if args.costs == "profile"
        else "costs: counted forward + backward FLOPs",
        format_comparison(reports),
    ]
    lines += [f"\n{report.format()}" for report in reports] if args.details else []
    return "\n".join(lines)


def _plan_auto(args: argparse.Namespace, example, size: int, template, world: int, where: str, write: bool) -> str:
    from dataclasses import replace
    from pathlib import Path

    from .planner import PlanSpace, search_plans
    from .planner.report import format_plans
    from .planner.search import byte_size
    from .schedules import AUTO_SCHEDULE

    if args.global_batch is None:
        raise ValueError("--auto needs --global-batch B, the samples per step over all replicas")
    space = PlanSpace(
        world_size=args.world or world,
        global_batch=args.global_batch,
        memory_budget=template.memory_budget,
        stages=args.stages,
        micro_batches=args.micro_batches,
        schedules=args.schedules,
    )
    search = search_plans(
        replace(template, schedule=AUTO_SCHEDULE), space, lambda micro_batch: example.sample_input(micro_batch, size)
    )
    if args.out and write:
        Path(args.out).write_text(search.to_json())
    search.best()  # no plan fits: the error names the smallest budget that does
    if args.json:
        return search.to_json()
    budget = "no memory budget" if space.memory_budget is None else f"{byte_size(space.memory_budget)} per rank"
    header = [
        f"{args.model} ({example.size_flag} {size}): global batch {space.global_batch} on {space.world_size} ranks, "
        f"{budget}; {len(search.plans)} plans fit",
        f"costs: measured {where}, median of {template.repeats} interleaved rounds per micro-batch size; spread: how "
        "far the middle half of the rounds lay apart on the least steady stage",
    ]
    command = lambda plan: example.command(plan.world_size, size, plan.script_flags())
    return "\n".join([*header, format_plans(search, args.top, command)])


def _one(values: list[int] | None, default: int, flag: str) -> int:
    if values is None:
        return default
    if len(values) != 1:
        raise ValueError(f"{flag} takes one number without --auto, got {values}")
    return values[0]


def _launched_ranks() -> tuple[int, int, str]:
    """(rank, world size, device) of this process: under DeepSpeed's launcher the process group is joined, so
    that every rank measures at once, as in training; else rank 0 of 1, on the CPU."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return 0, 1, "cpu"
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed()
    return int(os.environ["RANK"]), world, get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0")))


def _leave_launched_ranks(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()


_SUBCOMMANDS.append(_add_plan)


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    return int(args.handler(args) or 0)
