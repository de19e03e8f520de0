"""DeepSpeed's gradient-accumulation regression, for every schedule, on 2 pipeline ranks.

Two ``Linear(1, 1, bias=False)`` layers with weight 1, MSE loss, SGD lr 0.1, micro-batch 1, 2 accumulation
steps, one ``train_batch`` on input 1 and target 0: d(loss)/d(w1) = 2 per micro-batch, averaged over the two,
so the first weight must become 1 - 2 x 0.1 = 0.8. With gradient clipping at norm 1 (DeepSpeed's default), the
gradient norm over BOTH stages is 2 x sqrt(2), so the first weight must become 1 - 0.1 x 2 / (2 x sqrt(2)).
Prints one JSON line per schedule and clipping from stage 0.
"""

import json
import sys

import deepspeed
import torch
from deepspeed import comm as dist

import ds_pipe_ext


def first_weight_after_one_batch(schedule: str, clipping: float) -> float:
    layers = [torch.nn.Linear(1, 1, bias=False) for _ in range(2)]
    for layer in layers:
        torch.nn.init.ones_(layer.weight)
    module = ds_pipe_ext.PipelineModule(
        layers=layers, num_stages=2, loss_fn=torch.nn.MSELoss(), partition_method="uniform"
    )
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "gradient_clipping": clipping,
    }
    engine, _, _, _ = ds_pipe_ext.initialize(
        model=module, model_parameters=module.parameters(), config=config, schedule=schedule
    )
    batch = (torch.ones(1, 1), torch.zeros(1, 1))
    engine.train_batch(iter([batch, batch]))
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
