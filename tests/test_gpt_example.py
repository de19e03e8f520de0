"""The GPT example: its layer list, data and command line in this process; the oracle on CPU ranks (slow).

The oracle is ``test_training``'s for the GPT: every layout and schedule trains like the network without a
pipeline, and the two copies of the tied embedding (stage 0's embedding, the last stage's output head) stay equal.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from launch import (
    GPT_EXAMPLE,
    assert_close,
    assert_weights_close,
    data_parallel_weights,
    import_script,
    layer_weights,
    losses,
    run_example,
    skip_unless_deepspeed_averages,
    write_config,
)

import ds_pipe_ext
from ds_pipe_ext.models.gpt import GPT, GPTConfig, gpt_layers, next_token_loss, output_logits, sample_batch
from ds_pipe_ext.partition import PartitionContext, get_partition_method

SMALL = GPTConfig(vocab_size=32, seq_len=16, width=32, heads=4, layers=2)


@pytest.fixture(scope="module")
def example():
    return import_script(GPT_EXAMPLE, "gpt_train")


@pytest.fixture(scope="module")
def data(example):
    import gpt.data  # on the path once the example is imported, as in the example

    return gpt.data


# ---- the model -------------------------------------------------------------------------------------------------


def one_stage(config: GPTConfig = SMALL, **kwargs) -> ds_pipe_ext.PipelineModule:
    return ds_pipe_ext.PipelineModule(
        layers=gpt_layers(config), num_stages=1, loss_fn=next_token_loss, **{"partition_method": "uniform", **kwargs}
    )


def test_the_layer_list_runs_as_a_pipeline_stage_with_the_head_on_the_embeddings_module(single_rank_group):
    module = one_stage()
    tokens = torch.randint(SMALL.vocab_size, (2, SMALL.seq_len))
    assert len(module.forward_funcs) == SMALL.num_layers == 6
    assert module(tokens).shape == (2, SMALL.seq_len, SMALL.vocab_size)
    embedding, head = module.forward_funcs[0], module.forward_funcs[-1]
    assert embedding is module.tied_modules["embed"] and head.func is output_logits and head.args == (embedding,)


def test_the_head_trains_the_embeddings_weight():
    net = GPT(SMALL)
    tokens = torch.zeros(2, SMALL.seq_len, dtype=torch.long)  # only token 0 is looked up
    next_token_loss(net(tokens), tokens).backward()
    assert f"layers.{SMALL.num_layers - 1}.weight" not in net.state_dict()  # the head keeps no weight of its own
    assert net.layers["0"].weight.grad[1:].abs().sum() > 0  # rows never looked up: their gradient is the head's


def test_the_baseline_starts_from_the_weights_and_outputs_of_the_pipeline(single_rank_group):
    module = one_stage(partition_method="parameters", seed_layers=True, base_seed=7)
    net = GPT(SMALL, base_seed=7)
    # The pipeline names the tied embedding tied_modules.embed.*, its other layers <index>.*
    as_baseline = lambda name: f"layers.{name.replace('tied_modules.embed', '0')}"
    pipeline = {as_baseline(name): tensor for name, tensor in module.state_dict().items()}
    assert pipeline.keys() == net.state_dict().keys()
    assert all(torch.equal(tensor, pipeline[name]) for name, tensor in net.state_dict().items())
    tokens = torch.randint(SMALL.vocab_size, (2, SMALL.seq_len))
    assert torch.equal(module(tokens), net(tokens))


def test_the_attention_is_causal():
    net = GPT(SMALL)
    tokens = torch.randint(SMALL.vocab_size, (1, SMALL.seq_len))
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1) % SMALL.vocab_size
    assert torch.equal(net(tokens)[0, :-1], net(changed)[0, :-1])


METHODS = ["uniform", "parameters", "type:TransformerBlock", "flops", "memory", "profile", "manual:0,6"]


@pytest.mark.parametrize("method", METHODS)
def test_every_partition_method_partitions_it(single_rank_group, method):
    module = one_stage(partition_method=method, sample_input=sample_batch(SMALL, 2), micro_batches=4)
    assert module.parts == [0, SMALL.num_layers]
    assert len(module.partition_report.stages) == 1


@pytest.mark.parametrize("method", ["type:TransformerBlock", "flops"])
def test_two_stages_get_two_blocks_each(method):
    config = GPTConfig()
    context = PartitionContext(gpt_layers(config), 2, sample_input=sample_batch(config, 4), micro_batches=8)
    assert get_partition_method(method)(context) == [0, 4, 8]


# ---- the data --------------------------------------------------------------------------------------------------


def test_the_data_is_a_pure_function_of_seed_and_index(data):
    first, again, other = (data.MarkovTokens(64, 32, seed=seed) for seed in (3, 3, 4))
    for index in (0, 1, len(first) - 1):
        inputs, targets = first[index]
        assert inputs.dtype == torch.long and inputs.shape == targets.shape == (32,)
        assert torch.equal(inputs[1:], targets[:-1])  # the targets are the next tokens
        assert all(torch.equal(a, b) for a, b in zip(first[index], again[index]))
        assert not torch.equal(inputs, other[index][0])
    assert not torch.equal(first[0][0], first[1][0])


def test_the_sequences_follow_the_chain_and_cost_its_best_loss(data):
    dataset = data.MarkovTokens(64, 64, seed=3)
    probability = torch.zeros(64, 64, dtype=torch.float64)
    steps = torch.from_numpy(dataset.next_tokens)
    probability.scatter_(1, steps, torch.from_numpy(dataset.cumulative).diff(dim=1, prepend=torch.zeros(64, 1)))
    surprise = [-probability[inputs, targets].log() for inputs, targets in (dataset[i] for i in range(300))]
    empirical = torch.cat(surprise)
    assert torch.isfinite(empirical).all()  # every step is one the chain allows
    assert empirical.mean().item() == pytest.approx(dataset.best_loss(), abs=0.05)
    assert 0.3 < dataset.best_loss() < math.log(3) < math.log(64)


def test_the_data_refuses_what_it_cannot_make(data):
    with pytest.raises(ValueError, match="successors must be between 1 and the vocabulary size 4, got 5"):
        data.MarkovTokens(4, 16, successors=5)
    with pytest.raises(IndexError, match="sample 10 is out of range for 10 samples"):
        data.MarkovTokens(4, 16, size=10)[10]


# ---- the command line ------------------------------------------------------------------------------------------


def run_plan(example, monkeypatch, tmp_path, world_size: int, args: list[str]):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4)
    args = example.get_args(["--deepspeed_config", str(config), *args])
    return example.RunPlan(args, example.build_example(args))


def test_a_good_command_line_plans_the_run(example, monkeypatch, tmp_path):
    plan = run_plan(example, monkeypatch, tmp_path, 2, ["-p", "2", "--partition", "flops", "--layers", "2"])
    assert (plan.micro_batches, plan.micro_batch, plan.schedule, len(plan.meta_network)) == (8, 4, "1f1b", 6)
    assert plan.sample_input().shape == (4, 64)
    baseline = run_plan(example, monkeypatch, tmp_path, 2, ["-p", "0"])
    assert isinstance(baseline.meta_network, GPT) and baseline.micro_batches == 4


# (world size, arguments, what the error says: the problem and its fix)
BAD_COMMAND_LINES = {
    "heads do not divide width": (2, ["--heads", "3"], "width 128 is not divisible by 3 heads"),
    "no blocks": (2, ["--layers", "0"], "GPT layers must be at least 1, got 0"),
    "unknown type": (2, ["--partition", "type:Conv2d"], "the layer types are: LayerNorm, LearnedPositions, Token"),
    "manual, too few cuts": (2, ["--partition", "manual:0,8"], "gives 1 stage.* give 3 boundaries from 0 to 8"),
    "more stages than layers": (9, ["-p", "9"], "cannot cut 8 layers into 9"),
}


@pytest.mark.parametrize("case", BAD_COMMAND_LINES)
def test_bad_command_lines_fail_before_any_process_group(example, monkeypatch, tmp_path, case):
    world_size, args, message = BAD_COMMAND_LINES[case]
    with pytest.raises(ValueError, match=message):
        run_plan(example, monkeypatch, tmp_path, world_size, args)


# ---- the oracle, on 2 CPU ranks (slow) -------------------------------------------------------------------------

#: The 2-stage runs: schedule, and the partition it runs with. Every cut puts the embedding (layer 0) and the head
#: (layer 7) on different stages, so DeepSpeed's all-reduce of the tied gradient decides the result.
PIPELINES = {
    "deepspeed": "parameters",
    "1f1b": "manual:0,3,8",
    "gpipe": "type:TransformerBlock",
    "zb-h1": "manual:0,5,8",
    "1f1b-split": "flops",
}
RUNS = {
    "data_parallel": ["-p", "0"],
    "one_stage": ["-p", "1"],
    **{schedule: ["-p", "2", "--schedule", schedule, "--partition", method] for schedule, method in PIPELINES.items()},
}


def oracle_run(tmp: Path, name: str, args: list[str]) -> dict:
    """The example on 2 CPU ranks, fp32, with the oracle's batch sizes; its log record."""
    config = write_config(tmp / "ds_config.json", train_batch=32, micro_batch=4)
    return run_example(tmp, name, 2, config, args, script=GPT_EXAMPLE)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> dict[str, dict]:
    """The example trained once per layout and schedule (same seed and batches)."""
    tmp = tmp_path_factory.mktemp("gpt_oracle")
    records = {}
    for name, args in RUNS.items():
        checkpoint = tmp / f"{name}_checkpoint"
        saves = ["--save-dir", str(checkpoint), "--save-interval", "2"]  # after steps 2, 4 and 5
        records[name] = oracle_run(tmp, name, [*args, "--steps", "5", *saves])
        records[name]["checkpoint"] = checkpoint
    return records


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("name", [name for name in RUNS if name != "data_parallel"])
def test_losses_match_the_run_without_a_pipeline(oracle, name):
    assert_close(losses(oracle[name]), losses(oracle["data_parallel"]), rtol=1e-5)
    assert losses(oracle[name])[-1] < losses(oracle[name])[0] - 0.3


