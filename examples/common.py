"""What the examples share: the command line, its checks, the training loops, checkpoints, the log and the trace.

An example describes what it trains as an :class:`Example` (the layer list, the same network without a pipeline,
a sample micro-batch, the loss, the data) and its own flags; everything else is here, so every example has the
same flags and behaves the same way:

- ``-p N`` stages (``-p 0``: DeepSpeed's non-pipeline engine, the baseline), ``--partition``, ``--schedule``,
  ``--virtual-stages`` (chunks per rank, for the virtual-stage schedules);
- everything that can be wrong with the command line (a checkpoint to resume included) is checked on every rank
  before the first collective (:class:`RunPlan`), so a bad launch fails at once with one message instead of
  hanging;
- ``--save-dir DIR --save-interval N`` checkpoints every N steps and at the end; ``--resume`` continues from the
  latest checkpoint exactly as if the run had not stopped, also with another partition, schedule or number of
  stages (``ds_pipe_ext.checkpoint``);
- a rank that dies ends the whole job at once, naming the rank (``ds_pipe_ext.watchdog``);
- ``--trace DIR`` times every instruction and reports the measured bubble; ``--log-json`` writes the run's record.

An example script puts this folder on ``sys.path`` and imports this module, and its own modules as
``<example folder>.<module>`` (two examples' ``data`` modules must not meet as one ``data``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import deepspeed
import torch
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.constants import default_pg_timeout
from torch import nn
from torch.utils.data import Dataset

import ds_pipe_ext
from ds_pipe_ext.checkpoint import (
    CheckpointInfo,
    check_checkpoint,
    load_checkpoint,
    read_checkpoint,
    repeating_loader,
    save_checkpoint,
)
from ds_pipe_ext.config import check_schedule_fits, gradient_accumulation_steps, load_config, resolve_schedule
from ds_pipe_ext.module import virtual_placement
from ds_pipe_ext.observe.trace import bubble_report, load_trace
from ds_pipe_ext.partition import PartitionContext, get_partition_method
from ds_pipe_ext.planner import auto  # noqa: F401  (registers --partition auto)
from ds_pipe_ext.schedules import AUTO_SCHEDULE, Layout, get_schedule
from ds_pipe_ext.topology import describe, make_topology
from ds_pipe_ext.watchdog import PeerWatchdog


@dataclass(frozen=True)
class Example:
    """What an example trains; the builders are called when needed (on the meta device for the checks).

    ``layers`` builds the pipeline layer list (modules or ``LayerSpec``s) and ``model`` the same network as one
    module for ``-p 0``, from the same initial weights, so that every layout trains alike. ``sample_input(micro_batch)``
    is a micro-batch for shape-based partition methods; ``trainset()`` returns the dataset and a one-line description,
    and runs once the process group exists. ``settings`` are the example's own entries of the log, written first;
    ``pipeline_options`` are more ``PipelineModule`` arguments.
    """

    layers: Callable[[], list[Any]]
    model: Callable[[], nn.Module]
    sample_input: Callable[[int], Any]
    loss_fn: Callable[[Any, Any], torch.Tensor]
    trainset: Callable[[], tuple[Dataset, str]]
    settings: dict[str, Any]
    pipeline_options: dict[str, Any] = field(default_factory=dict)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """The flags every example has; an example adds its own (model and data) and parses."""
    parser = argparse.ArgumentParser(description=description)
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
        "DeepSpeed's untouched engine, 'auto' with --partition auto, or csv:PATH, torch.distributed.pipelining "
        "action text (default: the config's pipeline.schedule, else 1f1b)",
    )
    parser.add_argument(
        "--virtual-stages",
        type=int,
        default=None,
        metavar="N",
        help="model chunks per pipeline rank, for the virtual-stage schedules (interleaved-1f1b, interleaved-zb, "
        "zb-v, dualpipev): the model is cut into -p x N stages (default: the schedule's own count, 2; 1 for the "
        "others; a csv:PATH schedule's, as its rows hold them)",
    )
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
    return deepspeed.add_config_arguments(parser)


class RunPlan:
    """Everything derived from the command line, checked before any collective."""

    def __init__(self, args: argparse.Namespace, example: Example):
        self.example = example
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
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
            self.virtual_stages = self._virtual_stages(args)
            if args.trace and self.schedule == "deepspeed":
                raise ValueError(
                    "--trace times instructions in ds_pipe_ext's engine: use --schedule 1f1b (the same "
                    "instructions as DeepSpeed's built-in) instead of --schedule deepspeed"
                )
        else:
            if args.virtual_stages is not None:
                raise ValueError("--virtual-stages cuts a pipeline's stages into chunks: use it with -p 1 or more")
            self.topology = None
            self.data_parallel = self.world_size
            self.schedule = None
            self.virtual_stages = None
        self.micro_batches = gradient_accumulation_steps(self.config, self.data_parallel)
        self.micro_batch = self.config.get("train_micro_batch_size_per_gpu") or (
            self.config["train_batch_size"] // (self.micro_batches * self.data_parallel)
        )
        self.train_batch = self.micro_batch * self.micro_batches * self.data_parallel
        if self.pipe:  # e.g. a csv:PATH schedule written for other sizes, naming both
            check_schedule_fits(self.schedule, self.pipe, self.micro_batches, self.virtual_stages)
        with torch.device("meta"):  # shapes without memory, for the checks: the layer list, or the -p 0 module
            self.meta_network = example.layers() if self.pipe else example.model()
        if self.pipe:
            context = PartitionContext(
                layers=self.meta_network,
                num_stages=self.pipe * self.virtual_stages,
                virtual_stages=self.virtual_stages,
                sample_input=self.sample_input,
                micro_batches=self.micro_batches,
                schedule=self.schedule,
            )
            get_partition_method(args.partition).check(context)
        self.comm_timeout = self._comm_timeout(args)
        self.save_interval = self._save_interval(args)
        self.resume = self._checkpoint_to_resume(args)

    def _virtual_stages(self, args: argparse.Namespace) -> int:
        """Chunks per rank: ``--virtual-stages``, else as many as the schedule runs by default (1 for a schedule
        without virtual stages); checked against the schedule (``ds_pipe_ext.module.virtual_placement``)."""
        schedule = None if self.schedule == AUTO_SCHEDULE else get_schedule(self.schedule)
        chunks = args.virtual_stages if args.virtual_stages is not None else getattr(schedule, "chunks", 1)
        if isinstance(chunks, int) and chunks < 1:
            raise ValueError(f"--virtual-stages must be at least 1 chunk per rank, got {chunks}")
        self.placement = virtual_placement(self.schedule, chunks)
        return chunks

    def sample_input(self) -> Any:
        """A micro-batch of this run's size, for the partition methods that run the layers on its shapes."""
        return self.example.sample_input(self.micro_batch)

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

    def _checkpoint_to_resume(self, args: argparse.Namespace) -> CheckpointInfo | None:
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
        check_checkpoint(checkpoint, self.meta_network)
        if checkpoint.train_batch_size != self.train_batch:
            raise ValueError(
                f"checkpoint {checkpoint.path} was trained with train_batch_size {checkpoint.train_batch_size}, this "
                f"run has {self.train_batch}: resume with the same train_batch_size, so that its steps and data "
                "position carry over"
            )
        return checkpoint


