"""Issue 17: the virtual-stage schedules against 1F1B, ZB-H1 and DeepSpeed's own DualPipeV, on the GPT example.

The GPT example (tied embedding and head, 4 transformer blocks, width 128) at sequence length 256, micro-batch 8,
M = 8 micro-batches, 2 CPU ranks, one block per stage (``type:TransformerBlock``: 2 stages of 2 blocks, or 4 of
1 with two chunks per rank). One job runs every configuration, rounds interleaved, so all see the same machine.
Each of ds_pipe_ext's schedules runs traced (the bubble is measured from the trace) and, for the samples/s ratio
against DeepSpeed's DualPipeV (which cannot be traced), ``dualpipev`` also runs untraced beside it.

    python bench/bench_virtual.py [--rounds 2] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics

from common import machine, run_configs, table, write_results

#: (schedule, chunks per rank, traced)
RUNS = [
    ("1f1b", 1, True),
    ("zb-h1", 1, True),
    ("interleaved-1f1b", 2, True),
    ("zb-v", 2, True),
    ("dualpipev", 2, True),
    ("dualpipev", 2, False),
    ("deepspeed-dualpipev", 2, False),
]


def key(schedule: str, traced: bool) -> str:
    return schedule if traced else f"{schedule} (untraced)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--note", default="", help="a line for the results, e.g. how busy the machine was")
    args = parser.parse_args()
    base = {
        "model": "gpt",
        "image_size": args.seq_len,
        "micro_batch": 8,
        "micro_batches": args.micro_batches,
        "stages": 2,
        "partition": "type:TransformerBlock",
        "steps": args.steps,
    }
    configs = [
        {**base, "schedule": schedule, "virtual_stages": chunks, "trace": traced, "round": r}
        for r in range(args.rounds)
        for schedule, chunks, traced in (RUNS if r % 2 == 0 else RUNS[::-1])
    ]
    data = run_configs(configs, port=29670)
    by = {}
    for row in data["rows"]:
        by.setdefault(key(row["schedule"], row["trace"]), []).append(row)
    speed = {name: statistics.median(row["samples_per_s"] for row in rows) for name, rows in by.items()}
    bubble, pipelined = (
        {
            name: statistics.median(row["bubble"][measure] for row in rows)
            for name, rows in by.items()
            if rows[0].get("bubble")
        }
        for measure in ("measured", "measured_pipelined")
    )
    activations = {
        name: [max(row["per_rank"][rank]["peak_activation_mb"] for row in rows) for rank in (0, 1)]
        for name, rows in by.items()
    }
    rows = []
    for schedule, chunks, traced in RUNS:
        name = key(schedule, traced)
        rows.append(
            [
                name,
                chunks,
                f"{speed[name]:.1f}",
                f"{speed[name] / speed['1f1b']:.3f}" if traced else "-",
                f"{pipelined[name]:.3f}" if name in bubble else "-",
                f"{pipelined[name] / pipelined['1f1b']:.2f}" if name in bubble else "-",
                f"{bubble[name]:.3f}" if name in bubble else "-",
                f"{bubble[name] / bubble['1f1b']:.2f}" if name in bubble else "-",
                " / ".join(f"{mb:.1f}" for mb in activations[name]),
            ]
        )
    largest_1f1b = max(activations["1f1b"])
    speed_ratio = speed["dualpipev (untraced)"] / speed["deepspeed-dualpipev (untraced)"]
    # (goal, measured, limit, whether the measure must stay at or below the limit)
    goals = [
        ("interleaved-1f1b bubble / 1f1b's", pipelined["interleaved-1f1b"] / pipelined["1f1b"], 0.6, True),
        ("zb-v bubble / 1f1b's", pipelined["zb-v"] / pipelined["1f1b"], 0.25, True),
        ("zb-v largest rank's peak activations / 1f1b's largest", max(activations["zb-v"]) / largest_1f1b, 1.0, True),
        ("dualpipev samples/s / DeepSpeed's DualPipeV's", speed_ratio, 1.05, False),
    ]
    verdict = {name: value <= limit if at_most else value >= limit for name, value, limit, at_most in goals}
    lines = [
        "# Virtual stages on the GPT example (bench/bench_virtual.py)\n",
        f"GPT example (width 128, 4 blocks, tied embedding and head), sequence length {args.seq_len}, micro-batch 8, "
        f"M = {args.micro_batches}, 2 CPU ranks, partition `type:TransformerBlock`; {machine()}. Median of "
        f"{args.steps} timed steps after 1 warm-up per configuration; median over {args.rounds} rounds in "
        "alternating order. Bubble, measured from the trace: the idle share of each rank between the first and the "
        "last pass of the step (the pipelined part, which (K-1)/(M+K-1) describes; the goals use it), and of the "
        "whole step (the loads, the gradient reductions and the optimizer step count as idle there, the same time "
        "for every schedule). Peak activations: the "
        "most bytes autograd keeps saved for backward at once on the rank (ActivationMemoryMeter).",
        *([f"\n{args.note}"] if args.note else []),
        "",
        table(
            [
                "schedule",
                "chunks/rank",
                "samples/s",
                "vs 1f1b",
                "bubble, passes",
                "vs 1f1b",
                "bubble, whole step",
                "vs 1f1b",
                "peak act. MiB r0 / r1",
            ],
            rows,
        ),
        "Goals (issue 17):\n",
        *[
            f"- {name}: {value:.3f} (goal {'<=' if at_most else '>='} {limit}: {'met' if verdict[name] else 'missed'})"
            for name, value, limit, at_most in goals
        ],
    ]
    summary = {
        "samples_per_s": speed,
        "bubble": bubble,
        "bubble_pipelined": pipelined,
        "peak_activation_mb": activations,
        "goals": goals,
        "met": verdict,
    }
    write_results("virtual", {"summary": summary, **data}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
