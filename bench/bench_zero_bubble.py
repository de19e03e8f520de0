"""ZB-H1 against 1F1B on DeepSpeed's engine: measured bubble, samples/s and per-stage peak memory, one launch.

    python bench/bench_zero_bubble.py            # launches itself on 2 CPU ranks; about 3 minutes, 9 GB of memory

The model is a stack of wide Linear layers, four per stage, split into two stages that take the same time per
micro-batch under 1F1B, so that the only idle time left is the pipeline's own. Wide (4096), so that a pass takes
about as long as in the models pipelines are for: at width 1024 a pass lasts a few ms on this CPU, and the fixed
cost of each transfer and instruction (about 1 ms) hides the difference between the schedules. Four layers per
stage, because ZB-H1's bubble assumes equal F, B and W times on every stage, and stage 0 has no input gradient to
compute: its first layer has no B, which weighs less the more layers the stage has (the simulator, with per-layer
costs: ZB-H1 / 1F1B bubble 0.45 with two layers per stage, 0.40 with four, 1/3 in the limit).

Both schedules train identical copies of the model in the same processes, in alternating rounds, so that both
see the same machine; every instruction is traced. After the timed rounds, alternating batches of each measure
memory per stage (medians over those batches), all three exactly: the activations saved for backward
(:class:`~ds_pipe_ext.observe.memory.ActivationMemoryMeter`); those plus the gradients B leaves for W, at instruction
boundaries; and every tensor byte the batch allocates and still holds (activations, gradients, transfers,
temporaries), from the CPU allocator through PyTorch's profiler: what ``torch.cuda.max_memory_allocated`` would
show on a GPU, counted from the batch's start.

Writes bench/results/zero_bubble.{json,md} and the measured timelines docs/img/trace_{1f1b,zb-h1}.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCHEDULES = ("1f1b", "zb-h1")
TAIL = {"ReduceTiedGrads", "ReduceGrads", "OptimizerStep"}  # the batch's tail, left out of memory and bubble
PASS_NAMES = {
    "forward": "ForwardPass",
    "backward": "BackwardPass",
    "backward_input": "BackwardInputPass",
    "backward_weight": "BackwardWeightPass",
}
PIPELINED_MARK = "ds_pipe_ext.bench.pipelined"  # profiler marker after each instruction before the tail
# glibc returns every freed block above 32 MiB to the OS and faults it in again on the next allocation: each
# 64 MiB weight gradient of a pass would cost ~50 ms of page faults. Both schedules run with freed memory kept,
# as PyTorch's caching allocator keeps it on GPUs.
KEEP_FREED_MEMORY = {
    "MALLOC_MMAP_THRESHOLD_": str(2**30),
    "MALLOC_TRIM_THRESHOLD_": str(2**32 - 1),
    "MALLOC_TOP_PAD_": str(2**28),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096, help="features of every Linear layer")
    parser.add_argument("--depth", type=int, default=8, help="Linear + ReLU blocks (half per stage)")
    parser.add_argument(
        "--input-width",
        type=int,
        default=6400,
        help="features in: about 1.5 x width gives stage 0 the time of stage 1, whose first layer also computes its "
        "input's gradient and which computes the loss (6400: 197 against 199 ms per micro-batch under 1F1B)",
    )
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--micro-batches", type=int, default=8, help="M, micro-batches per step")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of the two schedules")
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--memory-rounds", type=int, default=3, help="alternating batches measuring memory")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps of each schedule first")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--trace-dir", type=Path, default=Path("/tmp/ds_pipe_ext_bench_zero_bubble"))
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch_self(argv: list[str]) -> int:
    """Run this script on 2 CPU ranks under DeepSpeed's launcher, one thread each."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1", **KEEP_FREED_MEMORY}
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed), "--num_gpus", "2", "--master_port", str(port), __file__, *argv]
    return subprocess.call(cmd, env=env, cwd=ROOT)


def make_tracer_sample_memory(engine) -> None:
    """While ``tracer.meter`` (an :class:`~ds_pipe_ext.observe.memory.ActivationMemoryMeter`) runs: after every
    instruction before the batch's tail, note the activation and held-gradient bytes and mark the profiler's
    timeline."""
    from torch.profiler import record_function

    tracer = engine.tracer
    record = tracer.record
    tracer.held, tracer.meter = [], None

    def record_and_sample(instruction, start, end):
        record(instruction, start, end)
        if tracer.meter is None or type(instruction).__name__ in TAIL:
            return
        pending = [p for p in engine.pipe_buffers.get("pending_weight_grads", []) if p is not None]
        tracer.held.append(tracer.meter.live_bytes + sum(p.nbytes() for p in pending))
        with record_function(PIPELINED_MARK):
            pass

    tracer.record = record_and_sample


