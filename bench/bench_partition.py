"""Does ``profile`` find the fast split, run after run? Exhaustive scans against the partition methods.

AlexNet at 224 px, micro-batch 8, M = 8 micro-batches per step, DeepSpeed-compatible 1F1B, 2 stages on 2 CPU
ranks (1 thread each). Each run is one job: the methods (``profile``, ``parameters``, ``uniform``, ``flops``;
``profile`` measures in situ, inside that job, every time), every boundary of the 22-layer list
(``manual:0,B,22``), then the methods and the boundaries again in reverse order. A boundary's samples/s is the
median over every timed step of every row that ran it in the job (scan rows and method rows alike), so a
disturbance in one row does not decide the best. ``--runs`` runs in a row on the same machine: ``profile``'s
choices are judged in their own job, against that job's best boundary (goal: every choice >= 0.95x). ``-p 0``
(plain data parallel on the same 2 ranks) runs once, in a job of its own. Then a table over AlexNet and VGG19 at
2 and 4 stages of the largest stage's time over the mean stage time, per method, from ``ds-pipe plan``.

    python bench/bench_partition.py [--runs 3] [--steps 3] [--image-size 224]
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
GOAL = 0.95


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


def one_run(base: dict, port: int) -> dict:
    """One job: methods, scan, and both again in reverse. Per boundary the pooled samples/s; per method its rows."""
    methods = [{**base, "partition": m, "trace": True} for m in METHODS]
    scan = [{**base, "partition": f"manual:0,{b},{LAYERS}"} for b in range(1, LAYERS)]
    order = methods + scan
    rows = run_configs(order + order[::-1], port=port)["rows"]
    samples = base["micro_batch"] * base["micro_batches"]
    seconds: dict[int, list[float]] = {}
    for row in rows:
        seconds.setdefault(row["boundaries"][1], []).extend(row["seconds"])
    speed = {b: samples / statistics.median(times) for b, times in sorted(seconds.items())}
    best = max(speed, key=speed.get)
    method_rows = {m: [row for row in rows if row["partition"] == m] for m in METHODS}
    choices = [row["boundaries"][1] for row in method_rows["profile"]]
    return {
        "rows": rows,
        "speed": speed,
        "best_boundary": best,
        "best_samples_per_s": speed[best],
        "method_boundaries": {m: [row["boundaries"][1] for row in method_rows[m]] for m in METHODS},
        "method_over_best": {m: [speed[row["boundaries"][1]] / speed[best] for row in method_rows[m]] for m in METHODS},
        "profile_choices": choices,
        "profile_over_best": [speed[b] / speed[best] for b in choices],
        "profile_predicted_step": [row["predicted_step"] for row in method_rows["profile"]],
        "profile_measured_step": [statistics.median(row["seconds"]) for row in method_rows["profile"]],
        "profile_stage_costs": method_rows["profile"][0].get("stage_costs"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="jobs in a row, each judged on its own")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-imbalance", action="store_true", help="skip the ds-pipe plan imbalance table")
    parser.add_argument("--name", default="partition", help="results file name under bench/results")
    parser.add_argument("--note", default="", help="a line for the results, e.g. how busy the machine was")
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
    runs = [one_run(base, port=29650) for _ in range(args.runs)]
    data_parallel = run_configs([{**base, "stages": 0, "partition": None, "schedule": None}], port=29651)
    dp = data_parallel["rows"][0]
    boundaries = sorted(runs[0]["speed"])
    scan_table = table(
        ["boundary", *(f"run {i + 1} samples/s" for i in range(len(runs)))],
        [
            [
                b,
                *(
                    f"**{run['speed'][b]:.2f}**" if b == run["best_boundary"] else f"{run['speed'][b]:.2f}"
                    for run in runs
                ),
            ]
            for b in boundaries
        ],
    )
    run_table = table(
        [
            "run",
            "best boundary",
            "best samples/s",
            "profile chose",
            "profile / best",
            "goal >= 0.95",
            "profile predicted / measured s/step",
        ],
        [
            [
                i + 1,
                run["best_boundary"],
                f"{run['best_samples_per_s']:.2f}",
                ", ".join(map(str, run["profile_choices"])),
                ", ".join(f"{r:.3f}" for r in run["profile_over_best"]),
                "met" if min(run["profile_over_best"]) >= GOAL else "**missed**",
                ", ".join(
                    f"{p:.2f} / {m:.2f}" for p, m in zip(run["profile_predicted_step"], run["profile_measured_step"])
                ),
            ]
            for i, run in enumerate(runs)
        ],
    )
    method_table = table(
        ["method", *(f"run {i + 1}: boundary, vs best" for i in range(len(runs)))],
        [
            [
                m,
                *(
                    "; ".join(f"{b} ({r:.3f})" for b, r in zip(run["method_boundaries"][m], run["method_over_best"][m]))
                    for run in runs
                ),
            ]
            for m in METHODS
        ],
    )
    stage_costs = runs[0]["profile_stage_costs"]
    stage_times = (
        table(
            ["stage", "forward ms / micro-batch", "backward ms / micro-batch"],
            [
                [s, f"{1e3 * f:.0f}", f"{1e3 * b:.0f}"]
                for s, (f, b) in enumerate(zip(stage_costs["forward"], stage_costs["backward"]))
            ],
        )
        if stage_costs
        else ""
    )
    summary = {
        "profile_choices": [run["profile_choices"] for run in runs],
        "profile_over_best": [run["profile_over_best"] for run in runs],
        "best_boundaries": [run["best_boundary"] for run in runs],
        "goal_met": all(min(run["profile_over_best"]) >= GOAL for run in runs),
        "data_parallel_samples_per_s": dp["samples_per_s"],
    }
    sections = [
        "# Partition methods: repeated exhaustive scans and the methods\n",
        f"AlexNet {args.image_size} px, micro-batch 8, M = 8, 1F1B, 2 stages on 2 CPU ranks; {machine()}. "
        f"{args.runs} runs in a row, each one job: methods, the 21 boundaries, then both again in reverse; "
        f"{args.steps} timed steps per row after 1 warm-up. A boundary's samples/s: the median over all timed steps "
        "of all rows that ran it in the job. `profile` measures in situ in every row that uses it.\n",
        f"**{args.note}**\n" if args.note else "",
        "## profile, run after run\n",
        run_table,
        "## Scan: samples/s per boundary B (`manual:0,B,22`), best of each run in bold\n",
        scan_table,
        "## Methods: boundary chosen and its samples/s over the run's best boundary\n",
        method_table,
        f"Data parallel (`-p 0`) on the same 2 ranks: {dp['samples_per_s']:.2f} samples/s "
        f"({dp['samples_per_s'] / runs[0]['best_samples_per_s']:.3f}x run 1's best boundary).\n",
        "## Measured per-stage times of profile's split (trace of run 1's first profile row)\n",
        stage_times,
    ]
    plans = {}
    if not args.no_imbalance:
        imbalance_rows, plans = imbalance_table(args.image_size)
        sections += [
            "## Largest stage over mean stage time (`ds-pipe plan`, costs profiled in one process)\n",
            table(["model", "stages", *METHODS], imbalance_rows),
        ]
    write_results(
        args.name,
        {"summary": summary, "runs": runs, "data_parallel": data_parallel, "plans": plans},
        "\n".join(sections) + "\n",
    )


if __name__ == "__main__":
    main()
