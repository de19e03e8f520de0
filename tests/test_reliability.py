"""Reliability: exact resume (also onto another stage layout), bad input refused up front, dead ranks end the job.

The fast tests run DeepSpeed in this process on one rank (``single_rank_group``); the slow ones run the example
under DeepSpeed's launcher on CPU ranks, as ``test_training`` does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from launch import (
    DEEPSPEED,
    EXAMPLE,
    GPT_EXAMPLE,
    ROOT,
    free_port,
    import_script,
    kill_tree,
    launch,
    losses,
    run_example,
    write_config,
)
from torch import nn

import ds_pipe_ext
from ds_pipe_ext import watchdog
from ds_pipe_ext.checkpoint import (
    check_checkpoint,
    layers_per_rank,
    load_checkpoint,
    read_checkpoint,
    repeating_loader,
    save_checkpoint,
)
from ds_pipe_ext.schedules import Layout
from ds_pipe_ext.watchdog import EXIT_PEER_DIED, Peer, PeerWatchdog

# ---- a one-rank pipeline in this process -----------------------------------------------------------------------

CONFIG = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-2, "torch_adam": True}},
    "steps_per_print": 1000,
}


def tiny_layers(hidden: int = 8) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(6, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, 3)]


class TinyData(torch.utils.data.Dataset):
    """``size`` samples, sample ``i`` labelled ``i % 3``."""

    def __init__(self, size: int = 10):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return torch.randn(6, generator=torch.Generator().manual_seed(index)), index % 3


def tiny_engine(training_data=None, schedule=None, virtual_stages=1):
    module = ds_pipe_ext.PipelineModule(
        layers=tiny_layers(),
        num_stages=1,
        loss_fn=nn.CrossEntropyLoss(),
        partition_method="uniform",
        schedule=schedule,
        virtual_stages=virtual_stages,
    )
    engine, _, _, _ = ds_pipe_ext.initialize(
        model=module, model_parameters=module.parameters(), config=CONFIG, training_data=training_data
    )
    return engine


@pytest.fixture(scope="module")
def tiny_run(single_rank_group, tmp_path_factory) -> tuple[Path, list[float]]:
    """Seven steps with DeepSpeed's own loader and dropout, checkpointed after step 2; the losses of steps 3-7.

    Ten samples make five micro-batches of 2 an epoch: steps 3-7 read micro-batches 5-14, across an epoch.
    (One engine with DeepSpeed's loader for the whole module: freeing one takes 10 s, its loader's workers wait
    out torch's shutdown timeout.)
    """
    directory = tmp_path_factory.mktemp("tiny_checkpoint")
    engine = tiny_engine(TinyData())
    for _ in range(2):
        engine.train_batch()
    save_checkpoint(engine, directory)
    return directory, [engine.train_batch().item() for _ in range(5)]


@pytest.fixture
def tiny_checkpoint(tiny_run) -> Path:
    return tiny_run[0]


def test_a_resumed_run_continues_exactly_across_an_epoch(tiny_run):
    directory, uninterrupted = tiny_run
    resumed = tiny_engine()
    checkpoint = read_checkpoint(directory)
    resumed.set_dataloader(repeating_loader(resumed, TinyData(), checkpoint.step))
    point = load_checkpoint(resumed, checkpoint)
    assert (point.optimizer, point.random_state, resumed.global_steps) == ("restored", True, 2)
    # Bit for bit, dropout masks included.
    assert [resumed.train_batch().item() for _ in range(5)] == uninterrupted


def test_the_layers_per_rank_tell_virtual_placements_apart():
    """The same boundaries put other layers on a rank with the loop placement, the v placement and no chunks."""
    boundaries = [0, 2, 4, 6, 8]
    assert layers_per_rank(boundaries, Layout(2, 2, "loop")) == [[[0, 2], [4, 6]], [[2, 4], [6, 8]]]
    assert layers_per_rank(boundaries, Layout(2, 2, "v")) == [[[0, 2], [6, 8]], [[2, 4], [4, 6]]]
    assert layers_per_rank(boundaries, Layout(4)) == [[[0, 2]], [[2, 4]], [[4, 6]], [[6, 8]]]
    with pytest.raises(ValueError, match=r"places 4 stages, not the 2 of \[0, 4, 8\]"):
        layers_per_rank([0, 4, 8], Layout(2, 2))


def test_a_checkpoint_whose_ranks_held_other_layers_is_re_keyed_even_with_the_same_boundaries(
    single_rank_group, tmp_path
):
    """With virtual stages the boundaries do not say which layers a rank's optimizer file is for (the loop and
    the v placement cut alike put other stages on a rank): ``load_checkpoint`` compares the layers of each rank.
    Here one rank holds two chunks; the same checkpoint, told that the rank held them in the other order, is
    re-keyed by parameter name instead of loaded by position, and both resume exactly."""

    def engine_at(step: int):
        engine = tiny_engine(schedule="interleaved-1f1b", virtual_stages=2)
        engine.set_dataloader(repeating_loader(engine, TinyData(), step))
        return engine

    engine = engine_at(0)
    for _ in range(2):
        engine.train_batch()
    save_checkpoint(engine, tmp_path)
    uninterrupted = [engine.train_batch().item() for _ in range(3)]
    saved = read_checkpoint(tmp_path)
    assert (saved.stage_boundaries, saved.rank_layers) == ([0, 2, 4], [[[0, 2], [2, 4]]])
    swapped = replace(saved, rank_layers=[[[2, 4], [0, 2]]])
    rekeyed = "re-keyed by parameter name for the new stage layout"
    for checkpoint, optimizer in [(saved, "restored"), (swapped, rekeyed)]:
        resumed = engine_at(checkpoint.step)
        assert load_checkpoint(resumed, checkpoint).optimizer == optimizer
        assert [resumed.train_batch().item() for _ in range(3)] == uninterrupted


@pytest.mark.parametrize("steps", [0, 2, 3, 7])
def test_the_resumed_loader_skips_exactly_the_micro_batches_read(single_rank_group, steps):
    # Eleven samples: each epoch ends with a micro-batch of one, which a resumed loader must reproduce too.
    engine, data = tiny_engine(), TinyData(size=11)
    epoch = [list(range(11))[start : start + 2] for start in range(0, 11, 2)]
    expected = [indices for _ in range(4) for indices in epoch][steps * engine.gradient_accumulation_steps() :]
    loader = repeating_loader(engine, data, steps)
    for indices in expected[:12]:
        x, y = next(loader)
        assert torch.equal(x, torch.stack([data[i][0] for i in indices])) and y.tolist() == [i % 3 for i in indices]


@pytest.fixture
def broken_copy(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint to damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))


def test_a_sound_checkpoint_passes(tiny_checkpoint):
    checkpoint = read_checkpoint(tiny_checkpoint)
    check_checkpoint(checkpoint, tiny_layers())
    assert (checkpoint.tag, checkpoint.step, checkpoint.stage_boundaries) == ("global_step2", 2, [0, 4])


def test_a_missing_layer_file_is_named(broken_copy):
    (broken_copy / "global_step2" / "layer_03-model_states.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"no file layer_03-model_states.pt for layer 3 \(Linear\)"):
        check_checkpoint(read_checkpoint(broken_copy), tiny_layers())


def test_a_truncated_layer_file_is_named(broken_copy):
    layer = broken_copy / "global_step2" / "layer_00-model_states.pt"
    layer.write_bytes(layer.read_bytes()[: layer.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(f"checkpoint file {layer} is truncated")):
        check_checkpoint(read_checkpoint(broken_copy), tiny_layers())


def test_a_truncated_or_missing_stage_file_is_named(broken_copy):
    stage = broken_copy / "global_step2" / "mp_rank_00_model_states.pt"
    stage.write_bytes(stage.read_bytes()[:100])
    with pytest.raises(ValueError, match=re.escape(f"checkpoint file {stage} is truncated")):
        read_checkpoint(broken_copy)
    stage.unlink()
    with pytest.raises(FileNotFoundError, match="mp_rank_00_model_states.pt is missing"):
        read_checkpoint(broken_copy)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            lambda: tiny_layers(hidden=9),
            r"layer_00-model_states.pt is from a different model: layer 0 \(Linear\) has weight of shape \(9, 6\), "
            r"the file has \(8, 6\)",
        ),
        (lambda: tiny_layers()[:3], "from a different model: it has layer_03-model_states.pt, this model has 3 layers"),
        (lambda: nn.Sequential(*tiny_layers()), "written by a pipeline engine but is being loaded into a non-pipeline"),
    ],
)
def test_a_checkpoint_of_another_model_is_refused(tiny_checkpoint, model, message):
    with pytest.raises(ValueError, match=message):
        check_checkpoint(read_checkpoint(tiny_checkpoint), model())


def test_a_directory_without_a_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(f"no checkpoint to resume from in {tmp_path}")):
        read_checkpoint(tmp_path)


def test_a_plain_deepspeed_checkpoint_is_told_apart(single_rank_group, tmp_path):
    tiny_engine().save_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="saved by engine.save_checkpoint, not ds_pipe_ext"):
        read_checkpoint(tmp_path)


# ---- the example's command-line checks, in this process --------------------------------------------------------


@pytest.fixture(scope="module")
def example():
    return import_script(EXAMPLE, "alexnet_cifar_train")


def run_plan(example, monkeypatch, tmp_path, world_size: int, args: list[str], train_batch: int = 32):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    config = write_config(tmp_path / "ds_config.json", train_batch=train_batch, micro_batch=4)
    args = example.get_args(["--deepspeed_config", str(config), "--image-size", "64", *args])
    return example.RunPlan(args, example.build_example(args))


# (world size, arguments, train batch, what the error says: the problem and its fix)
BAD_COMMAND_LINES = {
    "unknown partition": (
        2,
        ["--partition", "sizes"],
        32,
        "unknown partition method 'sizes'; registered: uniform, parameters",
    ),
    "unknown schedule": (2, ["--schedule", "zigzag"], 32, "unknown schedule 'zigzag'; registered: .*1f1b"),
    "auto schedule, fixed partition": (
        2,
        ["--schedule", "auto", "--partition", "uniform"],
        32,
        "schedule 'auto' is chosen together with the partition, which 'uniform' does not do: use "
        "partition_method='auto'",
    ),
    "manual, too few cuts": (2, ["--partition", "manual:0,22"], 32, "gives 1 stage.* give 3 boundaries from 0 to 22"),
    "manual, empty stage": (3, ["-p", "3", "--partition", "manual:0,9,9,22"], 32, "9 is followed by 9"),
    "manual, past the end": (2, ["--partition", "manual:0,9,30"], 32, "must end at 22"),
    "more stages than layers": (24, ["-p", "24"], 96, "cannot cut 22 layers into 24 .* use at most 22 stages"),
    "batch not divisible": (2, ["-p", "1"], 30, "make train_batch_size a multiple of 8"),
    "-p does not divide": (2, ["-p", "3"], 32, "pipeline size 3 does not divide .* valid pipeline sizes .*: 1, 2"),
    "image too small": (2, ["--image-size", "32"], 32, "too small for alexnet.*use --image-size 63 or more"),
    "no CIFAR-10": (2, ["--dataset", "cifar10", "--data-dir", "/nonexistent"], 32, "does not hold CIFAR-10.*--dataset"),
    "interval, no dir": (2, ["--save-interval", "2"], 32, "--save-interval needs --save-dir DIR"),
    "resume, no dir": (2, ["--resume"], 32, "--resume needs a checkpoint directory: --resume DIR"),
    "zero timeout": (2, ["--comm-timeout", "0"], 32, "--comm-timeout must be a positive number of seconds"),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_bad_command_lines_fail_before_any_process_group(example, monkeypatch, tmp_path, case):
    world_size, args, train_batch, message = BAD_COMMAND_LINES[case]
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        run_plan(example, monkeypatch, tmp_path, world_size, ["--dataset", "synthetic", *args], train_batch)


def test_resume_from_an_empty_directory_says_there_is_nothing(example, monkeypatch, tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run_plan(example, monkeypatch, tmp_path, 2, ["--dataset", "synthetic", "--resume", str(tmp_path)])


# ---- the dead-rank watchdog ------------------------------------------------------------------------------------


@pytest.fixture
def sleeper():
    """A process standing in for another rank on this node."""
    process = subprocess.Popen(["sleep", "60"])
    peer = Peer(rank=1, host=socket.gethostname(), pid=process.pid, started=psutil.Process(process.pid).create_time())
    yield process, peer
    process.kill()
    process.wait()


def die(process: subprocess.Popen) -> None:
    """Kill ``process`` and leave it unreaped, as a rank is until DeepSpeed's launcher polls it."""
    process.kill()
    while psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)