def build_engines(args: argparse.Namespace) -> dict:
    import torch
    from torch import nn

    import ds_pipe_ext

    config = {
        "train_batch_size": args.micro_batch * args.micro_batches,
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engines = {}
    for schedule in SCHEDULES:
        torch.manual_seed(0)
        widths = [args.input_width, *[args.width] * args.depth]
        blocks = [[nn.Linear(width, args.width), nn.ReLU()] for width in widths[:-1]]
        module = ds_pipe_ext.PipelineModule(
            layers=[*itertools.chain.from_iterable(blocks), nn.Linear(args.width, 10)],
            num_stages=2,
            loss_fn=nn.CrossEntropyLoss(),
            partition_method=f"manual:0,{args.depth},{2 * args.depth + 1}",
        )
        engine, _, _, _ = ds_pipe_ext.initialize(
            model=module,
            model_parameters=module.parameters(),
            config=config,
            schedule=schedule,
            trace_dir=str(args.trace_dir / schedule),
        )
        make_tracer_sample_memory(engine)
        engines[schedule] = engine
    return engines


def train(engines: dict, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict[str, dict[str, float]]]:
    """Warm-up steps, then alternating rounds: the seconds of every timed step per schedule. Then alternating
    memory batches: per schedule, the median of their peaks (MiB, see :func:`peak_memory`)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ds_pipe_ext.observe.memory import ActivationMemoryMeter

    generator = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(args.micro_batch, args.input_width, generator=generator),
        torch.randint(0, 10, (args.micro_batch,), generator=generator),
    )
    data = itertools.repeat(batch)
    for engine in engines.values():
        for _ in range(args.warmup_steps):
            engine.train_batch(data)
    seconds: dict[str, list[float]] = {schedule: [] for schedule in SCHEDULES}
    for round_index in range(args.rounds):
        for schedule in alternating(round_index):
            for _ in range(args.steps_per_round):
                start = time.perf_counter()
                engines[schedule].train_batch(data)
                seconds[schedule].append(time.perf_counter() - start)
    peaks: dict[str, list[dict[str, float]]] = {schedule: [] for schedule in SCHEDULES}
    for round_index in range(args.memory_rounds):
        for schedule in alternating(round_index):
            engine = engines[schedule]
            engine.tracer.held.clear()
            profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            with ActivationMemoryMeter(engine.module.parameters()) as meter, profiler:
                engine.tracer.meter = meter
                engine.train_batch(data)
            engine.tracer.meter = None
            peaks[schedule].append(peak_memory(engine.tracer.held, meter, profiler, args.trace_dir))
    return seconds, {
        schedule: {key: statistics.median(peak[key] for peak in values) for key in values[0]}
        for schedule, values in peaks.items()
    }


def alternating(round_index: int) -> tuple[str, ...]:
    """The schedules in the order round ``round_index`` runs them: each goes first in every other round."""
    return SCHEDULES if round_index % 2 == 0 else SCHEDULES[::-1]


def peak_memory(held: list[int], meter, profiler, scratch: Path) -> dict[str, float]:
    """MiB, over the pipelined part of the batch: the most activation bytes saved for backward at once, the most
    activations plus gradients held for W at an instruction boundary, and the most bytes allocated since the batch
    began and not yet freed, within instructions too (everything: activations, gradients, temporaries)."""
    path = scratch / f"memory_rank{os.environ['RANK']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    profiler.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    pipelined_end = max(e["ts"] for e in events if e.get("name") == PIPELINED_MARK)
    allocated = [
        e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]" and e["ts"] <= pipelined_end
    ]
    return {
        "activations": meter.peak_bytes / 2**20,
        "activations_and_held_gradients": max(held) / 2**20,
        "allocated": max(allocated, default=0) / 2**20,
    }


def analyse(args: argparse.Namespace, seconds: dict, memory: dict) -> dict:
    """Per schedule: samples/s, measured bubble per stage over the timed steps, the simulator's prediction from
    the measured pass times, and per-stage peak memory."""
    from ds_pipe_ext.observe.simulation import simulate, stage_bubble_fractions
    from ds_pipe_ext.observe.trace import load_trace, transfer_time

    timed = range(args.warmup_steps, args.warmup_steps + args.rounds * args.steps_per_round)
    samples = args.micro_batch * args.micro_batches
    results = {}
    for schedule in SCHEDULES:
        run = load_trace(args.trace_dir / schedule)
        per_step = [stage_bubble_fractions(run.timeline(step), run.stages) for step in timed]
        costs = {
            key: [median_pass_time(run, timed, stage, name) for stage in range(run.stages)]
            for key, name in PASS_NAMES.items()
        }
        costs = {key: value for key, value in costs.items() if any(value)}
        transfer = transfer_time(run.timeline(step) for step in timed)
        unit_costs = simulate(schedule, run.stages, run.micro_batches)
        makespans = [
            max(e.end for e in run.timeline(step)) - min(e.start for e in run.timeline(step)) for step in timed
        ]
        representative = sorted(timed, key=lambda step: makespans[step - timed.start])[len(timed) // 2]
        results[schedule] = {
            "samples_per_s": samples / statistics.median(seconds[schedule]),
            "samples_per_s_per_step": [samples / s for s in seconds[schedule]],
            "step_seconds_median": statistics.median(seconds[schedule]),
            "bubble_measured": statistics.fmean(statistics.fmean(fractions) for fractions in per_step),
            "bubble_measured_per_round": [
                statistics.fmean(statistics.fmean(fractions) for fractions in per_step[r : r + args.steps_per_round])
                for r in range(0, len(per_step), args.steps_per_round)
            ],
            "bubble_measured_per_stage": [statistics.fmean(column) for column in zip(*per_step)],
            "bubble_predicted_from_measured_costs": simulate(
                schedule, run.stages, run.micro_batches, {**costs, "send": transfer}
            ).bubble_fraction,
            "bubble_unit_costs": unit_costs.bubble_fraction,
            "peak_buffers": unit_costs.peak_buffers,
            "pass_ms_per_stage": {key: [v * 1e3 for v in value] for key, value in costs.items()},
            "transfer_ms": transfer * 1e3,
            "peak_memory_mib_per_stage": memory[schedule],
            "timeline_step": representative,
        }
        results[schedule]["_run"] = run
    return results


def median_pass_time(run, steps: range, stage: int, name: str) -> float:
    times = [e.end - e.start for step in steps for e in run.timeline(step) if e.stage == stage and e.name == name]
    return statistics.median(times) if times else 0.0


def draw(run, step: int, schedule: str, path: Path) -> None:
    """The measured timeline of one step; stage 0's B passes, which have nothing to compute, are left out."""
    from ds_pipe_ext.observe.draw import draw_timeline
    from ds_pipe_ext.observe.simulation import bubble_fraction

    events = run.timeline(step)
    title = (
        f"{schedule}, measured on 2 CPU ranks (M={run.micro_batches}, the step of median length): "
        f"bubble {bubble_fraction(events, run.stages):.3f}"
    )
    drawn = [e for e in events if not (e.name == "BackwardInputPass" and e.stage == 0)]
    draw_timeline(drawn, run.stages, path, title=title, xlabel="seconds")


def write_report(args: argparse.Namespace, results: dict) -> None:
    one, zb = results["1f1b"], results["zb-h1"]
    args.img.mkdir(parents=True, exist_ok=True)
    for schedule, result in results.items():
        draw(result.pop("_run"), result["timeline_step"], schedule, args.img / f"trace_{schedule}.png")
    ratios = {
        "bubble": zb["bubble_measured"] / one["bubble_measured"],
        "bubble_per_round": [z / o for z, o in zip(zb["bubble_measured_per_round"], one["bubble_measured_per_round"])],
        "samples_per_s_per_round": [
            statistics.median(zb["samples_per_s_per_step"][r : r + args.steps_per_round])
            / statistics.median(one["samples_per_s_per_step"][r : r + args.steps_per_round])
            for r in range(0, len(zb["samples_per_s_per_step"]), args.steps_per_round)
        ],
        "samples_per_s": zb["samples_per_s"] / one["samples_per_s"],
        "peak_memory_per_stage": {
            key: [z / o if o else None for z, o in zip(values, one["peak_memory_mib_per_stage"][key])]
            for key, values in zb["peak_memory_mib_per_stage"].items()
        },
    }
    record = {
        "setup": {
            "model": f"Linear({args.input_width}, {args.width}) + ReLU, {args.depth - 1} x (Linear({args.width}, "
            f"{args.width}) + ReLU), Linear({args.width}, 10)",
            "stages": 2,
            "partition": f"{args.depth // 2} Linear + ReLU blocks per stage, the head on stage 1",
            "micro_batches": args.micro_batches,
            "micro_batch_size": args.micro_batch,
            "device": "cpu, 2 ranks, 1 thread each (gloo)",
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "memory_rounds": args.memory_rounds,
        },
        "results": results,
        "zb_h1_over_1f1b": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zero_bubble.json").write_text(json.dumps(record, indent=1))
    (args.out / "zero_bubble.md").write_text(markdown(record))
    print(markdown(record), flush=True)


def markdown(record: dict) -> str:
    setup, results, ratios = record["setup"], record["results"], record["zb_h1_over_1f1b"]
    one, zb = results["1f1b"], results["zb-h1"]

    def stages(values: list[float], fmt: str) -> str:
        return " / ".join(format(v, fmt) for v in values)

    def passes(result: dict) -> str:
        return "; ".join(f"{key} {stages(value, '.1f')}" for key, value in result["pass_ms_per_stage"].items())

    rows = [
        (
            "samples/s (median step)",
            f"{one['samples_per_s']:.1f}",
            f"{zb['samples_per_s']:.1f}",
            f"{ratios['samples_per_s']:.3f}",
        ),
        (
            "bubble, measured",
            f"{one['bubble_measured']:.3f}",
            f"{zb['bubble_measured']:.3f}",
            f"{ratios['bubble']:.3f}",
        ),
        (
            "zb-h1 / 1f1b in each round: samples/s; bubble",
            "",
            "",
            ", ".join(f"{r:.2f}" for r in ratios["samples_per_s_per_round"])
            + "; "
            + ", ".join(f"{r:.2f}" for r in ratios["bubble_per_round"]),
        ),
        (
            "bubble per stage, measured",
            stages(one["bubble_measured_per_stage"], ".3f"),
            stages(zb["bubble_measured_per_stage"], ".3f"),
            "",
        ),
        (
            "bubble, simulator with measured pass times",
            f"{one['bubble_predicted_from_measured_costs']:.3f}",
            f"{zb['bubble_predicted_from_measured_costs']:.3f}",
            "",
        ),
        (
            "compute per micro-batch, ms (F + B + W; the stages' balance)",
            stages(compute_per_micro_batch(one), ".1f"),
            stages(compute_per_micro_batch(zb), ".1f"),
            "",
        ),
        ("bubble, simulator with F = B = W", f"{one['bubble_unit_costs']:.3f}", f"{zb['bubble_unit_costs']:.3f}", ""),
        (
            "activation buffers held at once per stage (simulator)",
            stages(one["peak_buffers"], "d"),
            stages(zb["peak_buffers"], "d"),
            "",
        ),
    ]
    memory_rows = {
        "activations": "peak activations saved for backward, MiB (exact)",
        "activations_and_held_gradients": "peak activations + gradients held for W, MiB (exact)",
        "allocated": "peak tensor memory allocated during the batch, MiB (everything; exact)",
    }
    for key, name in memory_rows.items():
        one_peaks, zb_peaks = one["peak_memory_mib_per_stage"][key], zb["peak_memory_mib_per_stage"][key]
        ratio = [r for r in ratios["peak_memory_per_stage"][key] if r is not None]
        rows.append((name, stages(one_peaks, ".1f"), stages(zb_peaks, ".1f"), stages(ratio, ".2f")))
    table = ["| | 1f1b | zb-h1 | zb-h1 / 1f1b |", "|---|---|---|---|"]
    table += [f"| {name} | {a} | {b} | {c} |" for name, a, b, c in rows]
    return "\n".join(
        [
            "# ZB-H1 against 1F1B (bench/bench_zero_bubble.py)",
            "",
            f"{setup['model']}, {setup['stages']} stages ({setup['partition']}), M = {setup['micro_batches']} "
            f"micro-batches of {setup['micro_batch_size']}, {setup['device']}; {setup['rounds']} alternating rounds "
            f"of {setup['steps_per_round']} steps per schedule, then {setup['memory_rounds']} alternating batches "
            "measuring memory (medians). Stage values are stage 0 / stage 1.",
            "",
            *table,
            "",
            f"Median pass times per micro-batch (ms, stage 0 / stage 1): 1f1b {passes(one)}; zb-h1 {passes(zb)}.",
            "On stage 0 B has no input gradient to compute, so its W is the whole backward.",
            "",
        ]
    )


def compute_per_micro_batch(result: dict) -> list[float]:
    return [sum(stage) for stage in zip(*result["pass_ms_per_stage"].values())]


def main() -> None:
    if "LOCAL_RANK" not in os.environ:
        sys.exit(launch_self(sys.argv[1:]))
    args = parse_args()
    import deepspeed
    from deepspeed import comm as dist

    deepspeed.init_distributed(dist_backend="gloo")
    engines = build_engines(args)
    seconds, local_peaks = train(engines, args)
    memory = {}
    for schedule, engine in engines.items():
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, local_peaks[schedule])
        memory[schedule] = {key: [peak[key] for peak in peaks] for key in peaks[0]}
        engine.save_trace()
    if dist.get_rank() == 0:
        write_report(args, analyse(args, seconds, memory))
    # Leaving gloo's process group to the interpreter's shutdown can abort a rank ("terminate called without an
    # active exception"), and the launcher then kills rank 0 before it has written the report.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
