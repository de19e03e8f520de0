"""Several runs of an example in one launch: one process group, the runs one after another.

    deepspeed --num_gpus 2 tests/scripts/example_runs.py RUNS.json

``RUNS.json`` is ``{"script": "examples/gpt/train.py", "runs": {NAME: [example arguments, ...], ...}}``; each run is
the example's own pipeline run (``examples/common.py``: its checks, ``train_pipe``, its log, trace and
checkpoints), from the example's seed, as if the example had been launched with those arguments. What one launch
saves is importing DeepSpeed and joining the process group once per run (about 8 s per rank on a 2-core machine).
Only pipeline runs (``-p 1`` or more) belong here: ``-p 0`` builds another kind of engine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import deepspeed
from deepspeed import comm as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import common  # noqa: E402


def load_example(script: Path):
    spec = importlib.util.spec_from_file_location(f"example_{script.parent.name}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("runs", type=Path)
    spec = json.loads(parser.parse_args().runs.read_text())
    example = load_example(ROOT / spec["script"])
    plans = {}
    for name, argv in spec["runs"].items():  # every command line checked before the first collective
        args = example.get_args(argv)
        plans[name] = (args, example.RunPlan(args, example.build_example(args)))
        if not plans[name][1].pipe:
            raise ValueError(f"run {name!r}: only pipeline runs (-p 1 or more) run here")
    first_args, first_plan = next(iter(plans.values()))
    deepspeed.init_distributed(dist_backend=first_args.backend, timeout=first_plan.comm_timeout)
    for name, (args, plan) in plans.items():
        if dist.get_rank() == 0:
            print(f"==== run {name}: {' '.join(spec['runs'][name])}", flush=True)
        log = common.start_log(args, plan)
        common.train_pipe(args, plan, log)
        common.finish_log(args, log)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
