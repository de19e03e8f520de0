"""Run scripts under DeepSpeed's own launcher, as users do, on CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "alexnet_cifar" / "train.py"
DEEPSPEED = Path(sys.executable).with_name("deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def remove_shm_buffers(port: int) -> None:
    """Delete the shared-memory all-reduce buffers DeepSpeed's CPU backend leaves in /dev/shm (66 MB per rank and
    job, never unlinked by DeepSpeed 0.19.8) for the job on ``port``."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def launch(
    script: Path, args: list[str], ranks: int, timeout: float = 600, launcher_args: list[str] = ()
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus RANKS [launcher_args] script args`` with one CPU thread per rank; output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    port = free_port()
    cmd = [str(DEEPSPEED), "--num_gpus", str(ranks), "--master_port", str(port), *launcher_args, str(script), *args]
    try:
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    finally:
        remove_shm_buffers(port)


def write_config(path: Path, train_batch: int, micro_batch: int, **extra) -> Path:
    """An fp32 example config with plain Adam (``torch_adam`` avoids the fused-Adam JIT build)."""
    config = {
        "train_batch_size": train_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
        "steps_per_print": 1000,
        **extra,
    }
    path.write_text(json.dumps(config))
    return path


def run_example(tmp: Path, name: str, ranks: int, config: Path, args: list[str]) -> dict:
    """Run the example and return its ``--log-json`` record; fail with its output if it fails."""
    log = tmp / f"{name}.json"
    result = launch(EXAMPLE, ["--deepspeed_config", str(config), "--log-json", str(log), *args], ranks)
    if result.returncode != 0 or not log.exists():
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    record = json.loads(log.read_text())
    record["stdout"] = result.stdout
    return record
