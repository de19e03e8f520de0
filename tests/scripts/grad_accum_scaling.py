"""DeepSpeed's gradient-accumulation regression, for every schedule, on 2 pipeline ranks.

Two ``Linear(1, 1, bias=False)`` layers per chunk (four for a virtual-stage schedule's two chunks per rank) with
weight 1, MSE loss, SGD lr 0.1, micro-batch 1, 2 accumulation steps per chunk, one ``train_batch`` on input 1 and
target 0: d(loss)/d(w) = 2 per micro-batch for every weight, averaged over the micro-batches, so the first weight
must become 1 - 2 x 0.1 = 0.8. With gradient clipping at norm 1 (DeepSpeed's default), the gradient norm over ALL
stages is 2 x sqrt(layers), so the first weight must become 1 - 0.1 x 2 / (2 x sqrt(layers)).
Prints one JSON line per schedule and clipping from stage 0.
"""

import json
import sys

import deepspeed
import torch
from deepspeed import comm as dist

import ds_pipe_ext
from ds_pipe_ext.schedules import get_schedule


def first_weight_after_one_batch(schedule: str, clipping: float) -> float:
    chunks = getattr(get_schedule(schedule), "chunks", 1)
    layers = [torch.nn.Linear(1, 1, bias=False) for _ in range(2 * chunks)]
    for layer in layers:
        torch.nn.init.ones_(layer.weight)
    virtual = {"virtual_stages": chunks, "schedule": schedule} if chunks > 1 else {}
    module = ds_pipe_ext.PipelineModule(
        layers=layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform", **virtual
    )
    config = {
        "train_batch_size": 2 * chunks,
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "gradient_clipping": clipping,
    }
    engine, _, _, _ = ds_pipe_ext.initialize(
        model=module, model_parameters=module.parameters(), config=config, schedule=schedule
    )
    batch = (torch.ones(1, 1), torch.zeros(1, 1))
    engine.train_batch(iter([batch] * 2 * chunks))
    return layers[0].weight.item() if engine.stage_id == 0 else None


def main() -> None:
    deepspeed.init_distributed()
    for schedule in [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]:
        for clipping in (0.0, 1.0):
            weight = first_weight_after_one_batch(schedule, clipping)
            if dist.get_rank() == 0:
                print(json.dumps({"schedule": schedule, "clipping": clipping, "first_weight": weight}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
