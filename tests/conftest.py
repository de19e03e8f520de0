"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
from launch import free_port


@pytest.fixture(scope="session", autouse=True)
def no_leftover_shm_buffers():
    """Jobs started by the tests leave DeepSpeed's CPU all-reduce buffers in /dev/shm; remove them at the end."""
    import time
    from pathlib import Path

    started = time.time()
    yield
    for path in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"):
        if path.stat().st_mtime >= started:
            path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def single_rank_group():
    """A real one-rank gloo process group, set up as DeepSpeed's launcher would, once per test session.

    DeepSpeed's ``PipelineModule`` needs an initialised process group and ``LOCAL_RANK``; one rank keeps the tests
    in one process.
    """
    import deepspeed
    import torch.distributed as dist

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    env["LOCAL_RANK"] = "0"
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="gloo")
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


ORACLE_STEPS = 5
_ORACLE_COMMON = ["--dataset", "synthetic", "--image-size", "64", "--dropout", "0", "--steps", str(ORACLE_STEPS)]

# name: (ranks, example arguments). Each runs once per session; the 1f1b run is also traced.
ORACLE_RUNS = {
    "data_parallel": (2, ["-p", "0"]),
    "one_stage": (2, ["-p", "1"]),
    "deepspeed": (2, ["-p", "2", "--schedule", "deepspeed"]),
    "1f1b": (2, ["-p", "2", "--schedule", "1f1b", "--partition", "manual:0,12,22", "--trace", "{dir}/1f1b_trace"]),
    "gpipe": (2, ["-p", "2", "--schedule", "gpipe", "--partition", "profile"]),
    "gpipe_pipe2_data2": (4, ["-p", "2", "--schedule", "gpipe", "--partition", "uniform"]),
}


@pytest.fixture(scope="session")
def oracle_runs(tmp_path_factory) -> dict[str, dict]:
    """The example trained once per layout and schedule (fp32, dropout 0, same seed and batches) on CPU ranks."""
    from launch import run_example, write_config

    tmp = tmp_path_factory.mktemp("oracle")
    config = write_config(tmp / "ds_config.json", train_batch=32, micro_batch=4)
    records = {}
    for name, (ranks, args) in ORACLE_RUNS.items():
        checkpoint = tmp / f"{name}_ckpt"
        args = [arg.format(dir=tmp) for arg in args]
        records[name] = run_example(tmp, name, ranks, config, [*_ORACLE_COMMON, *args, "--save-dir", str(checkpoint)])
        records[name]["checkpoint"] = checkpoint
        records[name]["dir"] = tmp
    return records
