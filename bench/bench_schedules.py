"""Issue 4: GPipe vs 1F1B vs DeepSpeed's built-in: samples/s and peak activation memory per stage.

AlexNet at 224 px, micro-batch 8, 2 stages (uniform split) on 2 CPU ranks, M = 8 and 16 micro-batches per
step. One job runs every configuration, rounds interleaved, so all see the same machine conditions.

    python bench/bench_schedules.py [--rounds 2] [--steps 2]
"""

from __future__ import annotations

import argparse
import statistics

from common import machine, run_configs, table, write_results

SCHEDULES = ("deepspeed", "1f1b", "gpipe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    base = {
        "model": "alexnet",
        "image_size": args.image_size,
        "micro_batch": 8,
        "stages": 2,
        "partition": "uniform",
        "steps": args.steps,
    }
    configs = [
        {**base, "micro_batches": m, "schedule": s, "round": r}
        for m in (8, 16)
        for r in range(args.rounds)
        for s in SCHEDULES
    ]
    data = run_configs(configs)
    rows, summary = [], {}
    for m in (8, 16):
        by = {s: [row for row in data["rows"] if row["micro_batches"] == m and row["schedule"] == s] for s in SCHEDULES}
        speed = {s: statistics.fmean(row["samples_per_s"] for row in by[s]) for s in SCHEDULES}
        act = {
            s: [max(row["per_rank"][rank]["peak_activation_mb"] for row in by[s]) for rank in (0, 1)] for s in SCHEDULES
        }
        for s in SCHEDULES:
            rows.append(
                [
                    m,
                    s,
                    f"{speed[s]:.2f}",
                    f"{speed[s] / speed['deepspeed']:.3f}",
                    f"{act[s][0]:.0f}",
                    f"{act[s][1]:.0f}",
                ]
            )
        summary[m] = {
            "samples_per_s": speed,
            "peak_activation_mb": act,
            "1f1b_over_deepspeed_samples_per_s": speed["1f1b"] / speed["deepspeed"],
            "gpipe_over_1f1b_samples_per_s": speed["gpipe"] / speed["1f1b"],
            "gpipe_over_1f1b_stage0_activations": act["gpipe"][0] / act["1f1b"][0],
        }
    lines = [
        "# Schedules: GPipe vs 1F1B vs DeepSpeed's built-in\n",
        f"AlexNet {args.image_size} px, micro-batch 8, K = 2 stages (uniform split), 2 CPU ranks; {machine()}.",
        f"Median of {args.steps} timed steps after 1 warm-up, mean over {args.rounds} interleaved rounds. "
        "Peak activation memory = the most bytes autograd keeps saved for backward at once on that stage "
        "(`ds_pipe_ext.observe.memory.ActivationMemoryMeter`).\n",
        table(["M", "schedule", "samples/s", "vs deepspeed", "stage 0 peak act. MiB", "stage 1 peak act. MiB"], rows),
    ]
    for m, s in summary.items():
        lines.append(
            f"- M = {m}: our 1f1b / DeepSpeed's built-in samples/s = {s['1f1b_over_deepspeed_samples_per_s']:.3f}; "
            f"gpipe / 1f1b samples/s = {s['gpipe_over_1f1b_samples_per_s']:.3f}; stage-0 activations gpipe / 1f1b = "
            f"{s['gpipe_over_1f1b_stage0_activations']:.2f} (M/K = {m / 2:g})"
        )
    write_results("schedules", {"summary": summary, **data}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
