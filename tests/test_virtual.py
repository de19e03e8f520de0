"""Virtual stages: each schedule's order against the libraries it follows, its safety and bubble, the module's
chunks and refusals, the examples' flag; and (slow) the GPT trained with every virtual schedule on 2 CPU ranks
against the run without a pipeline.

The orders are compared pass for pass with ``torch.distributed.pipelining`` (ScheduleInterleaved1F1B,
ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, ScheduleDualPipeV), whose schedules are built here without a
process group, and dualpipev without its weight split with DeepSpeed 0.19.8's own ``DualPipeVSchedule``.
"""

from __future__ import annotations

import json
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.pipelining.schedules as torch_schedules
from deepspeed.runtime.pipe import schedule as ds_schedule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from launch import (
    EXAMPLE,
    GPT_EXAMPLE,
    ROOT,
    assert_weights_close,
    import_script,
    launch,
    layer_weights,
    losses,
    run_example,
    skip_unless_trains_here,
    trains_here,
    write_config,
)
from torch import nn
from torch_oracle import Order, torch_order

from ds_pipe_ext import PipelineModule, compat
from ds_pipe_ext.cli import main
from ds_pipe_ext.config import check_schedule_fits
from ds_pipe_ext.engine import SchedulePipelineEngine, pipeline_engine
from ds_pipe_ext.observe.simulation import ideal_bubble_fraction, simulate, validate
from ds_pipe_ext.observe.trace import bubble_report, load_trace
from ds_pipe_ext.partition import PartitionContext
from ds_pipe_ext.schedules import Layout, Pass, get_schedule
from ds_pipe_ext.schedules.virtual import DualPipeVSchedule

#: Ours, torch's equivalent, and the chunk counts each runs.
TORCH_EQUIVALENTS = {
    "interleaved-1f1b": (torch_schedules.ScheduleInterleaved1F1B, (2, 3, 4)),
    "interleaved-zb": (torch_schedules.ScheduleInterleavedZeroBubble, (2, 3, 4)),
    "zb-v": (torch_schedules.ScheduleZBVZeroBubble, (2,)),
    "dualpipev": (torch_schedules.ScheduleDualPipeV, (2,)),
}
VIRTUAL = list(TORCH_EQUIVALENTS)
RANKS = range(2, 7)
MICRO_BATCHES = range(1, 17)


def our_order(name: str, ranks: int, micro_batches: int, chunks: int) -> Order | None:
    """Our per-rank compute order with each chunk as the global stage it holds, or None where we refuse."""
    cls = get_schedule(name).with_chunks(chunks)
    order = {}
    for rank in range(ranks):
        try:
            schedule = cls(micro_batches, ranks, rank)
        except ValueError:
            return None
        layout = schedule.layout
        order[rank] = [(p.kind, p.micro_batch, layout.stage(rank, p.chunk)) for p in schedule.order() if p]
    return order


@pytest.mark.parametrize("name", VIRTUAL)
def test_each_rank_runs_torchs_order_and_both_refuse_the_same_sizes(name):
    torch_cls, chunk_counts = TORCH_EQUIVALENTS[name]
    accepted = 0
    for chunks in chunk_counts:
        for ranks in RANKS:
            for micro_batches in MICRO_BATCHES:
                ours, theirs = (
                    our_order(name, ranks, micro_batches, chunks),
                    torch_order(torch_cls, ranks, micro_batches, chunks),
                )
                assert ours == theirs, f"{name}, {ranks} ranks x {chunks} chunks, {micro_batches} micro-batches"
                accepted += ours is not None
    assert accepted >= len(chunk_counts) * len(RANKS) * 8  # most sizes run: the comparison is not vacuous


def deepspeed_dualpipev_order(micro_batches: int, ranks: int, rank: int) -> list[Pass]:
    """The passes of DeepSpeed's own DualPipeVSchedule, in order: its buffer is phase * M + micro-batch, its phase
    our chunk (phase 1 is stage 2K-1-rank, our chunk 1)."""
    passes = []
    for step in ds_schedule.DualPipeVSchedule(micro_batches, ranks, rank).steps():
        for cmd in step:
            if isinstance(cmd, (ds_schedule.ForwardPass, ds_schedule.BackwardPass)):
                phase = cmd.kwargs["phase"]
                kind = "F" if isinstance(cmd, ds_schedule.ForwardPass) else "B"
                passes.append(Pass(kind, cmd.buffer_id - phase * micro_batches, phase))
    return passes