def test_a_peer_is_dead_once_its_process_ends_even_before_it_is_reaped(sleeper):
    process, peer = sleeper
    assert peer.is_alive()
    assert not replace(peer, started=peer.started - 1).is_alive()  # the same pid, but another process
    die(process)
    assert not peer.is_alive()


@pytest.fixture
def exits(monkeypatch) -> list[int]:
    """``os._exit`` in the watchdog records its status and raises SystemExit instead of ending pytest."""
    codes = []

    def record(code: int) -> None:
        codes.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(watchdog.os, "_exit", record)
    return codes


def watching(poll_seconds: float, peer: Peer) -> PeerWatchdog:
    dog = PeerWatchdog(poll_seconds=poll_seconds).__enter__()
    dog.peers = [peer]  # one rank in this process: pretend the sleeper is another rank of this node
    return dog


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the SystemExit of exits
def test_the_watchdog_thread_reports_a_dead_rank(single_rank_group, sleeper, exits, capsys):
    process, peer = sleeper
    dog = watching(0.02, peer)
    die(process)
    deadline = time.monotonic() + 5
    while not exits and time.monotonic() < deadline:
        time.sleep(0.01)
    dog.__exit__(None, None, None)
    assert exits == [EXIT_PEER_DIED]
    assert f"rank 1 (pid {process.pid}) on {peer.host} died; rank 0 stops too" in capsys.readouterr().err