def build_data(plan: RunPlan) -> Dataset:
    trainset, description = plan.example.trainset()
    if dist.get_rank() == 0:
        print(f"dataset: {description}", flush=True)
    return trainset


def train_base(args: argparse.Namespace, plan: RunPlan, log: dict) -> None:
    """The original non-pipeline loop; its data loader is the pipeline engine's (in order, no shuffle), so
    every layout trains on the same batches."""
    torch.manual_seed(args.seed)
    net = plan.example.model()
    trainset = build_data(plan)
    engine, _, _, _ = deepspeed.initialize(
        args=args, model=net, model_parameters=[p for p in net.parameters() if p.requires_grad]
    )
    data_iter = iter(repeating_loader(engine, trainset, plan.resume.step if plan.resume else 0))
    first_step = resume(engine, plan, log)
    gas = engine.gradient_accumulation_steps()
    for step in range(first_step, args.steps + 1):
        start = time.perf_counter()
        total = torch.zeros((), device=engine.device)
        for _ in range(gas):
            inputs, labels = next(data_iter)
            loss = plan.example.loss_fn(engine(inputs.to(engine.device)), labels.to(engine.device))
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


def train_pipe(args: argparse.Namespace, plan: RunPlan, log: dict) -> None:
    torch.manual_seed(args.seed)
    deepspeed.runtime.utils.set_random_seed(args.seed)
    module = ds_pipe_ext.PipelineModule(
        layers=plan.example.layers(),
        loss_fn=plan.example.loss_fn,
        topology=plan.topology,
        partition_method=args.partition,
        activation_checkpoint_interval=0,
        sample_input=plan.sample_input,
        micro_batches=plan.micro_batches,
        schedule=plan.schedule,
        virtual_stages=plan.virtual_stages,
        **plan.example.pipeline_options,
    )
    log["stage_boundaries"] = list(module.parts)
    if plan.virtual_stages > 1 and dist.get_rank() == 0:
        print(describe_virtual_stages(module.layout), flush=True)
    log["schedule"] = module.schedule  # with --schedule auto, the planner's choice
    trainset = build_data(plan)
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
    if has_tied_copies(module):
        report_tied_weights(module, log)
    if args.trace:
        report_trace(engine.save_trace(), log)