class WholeBackwardDualPipeV(DualPipeVSchedule):
    split_weights = False


def test_dualpipev_without_the_weight_split_is_deepspeeds_own_order():
    """DeepSpeed writes its schedule as instructions with CommitP2P batches, not as a compute order: the passes it
    runs, in order, are ours."""
    if not hasattr(ds_schedule, "DualPipeVSchedule"):
        pytest.skip("this DeepSpeed has no DualPipeVSchedule (it comes with 0.19.8)")
    for ranks in range(1, 7):
        for micro_batches in range(2 * ranks, 17):
            for rank in range(ranks):
                ours = WholeBackwardDualPipeV(micro_batches, ranks, rank).order()
                assert ours == deepspeed_dualpipev_order(micro_batches, ranks, rank), (ranks, micro_batches, rank)
    with pytest.raises(ValueError, match="dualpipev needs at least 2 x 3 = 6 micro-batches"):
        DualPipeVSchedule(5, 3, 0)
    with pytest.raises(ValueError, match="DualPipeV needs at least 2 \\* 3 micro-batches"):
        ds_schedule.DualPipeVSchedule(5, 3, 0)


def test_dualpipev_defers_only_weight_halves_and_keeps_every_pass():
    for ranks in range(1, 5):
        for rank in range(ranks):
            split, whole = DualPipeVSchedule(10, ranks, rank).order(), WholeBackwardDualPipeV(10, ranks, rank).order()
            as_whole = [Pass("B", p.micro_batch, p.chunk) if p.kind == "I" else p for p in split if p.kind != "W"]
            assert as_whole == whole
            assert sorted((p.micro_batch, p.chunk) for p in split if p.kind == "W") == sorted(
                (p.micro_batch, p.chunk) for p in split if p.kind == "I"
            )


# ---- the simulator: safe on gloo and nccl, and the bubble they promise ------------------------------------------


@pytest.mark.parametrize(("name", "chunks"), [("interleaved-1f1b", 3), ("interleaved-zb", 3), ("interleaved-1f1b", 4)])
def test_more_chunks_validate_on_gloo_and_nccl(name, chunks):
    """test_communication validates every registered schedule as registered (two chunks); these are the loop
    placement's other chunk counts."""
    schedule = get_schedule(name).with_chunks(chunks)
    for ranks in range(1, 6):
        for micro_batches in range(1, 13):
            if our_order(name, ranks, micro_batches, chunks) is not None:
                for backend in ("gloo", "nccl"):
                    validate(schedule, ranks, micro_batches, backend=backend)


def test_interleaving_divides_the_1f1b_bubble_by_the_chunks():
    """With the same work per rank (each of v chunks costs 1/v of a stage), interleaved 1F1B idles less than 1F1B
    for every M > 1 and, when K divides M, exactly as Megatron's paper says: (K-1)/(vM+K-1)."""
    for ranks in RANKS:
        for micro_batches in range(2, 17):
            plain = simulate("1f1b", ranks, micro_batches)
            assert plain.bubble_fraction == pytest.approx(ideal_bubble_fraction(ranks, micro_batches))
            for chunks in (2, 3):
                schedule = get_schedule("interleaved-1f1b").with_chunks(chunks)
                if our_order("interleaved-1f1b", ranks, micro_batches, chunks) is None:
                    continue
                result = simulate(schedule, ranks, micro_batches, {"forward": 1 / chunks, "backward": 2 / chunks})
                assert result.bubble_fraction < plain.bubble_fraction and result.makespan < plain.makespan
                if micro_batches % ranks == 0:
                    expected = (ranks - 1) / (chunks * micro_batches + ranks - 1)
                    assert result.bubble_fraction == pytest.approx(expected)


def test_zero_bubble_v_is_near_zero_with_equal_passes():
    """ZB-V's promise (Qi et al.): with F = I = W its bubble is the warm-up's alone."""
    for ranks in (2, 4):
        result = simulate("zb-v", ranks, 4 * ranks, {"forward": 1, "backward": 2})
        assert result.bubble_fraction < ideal_bubble_fraction(ranks, 4 * ranks) / 3


