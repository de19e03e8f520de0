"""Issue 6: what tracing costs. 1F1B with and without ``--trace``, alternating, on 2 CPU ranks.

AlexNet at 64 px, micro-batch 4, M = 8: small compute per instruction, so the tracer's fixed cost per
instruction weighs the most here.

    python bench/bench_trace_overhead.py [--rounds 4] [--steps 3]
"""

from __future__ import annotations

import argparse
import statistics

from common import machine, run_configs, table, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    base = {
        "model": "alexnet",
        "image_size": 64,
        "micro_batch": 4,
        "micro_batches": 8,
        "stages": 2,
        "partition": "uniform",
        "schedule": "1f1b",
        "steps": args.steps,
    }
    configs = [{**base, "trace": trace, "round": r} for r in range(args.rounds) for trace in (False, True)]
    data = run_configs(configs)
    speed = {
        trace: [row["samples_per_s"] for row in data["rows"] if bool(row.get("trace")) == trace]
        for trace in (False, True)
    }
    off, on = statistics.fmean(speed[False]), statistics.fmean(speed[True])
    rows = [
        [f"round {r}", f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}"]
        for r, (a, b) in enumerate(zip(speed[False], speed[True]))
    ]
    rows.append(["mean", f"{off:.2f}", f"{on:.2f}", f"{on / off:.3f}"])
    text = "\n".join(
        [
            "# Tracing overhead\n",
            f"1F1B, AlexNet 64 px, micro-batch 4, M = 8, 2 stages on 2 CPU ranks; {machine()}; "
            f"median of {args.steps} steps per round after 1 warm-up.\n",
            table(["", "samples/s, trace off", "samples/s, trace on", "on / off"], rows),
            f"Tracing on keeps {on / off:.1%} of the untraced samples/s (cost {1 - on / off:+.1%}). Tracing off runs "
            "DeepSpeed's own instruction loop unchanged, so it costs nothing by construction.",
        ]
    )
    write_results("trace_overhead", {"trace_off_over_on": off / on, **data}, text + "\n")


if __name__ == "__main__":
    main()