def test_sigterm_from_the_launcher_reports_the_dead_rank(single_rank_group, sleeper, exits, capsys):
    process, peer = sleeper
    dog = watching(60, peer)  # the thread would not look in time: the handler must
    die(process)
    with pytest.raises(SystemExit):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)  # the handler runs in this thread, between two bytecodes
    dog.__exit__(None, None, None)
    assert exits == [EXIT_PEER_DIED]
    assert f"rank 1 (pid {process.pid})" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_failed_receive_from_a_dead_rank_names_it(single_rank_group, sleeper, exits, capsys):
    process, peer = sleeper
    dog = watching(60, peer)
    die(process)
    with pytest.raises(SystemExit):
        dog.__exit__(RuntimeError, RuntimeError("Connection closed by peer [127.0.0.1]:29500"), None)
    assert "rank 1" in (err := capsys.readouterr().err) and "got RuntimeError: Connection closed by peer" in err


def test_a_clean_exit_with_live_peers_reports_nothing(single_rank_group, sleeper, exits, capsys):
    _, peer = sleeper
    dog = watching(0.02, peer)
    time.sleep(0.1)
    dog.__exit__(None, None, None)
    assert exits == [] and capsys.readouterr().err == ""


# ---- the example under DeepSpeed's launcher (slow) -------------------------------------------------------------