# ---- the module: chunks, and what it refuses --------------------------------------------------------------------


def linear_layers(count: int) -> list[nn.Module]:
    return [nn.Linear(4, 4) for _ in range(count)]


# (schedule, virtual stages, pipeline ranks, layers, what the error says: the problem and its fix)
BAD_MODULES = {
    "chunks, plain schedule": ("1f1b", 2, 1, 6, r"virtual_stages=2 needs a schedule with virtual stages .*"
                               r"pass schedule='dualpipev' or 'interleaved-1f1b'"),
    "chunks, no schedule": (None, 2, 1, 6, r"\(no schedule is named\): pass schedule="),
    "virtual schedule, no chunks": ("interleaved-1f1b", 1, 1, 6, r"runs virtual stages: pass virtual_stages=2 "
                                    r"\(or more\)"),
    "v schedule, no chunks": ("zb-v", 1, 1, 6, r"'zb-v' runs virtual stages: pass virtual_stages=2$"),
    "v placement, 3 chunks": ("zb-v", 3, 1, 6, r"places two chunks per rank in a V .* not 3: pass virtual_stages=2, "
                              r"or use 'interleaved-1f1b' or 'interleaved-zb' for 3 chunks per rank"),
    "dualpipev, 4 chunks": ("dualpipev", 4, 1, 6, r"'dualpipev' places two chunks per rank in a V .* not 4"),
    "more stages than layers": ("interleaved-1f1b", 4, 1, 3, r"cannot cut 3 layers into 1 rank x 4 virtual stages "
                                r"= 4 non-empty stages: use virtual_stages=3 or fewer"),
    "more stages than layers, v": ("zb-v", 2, 3, 5, r"cannot cut 5 layers into 3 ranks x 2 virtual stages = 6 "
                                   r"non-empty stages: use at most 2 pipeline ranks with 2 virtual stages each"),
    "not a count": ("interleaved-1f1b", 0, 1, 6, r"virtual_stages must be a whole number of chunks per rank"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_MODULES)
def test_bad_virtual_stages_fail_before_deepspeed_starts_naming_the_fix(case):
    """With one process and no process group, DeepSpeed itself would fail later: the ValueError shows the check
    ran first."""
    schedule, chunks, ranks, layers, message = BAD_MODULES[case]
    with pytest.raises(ValueError, match=message):
        PipelineModule(linear_layers(layers), num_stages=ranks, partition_method="uniform", schedule=schedule,
                       virtual_stages=chunks)  # fmt: skip


def unbuilt_virtual_stage(layers, ranks: int, rank: int, chunks: int, placement: str) -> PipelineModule:
    """Our module on one rank of ``ranks`` with ``chunks`` virtual stages, partitioned but not built: enough for
    ``_partition_layers`` without a process group of ``ranks`` ranks (as test_module's ``unbuilt_stage``)."""
    module = PipelineModule.__new__(PipelineModule)
    nn.Module.__init__(module)
    module._layer_specs = list(layers)
    module.num_stages = ranks
    module._topo = PipeDataParallelTopology(num_pp=ranks, num_dp=1)
    module.global_rank, module.local_rank = rank, 0
    module.world_size, module.world_group = 1, None
    module.virtual_stages, module.placement = chunks, placement
    module._partition_context = PartitionContext(layers, ranks * chunks, virtual_stages=chunks)
    return module


@pytest.mark.parametrize(("chunks", "placement"), [(2, "loop"), (3, "loop"), (2, "v")])
def test_the_chunks_of_all_ranks_cover_every_layer_once_where_the_layout_puts_them(
    single_rank_group, chunks, placement, capsys
):
    ranks, layers = 3, linear_layers(13)
    layout = Layout(ranks, chunks, placement)
    held = []
    for rank in range(ranks):
        module = unbuilt_virtual_stage(layers, ranks, rank, chunks, placement)
        module._partition_layers("uniform")
        assert len(module.parts) == ranks * chunks + 1
        for chunk, (start, stop) in enumerate(module.chunk_bounds):
            stage = layout.stage(rank, chunk)
            assert (start, stop) == (module.parts[stage], module.parts[stage + 1]) and start < stop
            assert all(module.stage_owner(layer) == rank for layer in range(start, stop))
            held += range(start, stop)
    capsys.readouterr()
    assert sorted(held) == list(range(len(layers)))
    if placement == "v":  # rank 0 holds the first layer and the last
        first = unbuilt_virtual_stage(layers, ranks, 0, chunks, placement)
        first._partition_layers("uniform")
        assert first.chunk_bounds[0][0] == 0 and first.chunk_bounds[1][1] == len(layers)


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zb-v"])
def test_a_one_rank_module_builds_each_chunk_and_runs_them_in_turn(single_rank_group, schedule, capsys):
    torch.manual_seed(0)
    layers = linear_layers(5)
    module = PipelineModule(layers, num_stages=1, partition_method="uniform", schedule=schedule, virtual_stages=2)
    capsys.readouterr()
    assert module.chunk_bounds == [(0, 3), (3, 5)] and module.layout == Layout(1, 2, get_schedule(schedule).placement)
    x = torch.randn(3, 4)
    module.activate_chunk(0)
    middle = module(x)
    module.activate_chunk(1)
    assert torch.equal(module(middle), nn.Sequential(*layers)(x))
    assert {name.split(".")[0] for name in module.state_dict()} == {str(i) for i in range(5)}


# ---- the examples' flag -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_example():
    return import_script(GPT_EXAMPLE, "gpt_train_virtual")


def run_plan(example, monkeypatch, tmp_path, args: list[str], world_size: int = 2):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4)
    args = example.get_args(["--deepspeed_config", str(config), *args])
    return example.RunPlan(args, example.build_example(args))


