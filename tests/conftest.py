"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
from launch import free_port


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
