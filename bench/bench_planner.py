"""The planner against measurement: every plan of the grid that fits, trained side by side on 2 CPU ranks.

For each model: ``ds-pipe plan --auto`` runs under DeepSpeed's launcher on the ranks (so its costs are measured in
situ, every rank at once) and writes every plan that fits the memory budget; then one job trains each of those
plans (its stages, micro-batches, schedule and the planner's boundaries) in rank order and again in reverse, and
times steps (median over both passes) and memory. Compared per plan:

- samples/s: the planner's first pick against the best measured plan (goal >= 0.95x);
- step time: predicted against measured (goal within 15%);
- peak memory per rank: predicted against what the model counts, measured exactly: the stage's parameters,
  gradients and optimizer state (the engine's tensors) plus the peak activations saved for backward. Resident
  memory is listed beside it: it adds the Python, PyTorch and DeepSpeed runtime and the allocator's slack, which
  the model does not predict.

    python bench/bench_planner.py [--models alexnet] [--size 224] [--global-batch 64] [--memory-budget 3GiB]
    python bench/bench_planner.py --quick      # 64 px, global batch 16, 2 or 4 micro-batches: minutes, not an hour

Writes bench/results/planner.{json,md} and the raw measurements planner_raw.json (``--name`` changes the name);
``--analyse-only`` writes the results again from the raw measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

from common import DEEPSPEED, RESULTS, ROOT, machine, run_configs, table, write_results

from ds_pipe_ext.planner import Plan
from ds_pipe_ext.planner.search import byte_size

GOAL_PICK, GOAL_STEP, GOAL_MEMORY = 0.95, 0.15, 0.15


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["alexnet"])
    parser.add_argument("--size", type=int, default=224, help="image size (sequence length for a language model)")
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--memory-budget", default="3GiB", help="bytes per rank, e.g. 6e9 or 3GiB")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[2, 4, 8, 16], help="the grid's M values")
    parser.add_argument("--stages", type=int, nargs="+", default=None, help="the grid's pipeline sizes (default all)")
    parser.add_argument("--schedules", nargs="+", default=None, help="the grid's schedules (default all registered)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per plan and pass, after one warm-up")
    parser.add_argument("--repeats", type=int, default=5, help="the planner's measuring rounds")
    parser.add_argument("--quick", action="store_true", help="64 px, global batch 16, M in {2, 4}, 2 steps")
    parser.add_argument("--name", default="planner", help="results file name under bench/results")
    parser.add_argument("--port", type=int, default=29660)
    parser.add_argument(
        "--analyse-only", action="store_true", help="re-analyse the measurements of the last run (--name) only"
    )
    parser.add_argument("--note", default="", help="a line for the results, e.g. how busy the machine was")
    args = parser.parse_args()
    if args.quick:
        args.size, args.global_batch, args.micro_batches, args.steps = 64, 16, [2, 4], 2
    return args


def plan(model: str, args: argparse.Namespace, out: Path) -> dict:
    """``ds-pipe plan --auto`` on 2 ranks under DeepSpeed's launcher: every plan that fits, as JSON."""
    cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(args.port), "--no_local_rank", "--module"]
    cmd += ["ds_pipe_ext", "plan", "--auto", "--world", "2", "--global-batch", str(args.global_batch)]
    cmd += ["--model", model, "--size", str(args.size), "--memory-budget", args.memory_budget]
    cmd += ["--repeats", str(args.repeats), "--micro-batches", *map(str, args.micro_batches), "--out", str(out)]
    cmd += ["--stages", *map(str, args.stages)] if args.stages else []
    cmd += ["--schedules", *args.schedules] if args.schedules else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    env.setdefault("DS_ACCELERATOR", "cpu")
    try:
        result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    finally:  # DeepSpeed 0.19.8's CPU backend never unlinks its shared-memory all-reduce buffers
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{args.port}_*"):
            path.unlink(missing_ok=True)
    if not out.exists():
        raise SystemExit(f"planning failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    print(result.stdout[-3000:], flush=True)
    return json.loads(out.read_text())


def measure(model: str, plans: list[Plan], args: argparse.Namespace) -> list[dict]:
    """Train every plan, in rank order and then in reverse, in one job: per plan, both passes' rows."""
    configs = [
        {
            "model": model,
            "image_size": args.size,
            "micro_batch": p.micro_batch_size,
            "micro_batches": p.micro_batches,
            "stages": p.stages,
            "partition": p.partition_method,
            "schedule": p.schedule,
            "virtual_stages": p.virtual_stages,
            "steps": args.steps,
            "rank": index,
        }
        for index, p in enumerate(plans)
    ]
    rows = run_configs(configs + configs[::-1], port=args.port + 1)["rows"]
    return [[row for row in rows if row["rank"] == index] for index in range(len(plans))]


def compare(plans: list[Plan], runs: list[list[dict]]) -> list[dict]:
    """Per plan: predicted and measured step, samples/s and memory per rank (by the rank's stage)."""
    compared = []
    for p, rows in zip(plans, runs):
        seconds = statistics.median(s for row in rows for s in row["seconds"])
        per_rank = [rank for row in rows for rank in row["per_rank"]]
        measured_memory = [
            statistics.median(r["model_memory_mb"] for r in per_rank if r["stage"] == stage) * 2**20
            for stage in range(p.stages)
        ]
        rss = [max(r["peak_rss_mb"] for r in per_rank if r["stage"] == stage) * 2**20 for stage in range(p.stages)]
        compared.append(
            {
                "plan": p.to_dict(),
                "measured_step": seconds,
                "measured_samples_per_s": p.global_batch / seconds,
                "step_error": p.step_time / seconds - 1,
                "measured_memory": measured_memory,
                "memory_error": max(
                    (predicted / measured - 1 for predicted, measured in zip(p.stage_memory, measured_memory)),
                    key=abs,
                ),
                "peak_rss": rss,
            }
        )
    return compared


def summary(compared: list[dict]) -> dict:
    best = max(compared, key=lambda entry: entry["measured_samples_per_s"])
    first = compared[0]
    step_errors = [abs(entry["step_error"]) for entry in compared]
    memory_errors = [abs(entry["memory_error"]) for entry in compared]
    return {
        "plans_measured": len(compared),
        "first_pick": first["plan"]["partition_method"] + " " + first["plan"]["schedule"],
        "first_pick_over_best": first["measured_samples_per_s"] / best["measured_samples_per_s"],
        "best_measured_rank": compared.index(best) + 1,
        "step_within_15pct": sum(e <= GOAL_STEP for e in step_errors),
        "memory_within_15pct": sum(e <= GOAL_MEMORY for e in memory_errors),
        "median_step_error": statistics.median(step_errors),
        "median_memory_error": statistics.median(memory_errors),
        "worst_step_error": max(step_errors),
        "worst_memory_error": max(memory_errors),
    }


def markdown(model: str, planned: dict, compared: list[dict], result: dict, args: argparse.Namespace) -> str:
    rows = []
    for rank, entry in enumerate(compared, 1):
        p = entry["plan"]
        rows.append(
            [
                rank,
                f"{p['stages']} x {p['data_parallel']}",
                f"{p['micro_batches']} x {p['micro_batch_size']}",
                p["schedule"] + (f" v={p['virtual_stages']}" if p.get("virtual_stages", 1) > 1 else ""),
                ",".join(map(str, p["boundaries"])),
                f"{p['step_time']:.3f}",
                f"{entry['measured_step']:.3f}",
                f"{100 * entry['step_error']:+.0f}%",
                f"{entry['measured_samples_per_s']:.2f}",
                " / ".join(byte_size(m) for m in p["stage_memory"]),
                " / ".join(byte_size(m) for m in entry["measured_memory"]),
                f"{100 * entry['memory_error']:+.0f}%",
                " / ".join(byte_size(m) for m in entry["peak_rss"]),
            ]
        )
    verdict = lambda ok: "met" if ok else "**missed**"
    n = result["plans_measured"]
    return "\n".join(
        [
            f"## {model}\n",
            f"{len(planned['plans'])} plans fit the budget of {byte_size(planned['budget'])} per rank "
            f"({len(planned['over_budget'])} combinations did not); all of them measured, in the planner's order.\n",
            table(
                [
                    "#",
                    "stages x replicas",
                    "micro-batches",
                    "schedule",
                    "boundaries",
                    "predicted s/step",
                    "measured s/step",
                    "step error",
                    "measured samples/s",
                    "predicted memory by stage",
                    "measured (model's terms)",
                    "memory error",
                    "peak RSS by stage",
                ],
                rows,
            ),
            f"- first pick / best measured plan (#{result['best_measured_rank']}): "
            f"{result['first_pick_over_best']:.3f} (goal >= {GOAL_PICK}: "
            f"{verdict(result['first_pick_over_best'] >= GOAL_PICK)})",
            f"- step time within 15%: {result['step_within_15pct']} of {n} plans (median error "
            f"{100 * result['median_step_error']:.0f}%, worst {100 * result['worst_step_error']:.0f}%: "
            f"{verdict(result['step_within_15pct'] == n)})",
            f"- peak memory within 15%: {result['memory_within_15pct']} of {n} plans (median error "
            f"{100 * result['median_memory_error']:.0f}%, worst {100 * result['worst_memory_error']:.0f}%: "
            f"{verdict(result['memory_within_15pct'] == n)})\n",
        ]
    )


def main() -> None:
    args = parse_args()
    raw = RESULTS / f"{args.name}_raw.json"
    if args.analyse_only:
        measured = json.loads(raw.read_text())
        args = argparse.Namespace(**{**measured["args"], "note": args.note or measured["args"]["note"]})
    else:
        measured = {"args": vars(args), "models": {}}
        with tempfile.TemporaryDirectory() as tmp:
            for model in args.models:
                planned = plan(model, args, Path(tmp) / f"{model}.json")
                plans = [Plan.from_dict(entry) for entry in planned["plans"]]
                measured["models"][model] = {"planned": planned, "rows": measure(model, plans, args)}
                raw.write_text(json.dumps(measured))  # what was measured survives a failing analysis
    sections, data = [], {}
    for model, run in measured["models"].items():
        plans = [Plan.from_dict(entry) for entry in run["planned"]["plans"]]
        compared = compare(plans, run["rows"])
        result = summary(compared)
        data[model] = {"planned": run["planned"], "compared": compared, "summary": result}
        sections.append(markdown(model, run["planned"], compared, result, args))
    header = (
        f"# The planner against measurement\n\n{', '.join(args.models)} at size {args.size}, global batch "
        f"{args.global_batch} on 2 CPU ranks; micro-batches {args.micro_batches}; {machine()}. The planner measured "
        f"in situ ({args.repeats} rounds); each plan trained {args.steps} timed steps after 1 warm-up, in two passes "
        "(planner's order, then reversed), median of all. Memory: predicted against the model's own terms measured "
        "exactly (stage parameters + gradients + optimizer state from the engine, + peak saved activations).\n"
        + (f"\n**{args.note}**\n" if args.note else "")
    )
    write_results(args.name, {"args": vars(args), "models": data}, header + "\n" + "\n".join(sections))


if __name__ == "__main__":
    main()