# Dropout stays on: an exact resume must restore the dropout masks too. The `parameters` partition puts both dropout
# layers on stage 0 (layers 0-18 of 22), and every resumed layout below keeps them on rank 0, whose random state the
# checkpoint restores.
COMMON = ["--dataset", "synthetic", "--image-size", "64", "--dropout", "0.5", "--steps", "4", "--seed", "7"]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """Four steps checkpointed every two, then left on disk as if the job had died in step 3 or 4. The run's own
    losses are those of the run that never stopped."""
    tmp = tmp_path_factory.mktemp("resume")
    config = write_config(tmp / "ds_config.json", train_batch=32, micro_batch=4)
    checkpoints = tmp / "checkpoints"
    args = [*COMMON, "-p", "2", "--save-dir", str(checkpoints), "--save-interval", "2"]
    uninterrupted = run_example(tmp, "uninterrupted", 2, config, args)
    assert uninterrupted["stage_boundaries"] == [0, 19, 22]
    assert uninterrupted["checkpoints"] == [str(checkpoints / "global_step2"), str(checkpoints / "global_step4")]
    shutil.rmtree(checkpoints / "global_step4")
    (checkpoints / "latest").write_text("global_step2")
    yield tmp, config, uninterrupted, checkpoints
    shutil.rmtree(checkpoints)  # 0.6 GB