@pytest.mark.parametrize(
    ("args", "chunks", "placement"),
    [
        (["--schedule", "interleaved-1f1b"], 2, "loop"),  # no flag: the schedule's own count
        (["--schedule", "interleaved-zb", "--virtual-stages", "3"], 3, "loop"),
        (["--schedule", "zb-v", "--virtual-stages", "2"], 2, "v"),
        (["--schedule", "dualpipev"], 2, "v"),
        (["--schedule", "1f1b"], 1, "loop"),
        (["--schedule", "gpipe", "--virtual-stages", "1"], 1, "loop"),
    ],
)
def test_the_example_flag_defaults_to_the_schedules_chunks(gpt_example, monkeypatch, tmp_path, args, chunks, placement):
    skip_unless_trains_here(args[1])
    plan = run_plan(gpt_example, monkeypatch, tmp_path, ["-p", "2", *args])
    assert (plan.virtual_stages, plan.placement) == (chunks, placement)


BAD_FLAGS = {
    "plain schedule": (["-p", "2", "--virtual-stages", "2"], r"virtual_stages=2 needs a schedule with virtual stages "
                       r"\(schedule '1f1b' runs one chunk per rank\)"),
    "v, 3 chunks": (["-p", "2", "--schedule", "zb-v", "--virtual-stages", "3"], "pass virtual_stages=2"),
    "no pipeline": (["-p", "0", "--virtual-stages", "2"], "--virtual-stages cuts a pipeline's stages into chunks: use "
                    "it with -p 1 or more"),
    "zero": (["-p", "2", "--schedule", "zb-v", "--virtual-stages", "0"], "--virtual-stages must be at least 1"),
    "too many": (["-p", "2", "--schedule", "interleaved-1f1b", "--virtual-stages", "5", "--layers", "1"],
                 r"cannot cut 5 layers into 2 ranks x 5 virtual stages = 10 non-empty stages: use virtual_stages=2"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_virtual_stage_flags_fail_before_any_process_group(gpt_example, monkeypatch, tmp_path, case):
    args, message = BAD_FLAGS[case]
    with pytest.raises(ValueError, match=message):
        run_plan(gpt_example, monkeypatch, tmp_path, args)


# ---- the oracle, on CPU ranks (slow) ----------------------------------------------------------------------------

#: The GPT example (2 pipeline ranks, 8 micro-batches of 4, fp32) with every virtual schedule: name -> arguments.
#: The partitions differ so that the chunks hold different layers; every one puts the embedding and the head on
#: rank 0 and rank 1 (loop) or both on rank 0 (v, the tied weight then one module used by two chunks).
VIRTUAL_RUNS = {
    "interleaved-1f1b": ["--schedule", "interleaved-1f1b", "--partition", "uniform", "--trace", "{tmp}/trace"],
    "interleaved-1f1b x3": ["--schedule", "interleaved-1f1b", "--virtual-stages", "3", "--partition", "uniform"],
    "interleaved-zb": ["--schedule", "interleaved-zb", "--partition", "type:TransformerBlock"],
    "zb-v": ["--schedule", "zb-v", "--virtual-stages", "2", "--partition", "uniform"],
    "dualpipev": ["--schedule", "dualpipev", "--partition", "type:TransformerBlock"],
}
ORACLE_STEPS = ["--steps", "5"]


def launch_example_runs(tmp, script, runs: dict[str, list[str]], ranks: int, what: str) -> subprocess.CompletedProcess:
    """Several runs of an example in one launch (``tests/scripts/example_runs.py``); fail with the output."""
    spec = tmp / f"{what.replace(' ', '_')}.json"
    spec.write_text(json.dumps({"script": str(script.relative_to(ROOT)), "runs": runs}))
    result = launch(ROOT / "tests" / "scripts" / "example_runs.py", [str(spec)], ranks=ranks, timeout=900)
    if result.returncode != 0:
        output = f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        raise AssertionError(f"the {what} failed ({result.returncode}):\n{output}")
    return result


@pytest.fixture(scope="module")
def gpt_one_stage(tmp_path_factory) -> dict:
    """The GPT example's one-stage run on one rank (8 micro-batches of 4 summed on one rank, as the pipelines do),
    5 steps; its checkpoint is ``record["checkpoint"]``."""
    tmp = tmp_path_factory.mktemp("gpt_one_stage")
    config = write_config(tmp / "ds_config.json", train_batch=32, micro_batch=4)
    args = ["-p", "1", *ORACLE_STEPS, "--save-dir", str(tmp / "one_stage_ckpt")]
    record = run_example(tmp, "one_stage", 1, config, args, script=GPT_EXAMPLE)
    record["checkpoint"] = tmp / "one_stage_ckpt"
    return record


@pytest.fixture(scope="module")
def virtual_oracle(tmp_path_factory, gpt_one_stage) -> dict[str, dict]:
    """Two launches: the one-stage run (``gpt_one_stage``), and every virtual-schedule run in one 2-rank launch
    (``tests/scripts/example_runs.py``)."""
    tmp = tmp_path_factory.mktemp("virtual_oracle")
    config = write_config(tmp / "ds_config.json", train_batch=32, micro_batch=4)
    records = {"one_stage": gpt_one_stage}
    runs = {}
    for name, args in VIRTUAL_RUNS.items():
        log, save = tmp / f"{name}.json", tmp / f"{name}_ckpt"
        args = [arg.format(tmp=tmp) for arg in args]
        runs[name] = ["--deepspeed_config", str(config), "-p", "2", *args, *ORACLE_STEPS, "--log-json", str(log)]
        runs[name] += ["--save-dir", str(save)]
    result = launch_example_runs(tmp, GPT_EXAMPLE, runs, 2, "virtual runs")
    for name in VIRTUAL_RUNS:
        records[name] = json.loads((tmp / f"{name}.json").read_text())
    records["stdout"] = result.stdout
    records["tmp"] = tmp
    return records


@pytest.mark.slow
def test_every_virtual_schedule_trains_the_gpt_like_one_stage(virtual_oracle):
    """Losses and final weights within 1e-6 (measured: 1.3e-7 and 2e-7), the tied embedding's copies equal, each
    run on the layout it said; the chunks' checkpoints hold every layer."""
    one_stage = losses(virtual_oracle["one_stage"])
    reference = layer_weights(virtual_oracle["one_stage"]["checkpoint"])
    for name in VIRTUAL_RUNS:
        record = virtual_oracle[name]
        chunks = 3 if name.endswith("x3") else 2
        placement = get_schedule(record["schedule"]).placement
        assert (record["schedule"], record["virtual_stages"]) == (name.split()[0], chunks)
        assert len(record["stage_boundaries"]) == 2 * chunks + 1
        torch.testing.assert_close(torch.tensor(losses(record)), torch.tensor(one_stage), rtol=1e-6, atol=0)
        assert len(one_stage) == 5 and one_stage[-1] < one_stage[0] - 0.3
        assert_weights_close(layer_weights(virtual_oracle["tmp"] / f"{name}_ckpt"), reference, rtol=1e-6)
        copies = [0, 1] if placement == "loop" else [0]  # v: rank 0 holds the first stage and the last
        assert record["tied_weights"] == {"embed": {"stages": copies, "equal": True}}
        layout = Layout(2, chunks, placement)
        held = "; ".join(
            f"rank {r}: stages {', '.join(str(layout.stage(r, c)) for c in range(chunks))}" for r in (0, 1)
        )
        assert (
            f"virtual stages: {chunks} per rank, {2 * chunks} stages placed '{placement}' ({held})"
            in virtual_oracle["stdout"]
        )


def trainable_here(runs: dict[str, list[str]]) -> dict[str, list[str]]:
    """The runs whose placement the installed DeepSpeed can train (:func:`launch.trains_here`)."""
    return {name: args for name, args in runs.items() if trains_here(name)}


def test_the_v_placement_is_refused_where_deepspeed_broadcasts_the_loss_from_the_last_rank(monkeypatch):
    from deepspeed.runtime.pipe.engine import PipelineEngine

    monkeypatch.delattr(PipelineEngine, "_loss_stage_global_rank", raising=False)
    with pytest.raises(compat.UnsupportedDeepSpeedError, match="use a loop-placed schedule"):
        check_schedule_fits("zb-v", 2, 8, 2)
    check_schedule_fits("interleaved-1f1b", 2, 8, 2)
    check_schedule_fits("zb-v", 2, 8, 2, on_this_deepspeed=False)  # drawing and simulating need no engine


#: The GPT example on 4 ranks, pipe 2 x data 2 (4 micro-batches of 4 per replica), 3 steps.
PIPE2_DATA2_RUNS = {
    "interleaved-1f1b": ["--schedule", "interleaved-1f1b", "--partition", "uniform"],
    "zb-v": ["--schedule", "zb-v", "--partition", "uniform"],
}


@pytest.mark.slow
@pytest.mark.oracle
def test_virtual_schedules_on_pipe_2_x_data_2_train_the_gpt_like_one_stage(tmp_path, gpt_one_stage):
    """One 4-rank launch: with 2 replicas each summing 4 micro-batches, the tied embedding's copies (loop placement:
    one per rank of each replica) and every stage's gradients all-reduced across replicas, the losses of steps 1-3
    are the one-stage run's within 1e-5 relative (measured: 1.8e-7)."""
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4)
    runs = {
        name: [
            "--deepspeed_config",
            str(config),
            "-p",
            "2",
            *args,
            "--steps",
            "3",
            "--log-json",
            str(tmp_path / f"{name}.json"),
        ]
        for name, args in trainable_here(PIPE2_DATA2_RUNS).items()
    }
    launch_example_runs(tmp_path, GPT_EXAMPLE, runs, 4, "pipe 2 x data 2 runs")
    one_stage = losses(gpt_one_stage)[:3]
    for name in runs:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert (record["pipeline_parallel_size"], record["data_parallel_size"], record["micro_batches"]) == (2, 2, 4)
        torch.testing.assert_close(torch.tensor(losses(record)), torch.tensor(one_stage), rtol=1e-5, atol=0)
        copies = [0, 1] if name == "interleaved-1f1b" else [0]
        assert record["tied_weights"] == {"embed": {"stages": copies, "equal": True}}


#: The AlexNet example (fp32, dropout 0, 64 px, 8 micro-batches of 4, 5 steps) with every virtual schedule; the
#: partitions give each of the 4 stages several of the 22 layers.
ALEXNET_COMMON = ["--dataset", "synthetic", "--image-size", "64", "--dropout", "0", "--steps", "5"]
ALEXNET_VIRTUAL_RUNS = {
    "interleaved-1f1b": ["--schedule", "interleaved-1f1b", "--partition", "uniform"],
    "interleaved-zb": ["--schedule", "interleaved-zb", "--partition", "manual:0,6,12,17,22"],
    "zb-v": ["--schedule", "zb-v", "--partition", "uniform"],
    "dualpipev": ["--schedule", "dualpipev", "--partition", "manual:0,6,12,17,22"],
}


@pytest.mark.slow
@pytest.mark.oracle
def test_every_virtual_schedule_trains_alexnet_like_one_stage(tmp_path):
    """Two launches: the AlexNet example's one-stage run on one rank, and every virtual schedule in one 2-rank
    launch. Losses and final weights (tensor norms) within 1e-5 relative (measured: 1.0e-7 and 1.0e-6, every
    schedule alike)."""
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4)
    one_stage_args = [*ALEXNET_COMMON, "-p", "1", "--save-dir", str(tmp_path / "one_stage_ckpt")]
    one_stage = run_example(tmp_path, "one_stage", 1, config, one_stage_args)
    runs = {
        name: ["--deepspeed_config", str(config), *ALEXNET_COMMON, "-p", "2", *args, "--log-json",
               str(tmp_path / f"{name}.json"), "--save-dir", str(tmp_path / f"{name}_ckpt")]
        for name, args in trainable_here(ALEXNET_VIRTUAL_RUNS).items()
    }  # fmt: skip
    launch_example_runs(tmp_path, EXAMPLE, runs, 2, "AlexNet virtual runs")
    reference = layer_weights(tmp_path / "one_stage_ckpt")
    for name in runs:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert (record["schedule"], record["virtual_stages"], len(record["stage_boundaries"])) == (name, 2, 5)
        weights = layer_weights(tmp_path / f"{name}_ckpt")
        torch.testing.assert_close(torch.tensor(losses(record)), torch.tensor(losses(one_stage)), rtol=1e-5, atol=0)
        assert_weights_close(weights, reference, rtol=1e-5)
    assert len(losses(one_stage)) == 5 and len(set(losses(one_stage))) == 5  # the steps differ


