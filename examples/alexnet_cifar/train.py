"""DeepSpeedExamples' AlexNet/CIFAR-10 pipeline run, with partition method and schedule as flags.

    deepspeed examples/alexnet_cifar/train.py --deepspeed_config ds_config.json -p 2 --steps 200

runs the original (``-p 0``: the non-pipeline data-parallel baseline). It runs unchanged on GPUs (nccl) and
on CPUs (gloo). Everything that can be wrong with the command line (a checkpoint to resume included) is checked
on every rank before the first collective, so a bad launch fails at once with one message instead of hanging.

``--save-dir DIR --save-interval N`` checkpoints every N steps and at the end; the same command with ``--resume``
continues from the latest checkpoint exactly as if it had not stopped, also with another partition, schedule or
number of stages. A rank that dies ends the whole job at once, naming the rank (``ds_pipe_ext.watchdog``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout

import ds_pipe_ext
from ds_pipe_ext.checkpoint import check_checkpoint, load_checkpoint, read_checkpoint, repeating_loader, save_checkpoint
from ds_pipe_ext.config import gradient_accumulation_steps, load_config, resolve_schedule
from ds_pipe_ext.models.vision import MODELS, build_model, check_image_size, join_layers, sample_batch
from ds_pipe_ext.observe.trace import bubble_report, load_trace
from ds_pipe_ext.partition import PartitionContext, get_partition_method
from ds_pipe_ext.planner import auto  # noqa: F401  (registers --partition auto)
from ds_pipe_ext.topology import describe, make_topology
from ds_pipe_ext.watchdog import PeerWatchdog

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import build_trainset, cifar10_present  # noqa: E402  (the example's own module, beside this file)

DEFAULT_DATA_DIR = "/tmp/cifar10-data"


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="CIFAR")
    parser.add_argument("--local_rank", type=int, default=-1, help="local rank passed from distributed launcher")
    parser.add_argument("-s", "--steps", type=int, default=100, help="quit after this many steps")
    parser.add_argument(
        "-p",
        "--pipeline-parallel-size",
        type=int,
        default=2,
        help="pipeline parallelism (0: the non-pipeline data-parallel baseline)",
    )
    parser.add_argument(
        "--backend",
        type=str,
        default=None,
        help="distributed backend (default: the accelerator's, nccl on GPU, gloo on CPU)",
    )
    parser.add_argument("--seed", type=int, default=1138, help="PRNG seed")
    parser.add_argument(
        "--partition",
        default="parameters",
        help="partition method: DeepSpeed's (parameters, uniform, type:REGEX) or a ds_pipe_ext one (auto: the "
        "planner's fastest plan for these stages and micro-batches, with --schedule auto the schedule too)",
    )
    parser.add_argument(
        "--schedule",
        default=None,
        help="pipeline schedule: a registered name (1f1b, gpipe, ...), 'deepspeed' for "
        "DeepSpeed's untouched engine, or 'auto' with --partition auto (default: the config's pipeline.schedule, "
        "else 1f1b)",
    )
    parser.add_argument("--model", choices=MODELS, default="alexnet")
    parser.add_argument("--dataset", choices=("cifar10", "synthetic"), default="cifar10")
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"where CIFAR-10 is (default: {DEFAULT_DATA_DIR}, downloaded there if missing; a given directory "
        "must hold it)",
    )
    parser.add_argument("--image-size", type=int, default=224, help="square input size (original: 224)")
    parser.add_argument("--dropout", type=float, default=0.5, help="classifier dropout (0 makes runs comparable)")
    parser.add_argument("--log-json", default=None, help="rank 0 writes the run's settings and per-step losses here")
    parser.add_argument(
        "--trace",
        default=None,
        metavar="DIR",
        help="time every pipeline instruction; write DIR/trace.json and report the measured bubble",
    )
    parser.add_argument(
        "--save-dir", default=None, help="write DeepSpeed checkpoints here: at the end, and every --save-interval steps"
    )
    parser.add_argument("--save-interval", type=int, default=None, metavar="N", help="also checkpoint every N steps")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue from the latest checkpoint in DIR (default: --save-dir): weights, optimizer state, step, data "
        "position and random state; --steps stays the total of the whole run",
    )
    parser.add_argument(
        "--comm-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="fail a send or receive that waits longer than this (torch.distributed's process-group timeout; "
        f"default: DeepSpeed's, {default_pg_timeout.total_seconds():.0f} s, set in minutes by DEEPSPEED_TIMEOUT)",
    )
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


class RunPlan:
    """Everything derived from the command line, checked before any collective."""

    def __init__(self, args: argparse.Namespace):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_image_size(args.model, args.image_size)
        if args.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {args.steps}")
        self.config = load_config(args)
        self.pipe = args.pipeline_parallel_size
        if self.pipe < 0:
            raise ValueError(f"-p must be 0 (no pipeline) or a number of stages, got {self.pipe}")
        if self.pipe:
            self.topology = make_topology(self.world_size, self.pipe)
            self.data_parallel = self.world_size // self.pipe
            self.schedule = resolve_schedule(args.schedule, self.config)
            if args.trace and self.schedule == "deepspeed":
                raise ValueError(
                    "--trace times instructions in ds_pipe_ext's engine: use --schedule 1f1b (the same "
                    "instructions as DeepSpeed's built-in) instead of --schedule deepspeed"
                )
        else:
            self.topology = None
            self.data_parallel = self.world_size
            self.schedule = None
        self.micro_batches = gradient_accumulation_steps(self.config, self.data_parallel)
        self.micro_batch = self.config.get("train_micro_batch_size_per_gpu") or (
            self.config["train_batch_size"] // (self.micro_batches * self.data_parallel)
        )
        self.train_batch = self.micro_batch * self.micro_batches * self.data_parallel
        with torch.device("meta"):  # shapes without memory, for the checks
            self.meta_model = build_model(args.model, dropout=args.dropout)
        if self.pipe:
            context = PartitionContext(
                layers=join_layers(self.meta_model),
                num_stages=self.pipe,
                sample_input=lambda: sample_batch(args.image_size, self.micro_batch),
                micro_batches=self.micro_batches,
                schedule=self.schedule,
            )
            get_partition_method(args.partition).check(context)
        self.data_dir = self._data_dir(args)
        self.comm_timeout = self._comm_timeout(args)
        self.save_interval = self._save_interval(args)
        self.resume = self._checkpoint_to_resume(args)

    @staticmethod
    def _data_dir(args: argparse.Namespace) -> str:
        if args.dataset == "cifar10" and args.data_dir is not None and not cifar10_present(args.data_dir):
            raise FileNotFoundError(
                f"--data-dir {args.data_dir} does not hold CIFAR-10 (expected {args.data_dir}/cifar-10-batches-py): "
                "extract cifar-10-python.tar.gz there, leave out --data-dir to download it into "
                f"{DEFAULT_DATA_DIR}, or use --dataset synthetic"
            )
        return args.data_dir or DEFAULT_DATA_DIR

    @staticmethod
    def _comm_timeout(args: argparse.Namespace) -> timedelta:
        if args.comm_timeout is None:
            return default_pg_timeout
        if args.comm_timeout <= 0:
            raise ValueError(f"--comm-timeout must be a positive number of seconds, got {args.comm_timeout}")
        return timedelta(seconds=args.comm_timeout)

    @staticmethod
    def _save_interval(args: argparse.Namespace) -> int | None:
        if args.save_interval is None:
            return None
        if args.save_interval < 1:
            raise ValueError(f"--save-interval must be at least 1 step, got {args.save_interval}")
        if not args.save_dir:
            raise ValueError("--save-interval needs --save-dir DIR to write the checkpoints into")
        return args.save_interval

    def _checkpoint_to_resume(self, args: argparse.Namespace):
        if args.resume is None:
            return None
        resume_dir = args.resume or args.save_dir
        if not resume_dir:
            raise ValueError("--resume needs a checkpoint directory: --resume DIR, or --save-dir DIR to resume from")
        checkpoint = read_checkpoint(resume_dir)
        if (checkpoint.stage_boundaries is None) != (self.pipe == 0):
            written = "without a pipeline (-p 0)" if checkpoint.stage_boundaries is None else "by a pipeline run"
            raise ValueError(
                f"checkpoint {checkpoint.path} was written {written}: resume it with "
                f"{'-p 0' if checkpoint.stage_boundaries is None else '-p 1 or more'}"
            )
        check_checkpoint(checkpoint, join_layers(self.meta_model) if self.pipe else self.meta_model)
        if checkpoint.train_batch_size != self.train_batch:
            raise ValueError(
                f"checkpoint {checkpoint.path} was trained with train_batch_size {checkpoint.train_batch_size}, this "
                f"run has {self.train_batch}: resume with the same train_batch_size, so that its steps and data "
                "position carry over"
            )
        return checkpoint


def build_data(args: argparse.Namespace, plan: RunPlan):
    trainset, description = build_trainset(
        args.dataset, plan.data_dir, args.image_size, args.seed, args.local_rank, barrier=dist.barrier
    )
    if dist.get_rank() == 0:
        print(f"dataset: {description}", flush=True)
    return trainset, description


def train_base(args: argparse.Namespace, plan: RunPlan, log: dict):
    """The original non-pipeline loop; its data loader is the pipeline engine's (in order, no shuffle), so
    every layout trains on the same batches."""
    torch.manual_seed(args.seed)
    net = build_model(args.model, dropout=args.dropout)
    trainset, _ = build_data(args, plan)
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=[p for p in net.parameters() if p.requires_grad]
    )
    data_iter = iter(repeating_loader(engine, trainset, plan.resume.step if plan.resume else 0))
    first_step = resume(engine, plan, log)
    criterion = torch.nn.CrossEntropyLoss()
    gas = engine.gradient_accumulation_steps()
    for step in range(first_step, args.steps + 1):
        start = time.perf_counter()
        total = torch.zeros((), device=engine.device)
        for _ in range(gas):
            inputs, labels = next(data_iter)
            loss = criterion(engine(inputs.to(engine.device)), labels.to(engine.device))
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        dist.all_reduce(total)
        record_step(
            log,
            step,
            (total / (gas * dist.get_world_size())).item(),
            time.perf_counter() - start,
            engine.train_batch_size(),
            args.steps,
        )
        checkpoint_if_due(engine, args, plan, step, log)


def train_pipe(args: argparse.Namespace, plan: RunPlan, log: dict):
    torch.manual_seed(args.seed)
    deepspeed.runtime.utils.set_random_seed(args.seed)
    net = build_model(args.model, dropout=args.dropout)
    module = ds_pipe_ext.PipelineModule(
        layers=join_layers(net),
        loss_fn=torch.nn.CrossEntropyLoss(),
        topology=plan.topology,
        partition_method=args.partition,
        activation_checkpoint_interval=0,
        sample_input=lambda: sample_batch(args.image_size, plan.micro_batch),
        micro_batches=plan.micro_batches,
        schedule=plan.schedule,
    )
    log["stage_boundaries"] = list(module.parts)
    log["schedule"] = module.schedule  # with --schedule auto, the planner's choice
    trainset, _ = build_data(args, plan)
    engine, _, _, _ = ds_pipe_ext.initialize(
        args=args,
        model=module,
        model_parameters=[p for p in module.parameters() if p.requires_grad],
        training_data=None if plan.resume else trainset,
        schedule=plan.schedule,
        trace_dir=args.trace,
    )
    if plan.resume and (engine.is_first_stage() or engine.is_last_stage()):
        engine.set_dataloader(repeating_loader(engine, trainset, plan.resume.step))
    first_step = resume(engine, plan, log)
    for step in range(first_step, args.steps + 1):
        start = time.perf_counter()
        loss = engine.train_batch()
        record_step(log, step, loss.item(), time.perf_counter() - start, engine.train_batch_size(), args.steps)
        checkpoint_if_due(engine, args, plan, step, log)
    if args.trace:
        report_trace(engine.save_trace(), log)


def resume(engine, plan: RunPlan, log: dict) -> int:
    """Load the checkpoint to resume, if any, after the data loaders exist; the first step to train."""
    if plan.resume is None:
        return 1
    resumed = load_checkpoint(engine, plan.resume)
    log["resumed_from"] = {
        "checkpoint": str(plan.resume.path),
        "step": plan.resume.step,
        "optimizer": resumed.optimizer,
    }
    if dist.get_rank() == 0:
        print(f"resumed from {resumed.describe()}, data position", flush=True)
    return plan.resume.step + 1


def checkpoint_if_due(engine, args: argparse.Namespace, plan: RunPlan, step: int, log: dict) -> None:
    if args.save_dir and (step == args.steps or (plan.save_interval and step % plan.save_interval == 0)):
        path = save_checkpoint(engine, args.save_dir)
        log["checkpoints"].append(str(path))
        if dist.get_rank() == 0:
            print(f"checkpoint: {path}", flush=True)


def report_trace(path, log: dict) -> None:
    if path is None:  # not global rank 0
        return
    report = bubble_report(load_trace(path))
    print(f"trace: {path} (open in https://ui.perfetto.dev or chrome://tracing)\n{report.format()}", flush=True)
    log["bubble"] = {
        "measured": report.measured,
        "measured_per_stage": report.measured_per_stage,
        "theoretical": report.theoretical,
        "predicted": report.predicted,
    }


def record_step(log: dict, step: int, loss: float, seconds: float, batch: int, total_steps: int) -> None:
    log["steps"].append({"step": step, "loss": loss, "seconds": seconds, "samples_per_s": batch / seconds})
    every = log["print_every"]
    if dist.get_rank() == 0 and (step % every == 0 or step == total_steps):
        recent = log["steps"][-every:]
        rate = sum(s["samples_per_s"] for s in recent) / len(recent)
        left = (total_steps - step) * sum(s["seconds"] for s in recent) / len(recent)
        print(f"step {step:4d}/{total_steps} loss {loss:.4f} samples/s {rate:8.1f} time left {left:6.0f} s", flush=True)


def peak_memory_mb() -> float:
    """This rank's peak memory: device memory on an accelerator, resident set size on CPU."""
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        return accelerator.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> None:
    args = get_args(argv)
    plan = RunPlan(args)  # raises on every rank, before any collective
    deepspeed.init_distributed(dist_backend=args.backend, timeout=plan.comm_timeout)
    args.local_rank = int(os.environ["LOCAL_RANK"])
    get_accelerator().set_device(args.local_rank)
    if dist.get_rank() == 0 and plan.topology is not None:
        print(describe(plan.topology), flush=True)
    log = {
        "model": args.model,
        "dataset": args.dataset,
        "image_size": args.image_size,
        "seed": args.seed,
        "dropout": args.dropout,
        "world_size": plan.world_size,
        "pipeline_parallel_size": plan.pipe,
        "data_parallel_size": plan.data_parallel,
        "partition": args.partition if plan.pipe else None,
        "stage_boundaries": None,
        "schedule": plan.schedule,
        "micro_batches": plan.micro_batches,
        "micro_batch_size": plan.micro_batch,
        "train_batch_size": plan.train_batch,
        "device": get_accelerator().device_name(),
        "deepspeed": deepspeed.__version__,
        "print_every": plan.config.get("steps_per_print") or 10,
        "resumed_from": None,
        "checkpoints": [],
        "steps": [],
    }
    with PeerWatchdog():
        (train_pipe if plan.pipe else train_base)(args, plan, log)
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_memory_mb())
    log["peak_memory_mb_per_rank"] = peaks
    if dist.get_rank() == 0 and args.log_json:
        del log["print_every"]
        with open(args.log_json, "w") as f:
            json.dump(log, f, indent=1)
    # Leaving gloo's process group to the interpreter's shutdown can abort a rank ("terminate called without an
    # active exception") after its work is done; tear it down while everything is still alive.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
