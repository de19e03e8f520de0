"""Run scripts under DeepSpeed's own launcher, as users do, on CPU ranks (gloo), and read what the runs leave."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import PIPE
from types import ModuleType

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]


def skip_unless_deepspeed_averages() -> None:
    """Skip a comparison with DeepSpeed's own pipeline engine on a release where it does not average the
    micro-batches' gradients (before 0.19.3: ``ds_pipe_ext.compat.stock_pipeline_gradient_scale``)."""
    import pytest

    from ds_pipe_ext.compat import installed_deepspeed, stock_pipeline_gradient_scale

    if stock_pipeline_gradient_scale(stages=2, accumulation_steps=2) != [0.5, 0.5]:
        pytest.skip(f"DeepSpeed {installed_deepspeed()}'s own pipeline engine scales gradients another way")


def trains_here(schedule: str) -> bool:
    """Whether the installed DeepSpeed can train ``schedule``'s placement: before 0.19.8 it broadcasts the loss from
    the last pipeline rank, so the v placement (zb-v, dualpipev) is refused there (``compat.check_loss_rank``)."""
    from ds_pipe_ext import compat
    from ds_pipe_ext.schedules import get_schedule

    try:
        compat.check_loss_rank(getattr(get_schedule(schedule), "placement", "loop"), schedule)
    except compat.UnsupportedDeepSpeedError:
        return False
    return True


def skip_unless_trains_here(schedule: str) -> None:
    import pytest

    from ds_pipe_ext.compat import installed_deepspeed

    if not trains_here(schedule):
        pytest.skip(f"DeepSpeed {installed_deepspeed()} broadcasts the loss from the last rank: {schedule} is refused")


EXAMPLE = ROOT / "examples" / "alexnet_cifar" / "train.py"
GPT_EXAMPLE = ROOT / "examples" / "gpt" / "train.py"
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
        with subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=PIPE, stderr=PIPE, text=True) as launcher:
            try:
                stdout, stderr = launcher.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_tree(launcher.pid)  # killing the launcher alone would leave its ranks running
                launcher.communicate()
                raise
        return subprocess.CompletedProcess(cmd, launcher.returncode, stdout, stderr)
    finally:
        remove_shm_buffers(port)


def kill_tree(pid: int) -> None:
    """Kill a process and everything it started (a launcher, its ranks and their data-loader workers)."""
    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=30)


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


def import_script(script: Path, name: str) -> ModuleType:
    """An example's script as a module named ``name`` (its ``main`` not run), to check it in this process."""
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(tmp: Path, name: str, ranks: int, config: Path, args: list[str], script: Path = EXAMPLE) -> dict:
    """Run an example (default: AlexNet's) and return its ``--log-json`` record; fail with its output if it fails."""
    log = tmp / f"{name}.json"
    result = launch(script, ["--deepspeed_config", str(config), "--log-json", str(log), *args], ranks)
    if result.returncode != 0 or not log.exists():
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}")
    record = json.loads(log.read_text())
    record["stdout"] = result.stdout
    return record


def losses(record: dict) -> list[float]:
    return [step["loss"] for step in record["steps"]]


def assert_close(actual: list[float], expected: list[float], rtol: float) -> None:
    assert len(actual) == len(expected) >= 5
    torch.testing.assert_close(torch.tensor(actual), torch.tensor(expected), rtol=rtol, atol=0)


def layer_weights(save_dir: Path) -> dict[str, torch.Tensor]:
    """Weights of the latest checkpoint in ``save_dir``, from DeepSpeed's per-layer pipeline files, keyed by
    layer and name."""
    weights = {}
    for path in sorted(latest_checkpoint(save_dir).glob("layer_*-model_states.pt")):
        layer = path.name.split("-")[0]
        for name, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            weights[f"{layer}.{name}"] = tensor
    return weights


def data_parallel_weights(save_dir: Path, layer_key: Callable[[str], str]) -> dict[str, torch.Tensor]:
    """Weights of the latest checkpoint of a non-pipeline run (``-p 0``), keyed as ``layer_weights`` by
    ``layer_key(name)``."""
    path = latest_checkpoint(save_dir) / "mp_rank_00_model_states.pt"
    return {layer_key(name): tensor for name, tensor in torch.load(path, weights_only=False)["module"].items()}


def latest_checkpoint(save_dir: Path) -> Path:
    return save_dir / (save_dir / "latest").read_text().strip()


def assert_weights_close(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], rtol: float) -> None:
    """Per tensor, in norm: float sums differ in their last bits, and Adam turns that into ~1e-5 absolute noise on
    weights whose gradient is ~0, so elementwise checks would fail."""
    assert reference and weights.keys() == reference.keys()
    for key, tensor in weights.items():
        relative = (tensor - reference[key]).norm() / reference[key].norm()
        assert relative <= rtol, f"{key}: {relative:.2e}"