@pytest.mark.slow
def test_a_traced_virtual_run_tells_its_chunks_apart(virtual_oracle, tmp_path, capsys):
    run = load_trace(virtual_oracle["tmp"] / "trace")
    assert (run.schedule, run.stages, run.micro_batches, run.layout) == ("interleaved-1f1b", 2, 8, Layout(2, 2))
    for step in range(run.steps):
        passes = sorted((e.stage, e.chunk, e.instruction.__name__, e.micro_batch) for e in run.timeline(step)
                        if e.instruction in (ds_schedule.ForwardPass, ds_schedule.BackwardPass))  # fmt: skip
        expected = [(r, c, kind, m) for r in (0, 1) for c in (0, 1) for kind in ("BackwardPass", "ForwardPass")
                    for m in range(8)]  # fmt: skip
        assert passes == expected
    report = bubble_report(run)  # the simulator replays the traced chunk count with each stage's measured costs
    assert len(report.forward_cost) == 4 and report.chunks == 2 and 0 <= report.predicted < 1
    assert virtual_oracle["interleaved-1f1b"]["bubble"]["predicted"] == pytest.approx(report.predicted)
    assert main(["trace", str(virtual_oracle["tmp"] / "trace"), "--out", str(tmp_path / "trace.png")]) == 0
    assert "interleaved-1f1b: 2 stages (2 chunks each, placed 'loop') x 1 replicas" in capsys.readouterr().out


