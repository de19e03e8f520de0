"""The split-backward schedules with bf16, fp16 and ZeRO stage 1, against 1F1B, on 2 pipeline ranks.

Trains ``ds_pipe_ext.models.gpt`` (tied embedding and head, LayerNorm, causal attention) in several DeepSpeed
configurations, each under 1F1B and under the split schedules, from the same weights on the same batches, and
prints one JSON line per run from rank 0: the per-step losses, a digest of every rank's weights after the last
step, the steps DeepSpeed skipped, the loss scale after each step and the optimizer DeepSpeed built.

    deepspeed --num_gpus 2 tests/scripts/mixed_precision_split.py CASE [CASE ...]

The cases are :data:`CASES`, plus ``resume``: zb-h1 with bf16 and ZeRO-1 checkpointed after step 2 and resumed in
a new engine (``ds_pipe_ext.checkpoint``, as the examples resume), against the run that never stopped.

fp16 on CPU: DeepSpeed's CPU accelerator reports fp16 as unsupported where oneDNN has no fp16 kernels (this
machine), and ``deepspeed.initialize`` then refuses fp16; torch's own CPU kernels compute it. The fp16 cases tell
that one accelerator object it is supported (the only change to DeepSpeed, in this script only). DeepSpeed builds
FP16_Optimizer only around its FusedAdam, whose kernel is compiled on first use (minutes); the fp16 case gives it
:class:`FusedAdamOnCPU`, FusedAdam with ``torch.optim.Adam``'s arithmetic, so that FP16_Optimizer's own code runs.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.adam import FusedAdam
from torch.utils.data import Dataset

import ds_pipe_ext
from ds_pipe_ext.checkpoint import load_checkpoint, read_checkpoint, repeating_loader, save_checkpoint
from ds_pipe_ext.models.gpt import GPTConfig, gpt_layers, next_token_loss
from ds_pipe_ext.schedules import register_schedule
from ds_pipe_ext.schedules.virtual import DualPipeVSchedule

GPT = GPTConfig(vocab_size=32, seq_len=16, width=32, heads=4, layers=2)
#: Three micro-batches, not a power of two: dividing by the accumulation steps at another point of the graph than
#: DeepSpeed does would change the last bits. Virtual stages take four (dualpipev needs twice the ranks).
MICRO_BATCH, MICRO_BATCHES, VIRTUAL_MICRO_BATCHES, STEPS, LR = 2, 3, 4, 6, 1e-2
#: Two stages: embedding, positions and a block; a block, the final LayerNorm and the head (the tied embedding).
#: Stage 1's input is an activation, so its backward splits into I and W; stage 0's input is token ids (W runs it).
TWO_STAGES = "manual:0,3,6"
#: Four stages, two chunks per rank: every rank runs an I and a W, rank 1's first chunk as a middle stage.
FOUR_STAGES = "manual:0,2,3,4,6"

BF16, FP16 = {"bf16": {"enabled": True}}, {"fp16": {"enabled": True}}
ZERO1 = {"zero_optimization": {"stage": 1}}
FP32_GRADS = {"data_types": {"grad_accum_dtype": "fp32"}}
NON_REENTRANT = {"pipeline": {"use_reentrant": False}}

#: name: (DeepSpeed config, schedules, options). The first schedule is the reference. ``virtual``: chunks per
#: rank; ``checkpoint``: activation checkpointing every layer; ``fused_adam``: FusedAdamOnCPU as the optimizer.
CASES = {
    "fp32": ({}, ["1f1b", "zb-h1"], {}),
    "bf16": (BF16, ["1f1b", "zb-h1", "1f1b-split"], {}),  # BF16_Optimizer, bf16 gradient accumulation
    "bf16_immediate": ({"bf16": {"enabled": True, "immediate_grad_update": True}}, ["1f1b", "zb-h1"], {}),
    "bf16_zero1": ({**BF16, **ZERO1}, ["1f1b", "zb-h1"], {}),  # ZeRO's optimizer, bf16 accumulation
    "bf16_zero1_fp32_grads": ({**BF16, **ZERO1, **FP32_GRADS}, ["1f1b", "zb-h1"], {}),  # BF16_Optimizer, fp32
    "fp32_zero1": (ZERO1, ["1f1b", "zb-h1"], {}),
    # FP16_Optimizer, dynamic loss scaling
    "fp16": ({"fp16": {"enabled": True, "initial_scale_power": 16}}, ["1f1b", "zb-h1"], {"fused_adam": True}),
    # ZeRO's optimizer scales the loss: from 2^20 the first steps overflow and are skipped, the scale halving
    "fp16_zero1": ({"fp16": {"enabled": True, "initial_scale_power": 20}, **ZERO1}, ["1f1b", "zb-h1"], {}),
    "bf16_checkpointed": ({**BF16, **NON_REENTRANT}, ["1f1b", "zb-h1"], {"checkpoint": True}),
    "bf16_zero1_virtual": (
        {**BF16, **ZERO1},
        ["interleaved-1f1b", "interleaved-zb", "dualpipev-whole", "zb-v", "dualpipev"],
        {"virtual": 2},
    ),
    "fp16_zero1_virtual": (
        {"fp16": {"enabled": True, "initial_scale_power": 20}, **ZERO1},
        ["interleaved-1f1b", "interleaved-zb", "dualpipev-whole", "zb-v", "dualpipev"],
        {"virtual": 2},
    ),
}


@register_schedule("dualpipev-whole")
class WholeDualPipeV(DualPipeVSchedule):
    """DualPipeV with every backward whole (DeepSpeed's own order): the v placement's reference without a split."""

    split_weights = False


class FusedAdamOnCPU(FusedAdam, torch.optim.Adam):
    """DeepSpeed's FusedAdam, for ``isinstance``, with ``torch.optim.Adam``'s arithmetic instead of its kernel."""

    def __init__(self, params, lr: float):
        torch.optim.Adam.__init__(self, params, lr=lr)

    step = torch.optim.Adam.step
    zero_grad = torch.optim.Adam.zero_grad


class Tokens(Dataset):
    """Random token sequences, each a pure function of its index: ``(tokens, next tokens)``."""

    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(GPT.vocab_size, (GPT.seq_len + 1,), generator=torch.Generator().manual_seed(index))
        return tokens[:-1], tokens[1:]


def build(config: dict, schedule: str, options: dict, training_data: Dataset | None) -> tuple:
    virtual = options.get("virtual", 1)
    module = ds_pipe_ext.PipelineModule(
        layers=gpt_layers(GPT),
        num_stages=2,
        loss_fn=next_token_loss,
        partition_method=FOUR_STAGES if virtual > 1 else TWO_STAGES,
        seed_layers=True,
        base_seed=7,
        activation_checkpoint_interval=1 if options.get("checkpoint") else 0,
        virtual_stages=virtual,
        schedule=schedule,
    )
    config = {
        "train_batch_size": MICRO_BATCH * (VIRTUAL_MICRO_BATCHES if virtual > 1 else MICRO_BATCHES),
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "steps_per_print": 1000,
        **config,
    }
    optimizer = None
    if options.get("fused_adam"):
        optimizer = FusedAdamOnCPU(module.parameters(), lr=LR)
    else:
        config["optimizer"] = {"type": "Adam", "params": {"lr": LR, "torch_adam": True}}
    engine, _, _, _ = ds_pipe_ext.initialize(
        model=module,
        optimizer=optimizer,
        model_parameters=list(module.parameters()),
        config=config,
        schedule=schedule,
        training_data=training_data,
    )
    return module, engine


def digest(module: torch.nn.Module) -> str:
    """Every weight this rank holds, bit for bit."""
    sha = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        sha.update(name.encode())
        sha.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:16]


def train(engine, module: ds_pipe_ext.PipelineModule, steps: range) -> dict:
    losses, scales = [], []
    for _ in steps:
        losses.append(engine.train_batch().item())
        scale = getattr(engine.optimizer, "loss_scale", None)
        scales.append(float(scale) if scale is not None else None)
    digests: list = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest(module))
    checkpointed = module.activation_checkpoint_interval > 0
    return {
        "losses": losses,
        "loss_scales": scales,
        "skipped_steps": engine.skipped_steps,
        "digests": digests,
        "optimizer": type(engine.optimizer).__name__,
        "checkpoint_func": module.activation_checkpoint_func.__name__ if checkpointed else None,
        "micro_batches": engine.gradient_accumulation_steps(),
    }


def run_case(name: str) -> list[dict]:
    config, schedules, options = CASES[name]
    records = []
    for schedule in schedules:
        module, engine = build(config, schedule, options, Tokens())
        records.append({"case": name, "schedule": schedule, **train(engine, module, range(STEPS))})
    return records


def run_resume() -> list[dict]:
    """zb-h1, bf16 and ZeRO-1: the whole run, checkpointed after step 2; then a new engine from that checkpoint."""
    config, options = {**BF16, **ZERO1}, {}
    save_dir = tempfile.mkdtemp(prefix="mixed_precision_resume_") if dist.get_rank() == 0 else None
    shared = [save_dir]
    dist.broadcast_object_list(shared, src=0)
    save_dir = shared[0]
    module, engine = build(config, "zb-h1", options, Tokens())
    first = train(engine, module, range(2))
    save_checkpoint(engine, save_dir)
    rest = train(engine, module, range(2, STEPS))
    whole = {**rest, **{key: first[key] + rest[key] for key in ("losses", "loss_scales")}}
    dist.barrier()
    info = read_checkpoint(save_dir)
    module, engine = build(config, "zb-h1", options, None)
    if engine.is_first_stage() or engine.is_last_stage():
        engine.set_dataloader(repeating_loader(engine, Tokens(), info.step))
    load_checkpoint(engine, info)
    resumed = train(engine, module, range(info.step, STEPS))
    return [
        {"case": "resume", "schedule": "zb-h1", "run": "uninterrupted", **whole},
        {"case": "resume", "schedule": "zb-h1", "run": "resumed", "from_step": info.step, **resumed},
    ]


def main() -> None:
    deepspeed.init_distributed()
    get_accelerator().is_fp16_supported = lambda: True  # see the module's docstring
    for name in [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]:
        for record in run_resume() if name == "resume" else run_case(name):
            if dist.get_rank() == 0:
                print("RECORD " + json.dumps(record), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
