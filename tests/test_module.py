"""``ds_pipe_ext.PipelineModule``: a drop-in for DeepSpeed's, with every registered partition method."""

from __future__ import annotations

import deepspeed.pipe
import pytest
import torch
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from torch import nn

from ds_pipe_ext import PipelineModule
from ds_pipe_ext.partition import PartitionContext, get_partition_method


def tiny_layers() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 4, 3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ]


def sample() -> torch.Tensor:
    return torch.ones(2, 3, 10, 10)


METHODS = ["uniform", "parameters", "type:linear", "type:conv:2|linear:1", "manual:0,7", "flops", "memory", "profile"]
METHODS += ["auto"]


@pytest.mark.parametrize("method", METHODS)
def test_one_stage_module_partitions_reports_and_runs(single_rank_group, method, tmp_path, capsys):
    layers = tiny_layers()
    module = PipelineModule(
        layers,
        num_stages=1,
        partition_method=method,
        sample_input=sample,
        micro_batches=2,
        profile_cache=tmp_path / "profile.json",
    )
    assert module.parts == [0, len(layers)]
    assert module.partition_report.boundaries == [0, len(layers)]
    assert f"partition {str(get_partition_method(method))!r}" in capsys.readouterr().out
    x = torch.randn(2, 3, 10, 10)
    assert torch.equal(module(x), nn.Sequential(*layers)(x))  # the module holds these very layers


def specs() -> list:
    spec = deepspeed.pipe.LayerSpec
    return [spec(nn.Linear, 6, 32), spec(nn.ReLU), spec(nn.Linear, 32, 32), spec(nn.Linear, 32, 3)]


@pytest.mark.parametrize(
    ("ours", "theirs"), [("parameters", "parameters"), ("uniform", "uniform"), ("profile", "uniform")]
)
def test_builds_the_same_weights_as_deepspeed(single_rank_group, ours, theirs):
    torch.manual_seed(3)
    reference = deepspeed.pipe.PipelineModule(specs(), num_stages=1, partition_method=theirs)
    torch.manual_seed(3)
    module = PipelineModule(
        specs(), num_stages=1, partition_method=ours, sample_input=torch.ones(2, 6), micro_batches=2
    )
    expected, got = reference.state_dict(), module.state_dict()
    assert list(got) == list(expected)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_takes_deepspeeds_arguments_positionally(single_rank_group):
    layers = tiny_layers()
    module = PipelineModule(layers, 1, None, None, False, None, 1234, "manual:0,7")
    assert module.parts == [0, 7]


@pytest.mark.parametrize(
    ("stages", "method", "extra", "message"),
    [
        (3, "sizes", {}, "unknown partition method 'sizes'"),
        (2, "manual:0,3", {}, "gives 1 stage"),
        (2, "manual:0,7,7", {}, "7 is followed by 7"),
        (9, "uniform", {}, "at most 7 stages"),
        (2, "profile", {"micro_batches": 2}, "needs sample_input="),
        (2, "memory", {"sample_input": sample}, "needs micro_batches="),
        (2, "type:attention", {}, "matches no layer"),
    ],
)
def test_bad_partitions_fail_before_deepspeed_starts(stages, method, extra, message):
    # With one rank (or none), DeepSpeed itself would fail on num_stages not dividing the world size: getting
    # this ValueError instead shows that the check ran before DeepSpeed's __init__ and its process groups.
    with pytest.raises(ValueError, match=message):
        PipelineModule(tiny_layers(), num_stages=stages, partition_method=method, **extra)


def unbuilt_stage(layers, num_stages: int, rank: int, **context) -> PipelineModule:
    """Our module on one rank of a ``num_stages``-stage pipeline, before DeepSpeed builds anything: enough state
    for ``_partition_layers`` without a process group of ``num_stages`` ranks."""
    module = PipelineModule.__new__(PipelineModule)
    nn.Module.__init__(module)
    module._layer_specs = list(layers)
    module.num_stages = num_stages
    module._topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=1)
    module.global_rank = rank
    module.local_rank = 0
    module.world_size, module.world_group = 1, None  # the agreement check then sees this process alone
    module.virtual_stages, module.placement = 1, "loop"
    module._partition_context = PartitionContext(layers, num_stages, **context)
    return module


@pytest.mark.parametrize("method", ["parameters", "type:conv:2|linear:1", "flops", "memory", "manual:0,2,4,7"])
def test_every_stage_builds_its_part_of_the_same_partition(single_rank_group, method, capsys):
    layers = tiny_layers()
    context = {"sample_input": sample(), "micro_batches": 4}
    expected = get_partition_method(method)(PartitionContext(layers, 3, **context))
    for rank in range(3):
        module = unbuilt_stage(layers, 3, rank, **context)
        module._partition_layers(method)
        assert module.parts == expected
        assert (module._local_start, module._local_stop) == (expected[rank], expected[rank + 1])
        assert module.partition_report.boundaries == expected
        printed = capsys.readouterr().out
        assert ("partition" in printed) == (rank == 0)