def test_the_engine_refuses_virtual_stages_where_deepspeeds_own_handlers_would_send(monkeypatch):
    """Partitioned or dynamically shaped activations go through DeepSpeed's send and receive, which know the next
    and the previous rank only: a virtual schedule is refused there, before the first batch."""
    monkeypatch.setattr(pipeline_engine.dist, "get_backend", lambda: "gloo")
    for name in VIRTUAL:
        engine = SimpleNamespace(
            schedule_cls=get_schedule(name), num_stages=2, micro_batches=8, _posts_own_transfers=lambda: False
        )
        with pytest.raises(ValueError, match=r"runs virtual stages.*Turn off activation partitioning"):
            SchedulePipelineEngine._check_transport(engine)
        engine._posts_own_transfers = lambda: True
        SchedulePipelineEngine._check_transport(engine)


def test_eval_batch_is_refused_with_virtual_stages_until_it_has_a_schedule():
    engine = SimpleNamespace(layout=Layout(2, 2), schedule_cls=get_schedule("interleaved-1f1b"))
    with pytest.raises(NotImplementedError, match="no forward-only schedule exists yet"):
        SchedulePipelineEngine.eval_batch(engine, iter([]))


def stages_worth_held(name: str, ranks: int, micro_batches: int, chunks: int) -> list[float]:
    """Per rank, the most activations it holds at once, in stages' worth (a chunk's are a v-th of a stage's)."""
    result = simulate(get_schedule(name).with_chunks(chunks), ranks, micro_batches)
    return [peak / chunks for peak in result.peak_buffers]


