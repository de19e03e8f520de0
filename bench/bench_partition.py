"""Issue 3: does ``profile`` find the fast split? The exhaustive scan against the partition methods.

AlexNet at 224 px, micro-batch 8, M = 8 micro-batches per step, DeepSpeed-compatible 1F1B, 2 stages on 2 CPU
ranks (1 thread each): every boundary of the 22-layer list (``manual:0,B,22``), then ``profile``,
``parameters``, ``uniform`` and ``flops`` (twice, before and after the scan, averaged), all in one job; ``-p 0``
(plain data parallel on the same 2 ranks) in a second job of the same run. Then a table over AlexNet and VGG19
at 2 and 4 stages of the largest stage's time over the mean stage time, per method, from ``ds-pipe plan``.

    python bench/bench_partition.py [--steps 3] [--image-size 224]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from common import ROOT, machine, run_configs, table, write_results

METHODS = ("profile", "parameters", "uniform", "flops")
LAYERS = 22


def imbalance_table(image_size: int) -> tuple[list[list], dict]:
    rows, data = [], {}
    for model in ("alexnet", "vgg19"):
        for stages in (2, 4):
            cmd = [
                sys.executable,
                "-m",
                "ds_pipe_ext",
                "plan",
                "--model",
                model,
                "--image-size",
                str(image_size),
                "--micro-batch",
                "8",
                "--stages",
                str(stages),
                "--micro-batches",
                "8",
                "--repeats",
                "2",
                "--methods",
                *METHODS,
                "--json",
            ]
            out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
            plan = json.loads(out[out.index("{") :])
            data[f"{model}/{stages}"] = plan
            rows.append([model, stages, *(f"{plan[m]['imbalance']:.2f}" for m in METHODS)])
    return rows, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    base = {
        "model": "alexnet",
        "image_size": args.image_size,
        "micro_batch": 8,
        "micro_batches": 8,
        "stages": 2,
        "schedule": "1f1b",
        "steps": args.steps,
    }
    methods = [{**base, "partition": m, "trace": True} for m in METHODS]
    scan = [{**base, "partition": f"manual:0,{b},{LAYERS}"} for b in range(1, LAYERS)]
    pipe = run_configs(methods + scan + methods)
    data_parallel = run_configs([{**base, "stages": 0, "partition": None, "schedule": None}], port=29651)
    rows = pipe["rows"]
    scanned = {row["boundaries"][1]: row for row in rows if row["partition"].startswith("manual:")}
    best_boundary = max(scanned, key=lambda b: scanned[b]["samples_per_s"])
    best = scanned[best_boundary]["samples_per_s"]
    method_rows = {m: [row for row in rows if row["partition"] == m] for m in METHODS}
    speed = {m: statistics.fmean(row["samples_per_s"] for row in method_rows[m]) for m in METHODS}

    def memory(row: dict) -> str:
        return " / ".join(f"{rank['peak_rss_mb']:.0f}" for rank in row["per_rank"])

    scan_table = table(
        ["boundary", "s/step", "samples/s", "peak RSS MiB rank 0 / 1"],
        [
            [
                f"**{b}**" if b == best_boundary else b,
                f"{r['seconds_per_step']:.2f}",
                f"{r['samples_per_s']:.2f}",
                memory(r),
            ]
            for b, r in sorted(scanned.items())
        ],
    )
    dp = data_parallel["rows"][0]
    method_table_rows = []
    for m in METHODS:
        first = method_rows[m][0]
        bubble = first.get("bubble") or {}
        predicted = first["predicted_step"] if first.get("predicted_unit") == "s" else None
        method_table_rows.append(
            [
                m,
                first["boundaries"][1],
                f"{speed[m]:.2f}",
                f"{speed[m] / best:.3f}",
                memory(first),
                f"{predicted:.2f}" if predicted else "-",
                f"{statistics.median(r['seconds_per_step'] for r in method_rows[m]):.2f}",
                f"{bubble.get('measured', float('nan')):.3f}",
            ]
        )
    method_table_rows.append(
        [
            "-p 0 (data parallel)",
            "-",
            f"{dp['samples_per_s']:.2f}",
            f"{dp['samples_per_s'] / best:.3f}",
            memory(dp),
            "-",
            f"{dp['seconds_per_step']:.2f}",
            "-",
        ]
    )
    stage_times = (
        table(
            ["method", "stage", "forward ms / micro-batch", "backward ms / micro-batch"],
            [
                [m, s, f"{1e3 * f:.0f}", f"{1e3 * b:.0f}"]
                for m in METHODS
                for s, (f, b) in enumerate(zip(*(method_rows[m][0]["stage_costs"][k] for k in ("forward", "backward"))))
            ],
        )
        if all("stage_costs" in method_rows[m][0] for m in METHODS)
        else ""
    )
    imbalance_rows, plans = imbalance_table(args.image_size)
    summary = {
        "best_boundary": best_boundary,
        "best_samples_per_s": best,
        "samples_per_s": speed,
        "profile_over_best": speed["profile"] / best,
        "profile_over_parameters": speed["profile"] / speed["parameters"],
        "profile_over_uniform": speed["profile"] / speed["uniform"],
        "data_parallel_samples_per_s": dp["samples_per_s"],
    }
    text = "\n".join(
        [
            "# Partition methods: the exhaustive scan and the methods\n",
            f"AlexNet {args.image_size} px, micro-batch 8, M = 8, 1F1B, 2 stages on 2 CPU ranks; {machine()}. "
            f"Median of {args.steps} timed steps after 1 warm-up. The methods ran before and after the scan "
            "(samples/s averaged); data parallel (`-p 0`) in a second job.\n",
            "## Scan: stage boundary B (`manual:0,B,22`)\n",
            scan_table,
            "## Methods\n",
            table(
                [
                    "method",
                    "boundary",
                    "samples/s",
                    "vs best boundary",
                    "peak RSS MiB rank 0 / 1",
                    "predicted s/step",
                    "measured s/step",
                    "measured bubble",
                ],
                method_table_rows,
            ),
            f"- profile / best boundary ({best_boundary}): {summary['profile_over_best']:.3f} (goal >= 0.95)",
            f"- profile / parameters: {summary['profile_over_parameters']:.3f} (goal >= 1.4)",
            f"- profile / uniform: {summary['profile_over_uniform']:.3f} (goal >= 1.0)\n",
            "## Measured per-stage times (from the trace of the first run of each method)\n",
            stage_times,
            "## Largest stage over mean stage time (`ds-pipe plan`, costs profiled in one process)\n",
            table(["model", "stages", *METHODS], imbalance_rows),
        ]
    )
    write_results(
        "partition", {"summary": summary, "pipeline": pipe, "data_parallel": data_parallel, "plans": plans}, text + "\n"
    )


if __name__ == "__main__":
    main()
