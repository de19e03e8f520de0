"""``dualpipev`` with every backward whole against DeepSpeed's own DualPipeV, in one launch on 2 ranks.

    deepspeed --num_gpus 2 tests/scripts/dualpipev_vs_deepspeed.py OUT_DIR [--steps N]

Each run builds its module as ``bench/pipeline_bench.py`` does (``build_module``: schedule ``deepspeed-dualpipev`` is
DeepSpeed's ``DualPipeVModule``, which ``deepspeed.initialize`` runs in its ``DualPipeVEngine``; any other name is a
``ds_pipe_ext.PipelineModule`` with 2 chunks per rank), from the same seed, and trains it on the same
micro-batches (the GPT, fp32, Adam). Rank 0 writes ``OUT_DIR/NAME.pt``: the losses of every step and the final
weights of both ranks, by parameter name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import deepspeed
import torch
from deepspeed import comm as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import pipeline_bench as bench  # noqa: E402

import ds_pipe_ext  # noqa: E402
from ds_pipe_ext.schedules import register_schedule  # noqa: E402
from ds_pipe_ext.schedules.virtual import DualPipeVSchedule  # noqa: E402
from ds_pipe_ext.topology import make_topology  # noqa: E402


@register_schedule("dualpipev-whole")
class WholeDualPipeV(DualPipeVSchedule):
    """``dualpipev`` with the weight split off: DeepSpeed 0.19.8's own compute order."""

    split_weights = False


#: The GPT example's model at sequence length 32, micro-batch 2, M = 2K = 4 micro-batches, 2 ranks.
CONFIG = {"model": "gpt", "image_size": 32, "micro_batch": 2, "micro_batches": 4, "stages": 2, "partition": "uniform",
          "virtual_stages": 2}  # fmt: skip
#: name: (schedule, gradient_clipping). DeepSpeed clips at 1.0 by default, its stock pipeline modules by the norm of
#: the first pipeline rank's gradients alone; "deepspeed-dualpipev, whole norm" marks the parameters as
#: ``ds_pipe_ext.PipelineModule`` does, so that DeepSpeed's DualPipeV clips by the norm of all of them.
RUNS = {
    "deepspeed-dualpipev, no clipping": ("deepspeed-dualpipev", 0.0),
    "dualpipev-whole, no clipping": ("dualpipev-whole", 0.0),
    "deepspeed-dualpipev, whole norm": ("deepspeed-dualpipev", 1.0),
    "dualpipev-whole": ("dualpipev-whole", 1.0),
    "dualpipev": ("dualpipev", 1.0),
}


def train(name: str, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    schedule, clipping = RUNS[name]
    cfg = {**CONFIG, "schedule": schedule}
    torch.manual_seed(0)
    topology = make_topology(dist.get_world_size(), cfg["stages"])
    data = bench.micro_batches(cfg, steps * cfg["micro_batches"])
    module = bench.build_module(cfg, topology, data)
    if name.endswith("whole norm"):
        ds_pipe_ext.PipelineModule._mark_stage_parameters(module)
    engine, _, _, _ = ds_pipe_ext.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config={**bench.ds_config(cfg, topology.get_dim("data")), "gradient_clipping": clipping},
        schedule="deepspeed" if schedule == bench.DEEPSPEED_DUALPIPEV else schedule,
    )
    expected = "DualPipeVEngine" if schedule == bench.DEEPSPEED_DUALPIPEV else "SchedulePipelineEngine"
    assert type(engine).__name__ == expected, type(engine)
    m = cfg["micro_batches"]
    losses = [engine.train_batch(iter(data[step * m : (step + 1) * m])).item() for step in range(steps)]
    weights = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    return losses, weights


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    for name in RUNS:
        losses, weights = train(name, args.steps)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, weights)
        if dist.get_rank() == 0:
            merged = {}
            for rank_weights in gathered:
                merged.update(rank_weights)
            torch.save({"losses": losses, "weights": merged}, args.out / f"{name}.pt")
            print(f"==== {name}: losses {losses}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