def describe_virtual_stages(layout: Layout) -> str:
    """One line: how many chunks each rank holds, how they are placed, and which stages each rank holds."""
    held = "; ".join(
        f"rank {rank}: stages {', '.join(str(layout.stage(rank, chunk)) for chunk in range(layout.chunks))}"
        for rank in range(layout.ranks)
    )
    return f"virtual stages: {layout.chunks} per rank, {layout.stages} stages placed '{layout.placement}' ({held})"


def resume(engine: Any, plan: RunPlan, log: dict) -> int:
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


def checkpoint_if_due(engine: Any, args: argparse.Namespace, plan: RunPlan, step: int, log: dict) -> None:
    if args.save_dir and (step == args.steps or (plan.save_interval and step % plan.save_interval == 0)):
        path = save_checkpoint(engine, args.save_dir)
        log["checkpoints"].append(str(path))
        if dist.get_rank() == 0:
            print(f"checkpoint: {path}", flush=True)


def has_tied_copies(module: ds_pipe_ext.PipelineModule) -> bool:
    """Whether the pipeline keeps copies of tied layers, the same answer on every rank (``module.tied_comms`` is
    empty on a rank holding none of them, as with the v placement's rank 1 when rank 0 holds both ends)."""
    tied = any(isinstance(spec, deepspeed.pipe.TiedLayerSpec) for spec in module._layer_specs)
    return tied and module._topo.get_dim("pipe") > 1


def report_tied_weights(module: ds_pipe_ext.PipelineModule, log: dict) -> None:
    """Whether the copies of each tied weight (one per stage that uses it, per replica) ended bit for bit equal, as
    DeepSpeed's all-reduce of their gradients should keep them. A collective: every rank calls it."""
    digests = {
        key: [_digest(module.tied_modules[key].get_parameter(attr)) for attr in tied["weight_attr"]]
        for key, tied in module.tied_comms.items()
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (module.stage_id, digests))
    tied_weights = {}
    for key in sorted({key for _, rank_digests in gathered for key in rank_digests}):
        copies = [(stage, rank_digests[key]) for stage, rank_digests in gathered if key in rank_digests]
        equal = all(digest == copies[0][1] for _, digest in copies)
        tied_weights[key] = {"stages": sorted({stage for stage, _ in copies}), "equal": equal}
        if dist.get_rank() == 0:
            verdict = "equal" if equal else "DIFFERENT"
            print(f"tied weights {key!r}: the copies on stages {tied_weights[key]['stages']} are {verdict}", flush=True)
    log["tied_weights"] = tied_weights


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def report_trace(path: str | os.PathLike | None, log: dict) -> None:
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


def run(args: argparse.Namespace, plan: RunPlan) -> None:
    """Join the process group, train as planned, write the log, and leave."""
    deepspeed.init_distributed(dist_backend=args.backend, timeout=plan.comm_timeout)
    log = start_log(args, plan)
    with PeerWatchdog():
        (train_pipe if plan.pipe else train_base)(args, plan, log)
    finish_log(args, log)
    # Leaving gloo's process group to the interpreter's shutdown can abort a rank ("terminate called without an
    # active exception") after its work is done; tear it down while everything is still alive.
    dist.barrier()
    dist.destroy_process_group()


def start_log(args: argparse.Namespace, plan: RunPlan) -> dict:
    """In the process group: take this rank's device, print the topology, and start the run's log."""
    args.local_rank = int(os.environ["LOCAL_RANK"])
    get_accelerator().set_device(args.local_rank)
    if dist.get_rank() == 0 and plan.topology is not None:
        print(describe(plan.topology), flush=True)
    return {
        **plan.example.settings,
        "world_size": plan.world_size,
        "pipeline_parallel_size": plan.pipe,
        "data_parallel_size": plan.data_parallel,
        "partition": args.partition if plan.pipe else None,
        "stage_boundaries": None,
        "schedule": plan.schedule,
        "virtual_stages": plan.virtual_stages,
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


def finish_log(args: argparse.Namespace, log: dict) -> None:
    """Add every rank's peak memory (a collective) and write the log to ``--log-json`` on rank 0."""
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak_memory_mb())
    log["peak_memory_mb_per_rank"] = peaks
    if dist.get_rank() == 0 and args.log_json:
        del log["print_every"]
        with open(args.log_json, "w") as f:
            json.dump(log, f, indent=1)