def gpt_layer_key(name: str) -> str:
    """``layers.<index>.<name>`` of :class:`GPT` as ``layer_weights`` names it."""
    _, index, parameter = name.split(".", 2)
    return f"layer_{int(index):02d}.{parameter}"


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("name", [name for name in RUNS if name not in ("data_parallel", "deepspeed")])
def test_final_weights_match_the_run_that_sums_gradients_alike(oracle, name):
    """2-stage runs against DeepSpeed's own pipeline (one replica summing 8 micro-batches); the one-stage run
    (two replicas of 4, all-reduced) against DeepSpeed's non-pipeline engine. See ``test_training``."""
    if name == "one_stage":
        reference = data_parallel_weights(oracle["data_parallel"]["checkpoint"], gpt_layer_key)
    else:
        skip_unless_deepspeed_averages()
        reference = layer_weights(oracle["deepspeed"]["checkpoint"])
    assert_weights_close(layer_weights(oracle[name]["checkpoint"]), reference, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.oracle
@pytest.mark.parametrize("name", PIPELINES)
def test_the_tied_copies_end_equal_on_both_stages(oracle, name):
    assert oracle[name]["tied_weights"] == {"embed": {"stages": [0, 1], "equal": True}}
    assert "tied weights 'embed': the copies on stages [0, 1] are equal" in oracle[name]["stdout"]


@pytest.mark.slow
def test_runs_report_their_layout(oracle):
    assert oracle["1f1b"]["stage_boundaries"] == [0, 3, 8] and oracle["gpipe"]["stage_boundaries"] == [0, 4, 8]
    assert oracle["data_parallel"]["stage_boundaries"] is None and "tied_weights" not in oracle["one_stage"]
    for record in oracle.values():
        assert "dataset: markov (built-in" in record["stdout"]
        assert (record["model"], record["layers"], record["world_size"]) == ("gpt", 4, 2)


@pytest.mark.slow
def test_a_run_resumed_on_other_stages_has_the_losses_of_one_that_never_stopped(oracle, tmp_path):
    """From the 1f1b run's step-2 checkpoint with gpipe on other boundaries: the optimizer state is re-keyed by
    parameter name, and the head's copy of the tied weight, which DeepSpeed saves no file for, is the embedding's."""
    stopped = oracle["1f1b"]["checkpoint"]
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(stopped / "global_step2", checkpoints / "global_step2")
    (checkpoints / "latest").write_text("global_step2")
    resumed = oracle_run(tmp_path, "resumed", [*RUNS["gpipe"], "--steps", "5", "--resume", str(checkpoints)])
    assert resumed["resumed_from"]["optimizer"] == "re-keyed by parameter name for the new stage layout"
    assert [step["step"] for step in resumed["steps"]] == [3, 4, 5]
    expected = losses(oracle["1f1b"])[2:]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(expected), rtol=1e-5, atol=0)
    assert resumed["tied_weights"] == {"embed": {"stages": [0, 1], "equal": True}}