# name: (ranks, example arguments, how the optimizer state gets in)
RESUMED = {
    "same layout": (2, ["-p", "2"], "restored"),
    "gpipe, other boundaries": (
        2,
        ["-p", "2", "--schedule", "gpipe", "--partition", "manual:0,21,22"],
        "re-keyed by parameter name for the new stage layout",
    ),
    "one stage on one rank": (1, ["-p", "1"], "re-keyed by parameter name for the new stage layout"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", RESUMED)
def test_a_resumed_run_has_the_losses_of_one_that_never_stopped(stopped_run, name):
    tmp, config, uninterrupted, checkpoints = stopped_run
    ranks, args, optimizer = RESUMED[name]
    resumed = run_example(tmp, name.replace(" ", "_"), ranks, config, [*COMMON, *args, "--resume", str(checkpoints)])
    assert resumed["resumed_from"] == {
        "checkpoint": str(checkpoints / "global_step2"),
        "step": 2,
        "optimizer": optimizer,
    }
    assert [step["step"] for step in resumed["steps"]] == [3, 4]
    expected = losses(uninterrupted)[2:]
    assert expected[0] != expected[1] != losses(uninterrupted)[1]  # the steps differ, so equality means something
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(expected), rtol=1e-6, atol=0)


# The GPT example (no dropout: every layout computes the same numbers) stopped after step 2 of 4 with one chunk per
# rank and with two, and resumed onto other layouts. name: (the run it resumes, ranks, example arguments).
VIRTUAL_SOURCES = {
    "1f1b": ["-p", "2"],
    "interleaved-1f1b": ["-p", "2", "--schedule", "interleaved-1f1b", "--partition", "uniform"],
}
VIRTUAL_RESUMED = {
    "1f1b into interleaved-1f1b": ("1f1b", 2, ["-p", "2", "--schedule", "interleaved-1f1b", "--partition", "uniform"]),
    "interleaved-1f1b into 1f1b": ("interleaved-1f1b", 2, ["-p", "2"]),
    # the same boundaries [0, 2, 4, 6, 8], rank 0 holding stages 0 and 3 instead of 0 and 2
    "interleaved-1f1b into zb-v": ("interleaved-1f1b", 2, ["-p", "2", "--schedule", "zb-v", "--partition", "uniform"]),
    "interleaved-1f1b into one stage": ("interleaved-1f1b", 1, ["-p", "1"]),
}


def launch_runs(tmp: Path, runs: dict[str, list[str]], ranks: int) -> None:
    """Several GPT example runs in one launch (``tests/scripts/example_runs.py``), each logging to tmp/NAME.json."""
    spec = tmp / f"runs_{len(list(tmp.glob('runs_*.json')))}.json"
    runs = {name: [*args, "--log-json", str(tmp / f"{name}.json")] for name, args in runs.items()}
    spec.write_text(json.dumps({"script": str(GPT_EXAMPLE.relative_to(ROOT)), "runs": runs}))
    result = launch(ROOT / "tests" / "scripts" / "example_runs.py", [str(spec)], ranks=ranks, timeout=900)
    if result.returncode != 0:
        output = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        raise AssertionError(f"the runs {list(runs)} failed ({result.returncode}):\n{output}")


@pytest.fixture(scope="module")
def virtual_resumes(tmp_path_factory) -> dict[str, dict]:
    """Three launches: both stopped runs on 2 ranks (4 steps, a checkpoint every 2, the last one then removed),
    the 2-rank resumes, and the one-rank resume."""
    tmp = tmp_path_factory.mktemp("virtual_resume")
    config = write_config(tmp / "ds_config.json", train_batch=32, micro_batch=4)
    common = ["--deepspeed_config", str(config), "--steps", "4"]
    save = ["--save-interval", "2", "--save-dir"]
    launch_runs(
        tmp, {name: [*common, *args, *save, str(tmp / f"{name}_ckpt")] for name, args in VIRTUAL_SOURCES.items()}, 2
    )
    for name in VIRTUAL_SOURCES:
        shutil.rmtree(tmp / f"{name}_ckpt" / "global_step4")
        (tmp / f"{name}_ckpt" / "latest").write_text("global_step2")
    for ranks in (2, 1):
        runs = {
            name.replace(" ", "_"): [*common, *args, "--resume", str(tmp / f"{source}_ckpt")]
            for name, (source, on_ranks, args) in VIRTUAL_RESUMED.items()
            if on_ranks == ranks
        }
        launch_runs(tmp, runs, ranks)
    names = [*VIRTUAL_SOURCES, *(name.replace(" ", "_") for name in VIRTUAL_RESUMED)]
    return {name: json.loads((tmp / f"{name}.json").read_text()) for name in names} | {"tmp": tmp}


@pytest.mark.slow
@pytest.mark.parametrize("name", VIRTUAL_RESUMED)
def test_a_run_resumed_to_or_from_virtual_stages_has_the_losses_of_one_that_never_stopped(virtual_resumes, name):
    """Steps 3-4 within 1e-6 relative of the stopped run's own (measured: equal, or one float32 step apart, 6.2e-8
    relative, where the resumed layout sums in another order than the stopped one), the optimizer state re-keyed by
    parameter name; the tied embedding's second copy (rank 1's, with the loop placement) comes from the one file."""
    source, _, _ = VIRTUAL_RESUMED[name]
    uninterrupted, resumed = virtual_resumes[source], virtual_resumes[name.replace(" ", "_")]
    checkpoint = virtual_resumes["tmp"] / f"{source}_ckpt" / "global_step2"
    assert uninterrupted["checkpoints"][0] == str(checkpoint)
    assert resumed["resumed_from"] == {
        "checkpoint": str(checkpoint),
        "step": 2,
        "optimizer": "re-keyed by parameter name for the new stage layout",
    }
    assert [step["step"] for step in resumed["steps"]] == [3, 4]
    expected = losses(uninterrupted)[2:]
    assert expected[0] != expected[1] != losses(uninterrupted)[1]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(expected), rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "train_batch", "message"),
    [
        pytest.param(
            ["--model", "vgg19"],
            32,
            r"layer_00-model_states.pt is from a different model: layer 0 \(Conv2d\)",
            id="another model",
        ),
        pytest.param(
            [], 64, "trained with train_batch_size 32, this run has 64: resume with the same", id="another batch size"
        ),
        pytest.param(["-p", "0"], 32, "was written by a pipeline run: resume it with -p 1 or more", id="no pipeline"),
    ],
)
def test_a_checkpoint_that_does_not_fit_the_run_is_refused(
    example, monkeypatch, stopped_run, args, train_batch, message
):
    tmp, _, _, checkpoints = stopped_run
    with pytest.raises(ValueError, match=message):
        run_plan(example, monkeypatch, tmp, 2, [*COMMON, *args, "--resume", str(checkpoints)], train_batch)