def test_the_activations_each_rank_holds_are_as_documented():
    """docs/schedules.md and the README: with M >= 2K, rank s holds at most K + (K-1-2s)/v stages' worth of
    activations with interleaved 1F1B, K with interleaved-zb and zb-v, K + 1/2 with dualpipev."""
    for ranks in (2, 3, 4):
        for micro_batches in (2 * ranks, 4 * ranks):
            for chunks in (2, 3):
                expected = [ranks + (ranks - 1 - 2 * s) / chunks for s in range(ranks)]
                assert stages_worth_held("interleaved-1f1b", ranks, micro_batches, chunks) == expected
                assert stages_worth_held("interleaved-zb", ranks, micro_batches, chunks) == [ranks] * ranks
            assert stages_worth_held("zb-v", ranks, micro_batches, 2) == [ranks] * ranks
            assert stages_worth_held("dualpipev", ranks, micro_batches, 2) == [ranks + 0.5] * ranks


# ---- dualpipev against DeepSpeed's own DualPipeV (slow) ----------------------------------------------------------


@pytest.mark.slow
def test_dualpipev_without_the_weight_split_trains_bit_for_bit_as_deepspeeds_dualpipev(tmp_path):
    """``tests/scripts/dualpipev_vs_deepspeed.py``, one 2-rank launch: DeepSpeed's ``DualPipeVModule`` in its
    ``DualPipeVEngine`` (built as ``bench/pipeline_bench.py`` builds it) and our ``dualpipev`` with every backward
    whole, the same GPT from the same seed on the same micro-batches (fp32, Adam, 3 steps of M = 4): the losses and
    every final weight are bit for bit equal (measured: 0.0). Without clipping as they come; with DeepSpeed's
    default clipping (1.0) once DeepSpeed's module counts every rank's gradients in the norm as ours does (its
    stock pipeline modules count the first rank's alone: there the step-3 loss differed by 1.3e-5 relative). Our
    ``dualpipev`` with the weight split is bit for bit the same too."""
    if not hasattr(ds_schedule, "DualPipeVSchedule"):
        pytest.skip("this DeepSpeed has no DualPipeVModule (it comes with 0.19.8)")
    result = launch(ROOT / "tests" / "scripts" / "dualpipev_vs_deepspeed.py", [str(tmp_path)], ranks=2, timeout=600)
    if result.returncode != 0:
        raise AssertionError(
            f"the runs failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    runs = {path.stem: torch.load(path) for path in tmp_path.glob("*.pt")}
    pairs = [
        ("dualpipev-whole, no clipping", "deepspeed-dualpipev, no clipping"),
        ("dualpipev-whole", "deepspeed-dualpipev, whole norm"),
        ("dualpipev", "dualpipev-whole"),
    ]
    for ours, theirs in pairs:
        assert runs[ours]["losses"] == runs[theirs]["losses"], (ours, theirs)
        weights, reference = runs[ours]["weights"], runs[theirs]["weights"]
        assert weights.keys() == reference.keys() and "tied_modules.embed.weight" in weights
        assert all(torch.equal(weights[key], reference[key]) for key in weights), (ours, theirs)
    assert runs["dualpipev-whole"]["losses"] != runs["dualpipev-whole, no clipping"]["losses"]  # clipping acted
