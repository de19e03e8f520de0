"""Benchmark driver, run on every rank by DeepSpeed's launcher: trains one configuration after another.

    deepspeed --num_gpus 2 bench/pipeline_bench.py --configs configs.json --out results.json

Each configuration (a JSON object) names the model (any of ``ds_pipe_ext.models.examples``), its size
(``image_size``), micro-batch, micro-batches per step, pipeline stages (0 = plain data parallel), chunks per
rank (``virtual_stages``), partition method, schedule (``deepspeed-dualpipev``: DeepSpeed's own DualPipeV) and
whether to trace. Running them in one job, in the order given (the benchmark scripts
interleave repeats), gives every row the same machine conditions. The data is a fixed set of in-memory
micro-batches, so the numbers measure the pipeline, not the data loader. Per row: seconds per step (median of
the timed steps), samples/s, stage boundaries, the partition report's predicted step time, when traced the
measured bubble, and per rank: its stage, peak resident memory, and the memory the planner's model counts,
measured exactly: the stage's parameters, gradients and optimizer state (the engine's tensors) plus the peak
bytes of activations saved for backward (:class:`~ds_pipe_ext.observe.memory.ActivationMemoryMeter`).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import tempfile
import time

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

import ds_pipe_ext
from ds_pipe_ext.models.examples import example_model
from ds_pipe_ext.models.vision import build_model
from ds_pipe_ext.observe.memory import ActivationMemoryMeter
from ds_pipe_ext.observe.trace import bubble_report, load_trace
from ds_pipe_ext.topology import make_topology, stage_of

#: The schedule name under which a configuration runs DeepSpeed's own DualPipeVModule and DualPipeVEngine.
DEEPSPEED_DUALPIPEV = "deepspeed-dualpipev"


def reset_peak_rss() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def release(engine) -> None:
    """Free a finished configuration's weights, gradients and optimizer state.

    Something in DeepSpeed keeps finished engines reachable, so without this every configuration of the job would
    add its stage's parameters and Adam state to the resident memory of the next. On the last stage the engine stayed
    reachable even so, through autograd hooks bound to it (``_backward_prologue_per_tensor``) that ``gc`` does not
    see through; dropping its loss and pipeline buffers lets that engine, its process groups and their threads go
    (:func:`destroy_row_groups`).
    """
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    optimizer.state.clear()
    for name in ("loss", "total_loss", "agg_train_loss", "agg_loss", "fwd_outputs", "pipe_buffers"):
        if hasattr(engine, name):
            setattr(engine, name, None)
    for parameter in engine.module.parameters():
        parameter.grad = None
        parameter.data = torch.empty(0)


def destroy_row_groups() -> None:
    """Destroy every process group but the default one: those a finished configuration's engine made (DeepSpeed's
    grid, the channels). Each engine makes its own, and a gloo group keeps its threads until destroyed: kept, 2 ranks
    gained about 21 threads a row, 1,100 by the end of a 50-row job; destroyed (with :func:`release`), a 6-row job
    stayed at 17 and 16 threads."""
    from torch.distributed import distributed_c10d as c10d

    for group in list(c10d._world.pg_map):
        if group is not c10d.GroupMember.WORLD:
            c10d.destroy_process_group(group)


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def micro_batches(cfg: dict, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    example = example_model(cfg["model"])
    return [example.make_batch(cfg["micro_batch"], cfg["image_size"], gen) for _ in range(count)]


def state_bytes(engine) -> dict[str, int]:
    """The bytes of this rank's parameters, their gradients (one per trainable parameter: DeepSpeed's fp32 engine
    keeps them through the batch) and the optimizer's state tensors: what the memory model counts besides
    activations."""
    parameters = list(engine.module.parameters())
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    state = [t for entry in optimizer.state.values() for t in entry.values() if torch.is_tensor(t)]
    return {
        "parameters": sum(p.numel() * p.element_size() for p in parameters),
        "gradients": sum(p.numel() * p.element_size() for p in parameters if p.requires_grad),
        "optimizer_state": sum(t.numel() * t.element_size() for t in state),
    }


def ds_config(cfg: dict, data_parallel: int) -> dict:
    return {
        "train_batch_size": cfg["micro_batch"] * cfg["micro_batches"] * data_parallel,
        "train_micro_batch_size_per_gpu": cfg["micro_batch"],
        "optimizer": {"type": "Adam", "params": {"lr": 1e-4, "torch_adam": True}},
        "steps_per_print": 10**9,
    }


def build_module(cfg: dict, topology, data: list) -> torch.nn.Module:
    """The configuration's pipeline module: ds_pipe_ext's (``virtual_stages`` chunks per rank), or, for schedule
    ``deepspeed-dualpipev``, DeepSpeed's own ``DualPipeVModule``, which runs DeepSpeed's ``DualPipeVEngine``."""
    example = example_model(cfg["model"])
    common = dict(
        layers=example.build_layers(cfg["image_size"]),
        loss_fn=example.loss_fn(),
        topology=topology,
        partition_method=cfg["partition"],
    )
    if cfg["schedule"] == DEEPSPEED_DUALPIPEV:
        from deepspeed.runtime.pipe.dualpipev import DualPipeVModule

        return DualPipeVModule(**common)
    return ds_pipe_ext.PipelineModule(
        **common,
        sample_input=lambda: data[0][0],
        micro_batches=cfg["micro_batches"],
        schedule=cfg["schedule"],
        virtual_stages=cfg.get("virtual_stages", 1),
    )


def run_pipeline(cfg: dict, world: int) -> dict:
    torch.manual_seed(0)
    topology = make_topology(world, cfg["stages"])
    data = micro_batches(cfg, cfg["micro_batches"])
    module = build_module(cfg, topology, data)

    trace_dir = tempfile.mkdtemp(prefix="bench_trace_") if cfg.get("trace") else None
    if trace_dir is not None:
        trace_dir = [trace_dir]
        dist.broadcast_object_list(trace_dir, src=0)
        trace_dir = trace_dir[0]
    engine, _, _, _ = ds_pipe_ext.initialize(
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        config=ds_config(cfg, topology.get_dim("data")),
        schedule="deepspeed" if cfg["schedule"] == DEEPSPEED_DUALPIPEV else cfg["schedule"],
        trace_dir=trace_dir,
    )
    meter = ActivationMemoryMeter(module.parameters())

    def step() -> None:
        with meter:
            engine.train_batch(iter(data))

    result = time_steps(cfg, step)
    report = getattr(module, "partition_report", None)  # DeepSpeed's own modules have none
    result.update(
        boundaries=[int(bound) for bound in module.parts],
        predicted_step=report and report.step_time,
        predicted_unit=report and report.cost_unit,
        predicted_stage_costs=report and [stage.cost for stage in report.stages],
        peak_activation_mb=meter.peak_bytes / 2**20,
        stage=stage_of(topology, dist.get_rank()),
        state_bytes=state_bytes(engine),
    )
    if trace_dir is not None:
        path = engine.save_trace()
        if path is not None:
            report = bubble_report(load_trace(path))
            result["bubble"] = {
                "measured": report.measured,
                "measured_pipelined": report.measured_pipelined,
                "measured_per_stage": report.measured_per_stage,
                "theoretical": report.theoretical,
                "predicted": report.predicted,
            }
            result["stage_costs"] = {"forward": report.forward_cost, "backward": report.backward_cost}
    release(engine)

    return result


def run_data_parallel(cfg: dict, world: int) -> dict:
    torch.manual_seed(0)
    net = build_model(cfg["model"], dropout=0.0)
    engine, _, _, _ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=ds_config(cfg, world))
    data = micro_batches(cfg, cfg["micro_batches"])
    criterion = torch.nn.CrossEntropyLoss()
    meter = ActivationMemoryMeter(net.parameters())

    def step() -> None:
        with meter:
            for inputs, labels in data:
                engine.backward(criterion(engine(inputs.to(engine.device)), labels.to(engine.device)))
                engine.step()

    result = time_steps(cfg, step)
    result.update(
        boundaries=None,
        predicted_step=None,
        peak_activation_mb=meter.peak_bytes / 2**20,
        stage=0,
        state_bytes=state_bytes(engine),
    )
    release(engine)

    return result


def time_steps(cfg: dict, step) -> dict:
    for _ in range(cfg.get("warmup", 1)):
        step()
    reset_peak_rss()
    seconds = []
    for _ in range(cfg.get("steps", 3)):
        dist.barrier()
        start = time.perf_counter()
        step()
        get_accelerator().synchronize()
        seconds.append(time.perf_counter() - start)
    per_step = statistics.median(seconds)
    samples = cfg["micro_batch"] * cfg["micro_batches"] * (dist.get_world_size() // max(1, cfg["stages"]))
    return {
        "seconds": seconds,
        "seconds_per_step": per_step,
        "samples_per_s": samples / per_step,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    deepspeed.init_distributed()
    world = dist.get_world_size()
    with open(args.configs) as f:
        configs = json.load(f)
    rows = []
    for index, cfg in enumerate(configs):
        result = (run_pipeline if cfg["stages"] else run_data_parallel)(cfg, world)
        per_rank = [None] * world
        mine = {k: result.pop(k) for k in ("peak_activation_mb", "peak_rss_mb", "stage", "state_bytes")}
        mine["seconds"] = result["seconds"]
        mine["model_memory_mb"] = (sum(mine["state_bytes"].values()) / 2**20) + mine["peak_activation_mb"]
        dist.all_gather_object(per_rank, mine)
        dist.barrier()
        destroy_row_groups()
        gc.collect()
        if dist.get_rank() == 0:
            rows.append({**cfg, **result, "per_rank": per_rank})
            print(
                f"[{index + 1}/{len(configs)}] {cfg}: {result['seconds_per_step']:.3f} s/step, "
                f"{result['samples_per_s']:.1f} samples/s",
                flush=True,
            )
            with open(args.out, "w") as f:
                json.dump({"device": get_accelerator().device_name(), "world_size": world, "rows": rows}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