@pytest.mark.slow
def test_every_rank_refuses_a_truncated_layer_file_at_once(stopped_run, tmp_path):
    tmp, config, _, checkpoints = stopped_run
    broken = Path(shutil.copytree(checkpoints, tmp_path / "checkpoints", copy_function=os.link))
    layer = broken / "global_step2" / "layer_00-model_states.pt"
    truncated = layer.read_bytes()[:1000]
    layer.unlink()  # a new file: the original, hard-linked, stays whole
    layer.write_bytes(truncated)
    start = time.monotonic()
    result = launch(
        EXAMPLE, ["--deepspeed_config", str(config), *COMMON, "--resume", str(broken)], ranks=2, timeout=120
    )
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert output.count(f"ValueError: checkpoint file {layer} is truncated or unreadable") == 2, output[-3000:]
    assert "dataset:" not in output  # before any rank loaded data or joined a process group
    assert seconds < 60


def start_training(tmp_path: Path, extra: list[str]) -> tuple[subprocess.Popen, list[str]]:
    """Launch a long 2-rank run and return once it printed its first step, with its output so far."""
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4, steps_per_print=1)
    args = [
        "--deepspeed_config",
        str(config),
        "--dataset",
        "synthetic",
        "--image-size",
        "64",
        "--steps",
        "1000",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
    launcher = subprocess.Popen(
        [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(EXAMPLE), *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in launcher.stdout:
        lines.append(line)
        if line.startswith("step    1/"):
            return launcher, lines
    raise AssertionError("the run ended before its first step:\n" + "".join(lines[-50:]))


def rank_process(launcher: subprocess.Popen, rank: int) -> psutil.Process:
    """The process of ``rank`` (not one of its data-loader workers, which share its command line)."""
    flag = f"--local_rank={rank}"
    tree = psutil.Process(launcher.pid).children(recursive=True)
    return next(p for p in tree if flag in p.cmdline() and flag not in p.parent().cmdline())


def read_rest(launcher: subprocess.Popen, lines: list[str]) -> threading.Thread:
    reader = threading.Thread(target=lambda: lines.extend(launcher.stdout), daemon=True)
    reader.start()
    return reader


def end_all(launcher: subprocess.Popen) -> None:
    """Kill whatever is left of the job: the launcher, its ranks and their data-loader workers."""
    kill_tree(launcher.pid)
    launcher.wait()


@pytest.mark.slow
def test_killing_a_rank_mid_step_ends_the_job_naming_it(tmp_path):
    launcher, lines = start_training(tmp_path, [])
    try:
        victim = rank_process(launcher, 1)
        killed = time.monotonic()
        victim.kill()
        reader = read_rest(launcher, lines)
        status = launcher.wait(timeout=60)
        seconds = time.monotonic() - killed
        reader.join(timeout=5)
    finally:
        end_all(launcher)
    output = "".join(lines)
    assert status != 0
    # "died (rank 0 got ...)" when rank 0's own collective failed before its watchdog looked
    report = rf"\[ds_pipe_ext\] rank 1 \(pid {victim.pid}\) on \S+ died( \(rank 0 got [^\n]*\))?; rank 0 stops too"
    named = re.search(report, output)
    assert named, output[-3000:]
    print(f"kill to exit: {seconds:.1f} s")
    assert seconds < 60


@pytest.mark.slow
def test_a_hung_rank_fails_the_others_after_the_comm_timeout(tmp_path):
    timeout = 10
    launcher, lines = start_training(tmp_path, ["--comm-timeout", str(timeout)])
    try:
        rank0, rank1 = rank_process(launcher, 0), rank_process(launcher, 1)
        rank1.suspend()  # alive, so neither the launcher nor the watchdog can tell: only the timeout ends the wait
        stopped = time.monotonic()
        reader = read_rest(launcher, lines)
        rank0.wait(timeout=timeout + 30)
        seconds = time.monotonic() - stopped
        reader.join(timeout=1)
    finally:
        end_all(launcher)
    output = "".join(lines)
    assert f"Timed out waiting {timeout * 1000}ms" in output, output[-3000:]
    assert timeout <= seconds < timeout + 15
