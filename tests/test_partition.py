"""Partition methods: the solver against brute force, DeepSpeed's methods against DeepSpeed, the new methods
against PyTorch's own FLOP counter, real saved tensors, the schedule simulator and exhaustive search."""

from __future__ import annotations

import functools
import itertools
import json
import math
import random
from fractions import Fraction

import deepspeed.pipe
import pytest
import torch
from deepspeed.runtime import utils as ds_utils
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ds_pipe_ext.cli import main
from ds_pipe_ext.models.gpt import GPT, GPTConfig, gpt_layers
from ds_pipe_ext.models.vision import build_layers
from ds_pipe_ext.partition import (
    PartitionContext,
    available_partition_methods,
    balance,
    get_partition_method,
    min_max_split,
    partition_report,
    register_partition_method,
    registry,
)
from ds_pipe_ext.partition.costs import LayerCosts, measure_layer_costs


def splits(n: int, k: int):
    """Every way to cut n layers into k non-empty stages, in lexicographic order of the boundaries."""
    for cuts in itertools.combinations(range(1, n), k - 1):
        yield [0, *cuts, n]


def brute_force(n: int, k: int, stage_cost):
    """The optimum and, among optimal splits, the lexicographically largest boundaries (the documented tie-break)."""
    best = min(max(stage_cost(s, a, b) for s, (a, b) in enumerate(zip(bs, bs[1:]))) for bs in splits(n, k))
    optimal = [
        bs for bs in splits(n, k) if max(stage_cost(s, a, b) for s, (a, b) in enumerate(zip(bs, bs[1:]))) == best
    ]
    return best, max(optimal)


def sum_cost(weights, cut_costs=None):
    w = [Fraction(x) for x in weights]
    c = [Fraction(x) for x in cut_costs] if cut_costs else [Fraction(0)] * len(w)
    n = len(w)
    return lambda s, a, b: sum(w[a:b]) + (c[a - 1] if a > 0 else 0) + (c[b - 1] if b < n else 0)


def tiny_cnn() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 4, 3),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(6 * 4 * 4, 32),
        nn.ReLU(inplace=True),
        nn.Linear(32, 5),
    ]


TINY_INPUT = (2, 3, 10, 10)


# ---- balance ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["int", "float", "cut"])
def test_balance_equals_brute_force(kind):
    rng = random.Random(kind)
    for _ in range(150):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        if kind == "int":
            weights = [rng.randint(0, 4) for _ in range(n)]
        else:
            weights = [rng.choice([0.0, 0.1, 0.2, 0.3, rng.random(), rng.random() * 1e-3]) for _ in range(n)]
        cuts = [rng.choice([0.0, 0.05, rng.random()]) for _ in range(n)] if kind == "cut" else None
        expected_max, expected = brute_force(n, k, sum_cost(weights, cuts))
        got = balance(weights, k, cut_costs=cuts)
        assert got == expected, (weights, k, cuts)
        assert max(sum_cost(weights, cuts)(0, a, b) for a, b in zip(got, got[1:])) == expected_max


def test_balance_beats_deepspeed_on_its_own_example():
    weights = [7, 1, 9, 5, 16, 2]
    ours = balance(weights, 4)
    theirs = [int(b) for b in ds_utils.partition_balanced(weights, 4)]
    assert max(sum(weights[a:b]) for a, b in zip(ours, ours[1:])) == 16
    assert max(sum(weights[a:b]) for a, b in zip(theirs, theirs[1:])) == 18


def test_balance_ties_keep_free_layers_with_the_layer_before():
    # conv, relu, conv, relu: cutting before or after the first relu ties; the relu stays with its conv
    assert balance([1, 0, 1, 0], 2) == [0, 2, 4]
    assert balance([0, 0, 0], 3) == [0, 1, 2, 3]


def test_balance_never_leaves_a_stage_empty():
    for weights in ([0, 0, 0, 9], [9, 0, 0, 0], [5, 5]):
        bounds = balance(weights, len(weights))
        assert bounds == list(range(len(weights) + 1))


@pytest.mark.parametrize(
    ("weights", "stages", "message"),
    [
        ([1, 2], 3, "at most 2 stages"),
        ([1, 2], 0, "at least 1"),
        ([], 1, "at most 0 stages"),
        ([1, -1], 1, "negative"),
        ([1, math.nan], 1, "finite"),
        ([math.inf, 1], 1, "finite"),
    ],
)
def test_balance_rejects_bad_input(weights, stages, message):
    with pytest.raises(ValueError, match=message):
        balance(weights, stages)


def test_min_max_split_reports_infeasible():
    assert min_max_split(3, 2, lambda s, a, b: math.inf) == (math.inf, [])


# ---- registry -----------------------------------------------------------------------------------------------------


def test_unknown_method_lists_every_registered_one():
    with pytest.raises(ValueError, match="unknown partition method 'sizes'") as error:
        get_partition_method("sizes")
    for name in available_partition_methods():
        assert name in str(error.value)
    assert {"uniform", "parameters", "type", "manual", "flops", "memory", "profile"} <= set(
        available_partition_methods()
    )


def test_names_are_case_insensitive_and_arguments_checked():
    assert get_partition_method("UNIFORM").method.name == "uniform"
    assert str(get_partition_method("Type:Conv")) == "type:Conv"
    with pytest.raises(ValueError, match="needs an argument"):
        get_partition_method("manual")
    with pytest.raises(ValueError, match="takes no argument"):
        get_partition_method("flops:3")


@pytest.fixture
def every_other():
    @register_partition_method("every_other_test", prefix=True)
    def method(ctx, arg):
        return list(range(0, len(ctx.layers) + 1, int(arg)))

    yield method
    del registry._METHODS["every_other_test"]


def test_a_registered_method_is_selectable_and_its_result_checked(every_other):
    ctx = PartitionContext(layers=[nn.ReLU()] * 6, num_stages=3)
    assert get_partition_method("every_other_test:2")(ctx) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="'every_other_test:3' gives 2 stage"):
        get_partition_method("every_other_test:3")(ctx)
    with pytest.raises(ValueError, match="already registered"):
        register_partition_method("every_other_test")(lambda ctx, arg: [0, 6])


# ---- DeepSpeed's methods keep DeepSpeed's results -------------------------------------------------------------------


def deepspeed_parts(layers, num_stages: int, method: str) -> list[int]:
    """DeepSpeed's own ``_partition_layers`` on a PipelineModule that has not built anything (no process group)."""
    module = deepspeed.pipe.PipelineModule.__new__(deepspeed.pipe.PipelineModule)
    nn.Module.__init__(module)
    module._layer_specs = list(layers)
    module.num_stages = num_stages
    module._topo = PipeDataParallelTopology(num_pp=num_stages, num_dp=1)
    module.global_rank = num_stages - 1  # not rank 0: DeepSpeed prints its layer list on rank 0
    module.loss_fn = None
    module._partition_layers(method=method)
    return [int(b) for b in module.parts]


@functools.cache
def layer_lists():
    spec = deepspeed.pipe.LayerSpec
    return {
        "alexnet": build_layers("alexnet"),
        "specs": [spec(nn.Linear, 8, 8), spec(nn.ReLU), spec(nn.Linear, 8, 64), spec(nn.Linear, 64, 2), spec(nn.ReLU)],
        "with_function": [nn.Linear(4, 4), lambda x: x * 2, nn.ReLU(), nn.Linear(4, 16), nn.Linear(16, 4)],
    }


DEEPSPEED_CASES = [
    (name, method)
    for name in ("alexnet", "specs", "with_function")
    for method in ("uniform", "parameters", "type:linear", "type:Linear|relu")
] + [("alexnet", "type:conv")]


@pytest.mark.parametrize(("name", "method"), DEEPSPEED_CASES)
def test_deepspeed_methods_give_deepspeeds_exact_result(name, method):
    layers = layer_lists()[name]
    for stages in range(1, len(layers) + 1):
        torch.manual_seed(0)
        theirs = deepspeed_parts(layers, stages, method)
        theirs_rng = torch.get_rng_state()
        torch.manual_seed(0)
        ours = get_partition_method(method)(PartitionContext(layers, stages))
        assert ours == theirs, (name, method, stages)
        assert torch.equal(torch.get_rng_state(), theirs_rng)  # same random draws: same weights afterwards


# ---- manual and weighted types ------------------------------------------------------------------------------------


def test_manual_boundaries():
    ctx = PartitionContext(build_layers("alexnet"), 3)
    assert get_partition_method("manual:0,9,15,22")(ctx) == [0, 9, 15, 22]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("manual:0,9,x", "comma-separated integers"),
        ("manual:0,9,22", "gives 2 stage.*has 3"),
        ("manual:1,9,15,22", "start at 0"),
        ("manual:0,9,15,21", "end at 22"),
        ("manual:0,15,9,22", "15 is followed by 9"),
        ("manual:0,9,9,22", "9 is followed by 9"),
    ],
)
def test_manual_errors_name_the_problem(spec, message):
    ctx = PartitionContext(build_layers("alexnet"), 3)
    with pytest.raises(ValueError, match=message):
        get_partition_method(spec).check(ctx)


def test_weighted_types_sum_the_weights_a_layer_matches():
    layers = build_layers("alexnet")
    names = [type(layer).__name__ for layer in layers]
    weights = [3 * (name == "Conv2d") + 1 * (name == "Linear") for name in names]
    for stages in (2, 3, 4):
        ctx = PartitionContext(layers, stages)
        assert get_partition_method("type:conv:3|linear:1")(ctx) == balance(weights, stages)
    # a layer matching two terms weighs their sum: ReLU matches "re" and "lu"
    relu_weights = [2.5 * (name == "ReLU") for name in names]
    assert get_partition_method("type:re:1|lu:1.5")(PartitionContext(layers, 3)) == balance(relu_weights, 3)


def test_type_errors_list_the_layer_types():
    ctx = PartitionContext(build_layers("alexnet"), 2)
    with pytest.raises(ValueError, match="'attention' matches no layer.*Conv2d.*Linear"):
        get_partition_method("type:attention:2|linear:1").check(ctx)
    with pytest.raises(ValueError, match="matches no layer"):
        get_partition_method("type:attention").check(ctx)
    with pytest.raises(ValueError, match="finite number"):
        get_partition_method("type:conv:-1").check(ctx)


# ---- flops and memory ---------------------------------------------------------------------------------------------


def whole_model_flops(model: nn.Module, sample: torch.Tensor) -> tuple[int, int]:
    """PyTorch's count of the forward and the backward FLOPs of ``model`` on ``sample``, all in one piece."""
    with FlopCounterMode(display=False) as forward:
        out = model(sample)
    with FlopCounterMode(display=False) as backward:
        out.sum().backward()
    return forward.get_total_flops(), backward.get_total_flops()


def test_flops_per_layer_add_up_to_pytorchs_count_of_the_whole_model():
    layers = build_layers("alexnet", dropout=0.0)
    sample = torch.randn(2, 3, 64, 64)
    stats = PartitionContext(layers, 2, sample_input=sample).stats()
    forward, backward = whole_model_flops(nn.Sequential(*layers), sample)
    assert sum(stats.forward_flops) == forward > 0 and sum(stats.backward_flops) == backward > 0
    ctx = PartitionContext(layers, 3, sample_input=sample)
    totals = [f + b for f, b in zip(stats.forward_flops, stats.backward_flops)]
    assert get_partition_method("flops")(ctx) == balance(totals, 3)


def test_flops_count_a_tied_heads_backward_as_its_own():
    """The head shares the embedding's weight: its backward must not run on through the network to the embedding."""
    config = GPTConfig(vocab_size=32, seq_len=16, width=32, heads=4, layers=2)
    tokens = torch.zeros(2, config.seq_len, dtype=torch.long, device="meta")
    stats = PartitionContext(gpt_layers(config), 2, sample_input=tokens).stats()
    with torch.device("meta"):  # as the count runs: on CPU, PyTorch's counter has no formula for CPU attention
        forward, backward = whole_model_flops(GPT(config), tokens)
    assert sum(stats.forward_flops) == forward > 0 and sum(stats.backward_flops) == backward > 0
    assert stats.backward_flops[-1] == 2 * stats.forward_flops[-1]  # the gradients of its input and of the weight


def test_counting_leaves_modules_and_random_state_alone():
    layers = tiny_cnn()
    before = [t.clone() for layer in layers for t in layer.state_dict().values()]
    ctx = PartitionContext(layers, 2, sample_input=torch.randn(*TINY_INPUT), micro_batches=4)
    rng = torch.get_rng_state()
    for method in ("flops", "memory"):
        get_partition_method(method)(ctx)
    assert torch.equal(torch.get_rng_state(), rng)
    after = [t for layer in layers for t in layer.state_dict().values()]
    assert all(torch.equal(a, b) and b.device.type == "cpu" for a, b in zip(before, after))


def real_activation_bytes(layers, x, start, stop) -> int:
    """Bytes of the distinct storages a real run of layers start..stop-1 keeps: saved tensors, input, output."""
    parameters = {p.untyped_storage().data_ptr() for layer in layers for p in layer.parameters()}
    storages, alive = {}, []  # alive: a freed storage's address could be reused by a later one

    def keep(t):
        alive.append(t)
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    with torch.no_grad():
        for layer in layers[:start]:
            x = layer(x)
    x = x.detach().requires_grad_(start > 0).clone()
    keep(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: keep(t) or t, lambda t: t):
        for layer in layers[start:stop]:
            x = layer(x)
    keep(x)
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


def test_activation_bytes_match_the_tensors_a_real_run_keeps():
    layers = tiny_cnn()
    sample = torch.randn(*TINY_INPUT)
    stats = PartitionContext(layers, 2, sample_input=sample).stats()
    for start in range(len(layers)):
        for stop in range(start + 1, len(layers) + 1):
            assert stats.activation_bytes(start, stop) == real_activation_bytes(layers, sample, start, stop), (
                start,
                stop,
            )


@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("micro_batches", [1, 3, 8])
def test_activations_in_flight_follow_the_schedule(stages, micro_batches):
    def in_flight(schedule):
        return PartitionContext([nn.ReLU()] * 4, stages, micro_batches=micro_batches, schedule=schedule).in_flight()

    assert in_flight("1f1b") == [min(stages - s, micro_batches) for s in range(stages)]
    assert in_flight("deepspeed") == in_flight("1f1b")
    assert in_flight("gpipe") == [micro_batches] * stages


def memory_context(**overrides) -> PartitionContext:
    settings = dict(layers=tiny_cnn(), num_stages=3, sample_input=torch.randn(*TINY_INPUT), micro_batches=4)
    return PartitionContext(**{**settings, **overrides})


def test_memory_stage_bytes_are_static_plus_activations_in_flight():
    ctx = memory_context(schedule="gpipe", optimizer_state_bytes=12)
    stats, memory = ctx.stats(), ctx.stage_memory()
    layers = ctx.layers
    for stage, (start, stop) in enumerate([(0, 3), (3, 7), (7, 10)]):
        parameters = sum(p.numel() for layer in layers[start:stop] for p in layer.parameters())
        expected = parameters * (4 + 4 + 12) + 4 * stats.activation_bytes(start, stop)
        assert memory(stage, start, stop) == expected


def test_memory_without_budget_minimises_the_fullest_device():
    for schedule in ("1f1b", "gpipe"):
        ctx = memory_context(schedule=schedule)
        memory = ctx.stage_memory()
        assert get_partition_method("memory")(ctx) == brute_force(10, 3, memory)[1]


def test_memory_with_budget_is_the_fastest_split_that_fits():
    ctx = memory_context()
    memory, stats = ctx.stage_memory(), ctx.stats()
    flops = [f + b for f, b in zip(stats.forward_flops, stats.backward_flops)]
    smallest, _ = brute_force(10, 3, memory)
    for budget in (smallest, smallest * 1.2, smallest * 2, 1e12):

        def fastest_that_fits(s, a, b, budget=budget):
            return sum(flops[a:b]) if memory(s, a, b) <= budget else math.inf

        expected = brute_force(10, 3, fastest_that_fits)
        assert get_partition_method("memory")(memory_context(memory_budget=budget)) == expected[1]
    with pytest.raises(ValueError, match=f"smallest budget that fits is {smallest:.0f} bytes"):
        get_partition_method("memory")(memory_context(memory_budget=smallest - 1))


@pytest.mark.parametrize(
    ("method", "missing", "overrides"),
    [
        ("flops", "sample_input", {"sample_input": None}),
        ("memory", "sample_input", {"sample_input": None}),
        ("memory", "micro_batches", {"micro_batches": None}),
        ("profile", "sample_input", {"sample_input": None}),
        ("profile", "micro_batches", {"micro_batches": None}),
    ],
)
def test_methods_name_the_argument_they_miss(method, missing, overrides):
    with pytest.raises(ValueError, match=f"'{method}' needs {missing}="):
        get_partition_method(method).check(memory_context(**overrides))


def test_memory_rejects_a_nonsense_budget():
    with pytest.raises(ValueError, match="memory_budget must be a positive"):
        get_partition_method("memory").check(memory_context(memory_budget=-5))


# ---- profile --------------------------------------------------------------------------------------------------------


class FakeMeasure:
    """Stands in for timing: fixed per-layer seconds, and a count of how often it was asked."""

    def __init__(self, forward, cut=None):
        self.forward, self.cut, self.calls = forward, cut, 0

    def __call__(self, ctx):
        self.calls += 1
        n = len(self.forward)
        return LayerCosts(list(self.forward), [2 * f for f in self.forward], [0.0] * n, self.cut or [0.0] * n, "s")


def profile_context(measure, **overrides) -> PartitionContext:
    settings = dict(layers=[nn.Linear(4, 4) for _ in range(6)], num_stages=2, sample_input=torch.zeros(2, 4))
    return PartitionContext(**{**settings, "micro_batches": 4, "measure": measure, **overrides})


def test_profile_balances_measured_time_and_avoids_costly_cuts():
    assert get_partition_method("profile")(profile_context(FakeMeasure([1, 1, 1, 1, 1, 5]))) == [0, 5, 6]
    even = FakeMeasure([1.0] * 6)
    assert get_partition_method("profile")(profile_context(even)) == [0, 3, 6]
    expensive_middle = FakeMeasure([1.0] * 6, cut=[0, 0, 10, 0, 0, 0])  # cutting after layer 2 costs 2 x 10
    assert get_partition_method("profile")(profile_context(expensive_middle)) != [0, 3, 6]


def test_profile_cache_is_reused_only_for_the_same_setup(tmp_path):
    cache = tmp_path / "profile.json"
    first = FakeMeasure([1, 1, 1, 1, 1, 5])
    assert get_partition_method("profile")(profile_context(first, cache_path=cache)) == [0, 5, 6]
    assert first.calls == 1 and cache.exists()
    unused = FakeMeasure([5, 1, 1, 1, 1, 1])
    assert get_partition_method("profile")(profile_context(unused, cache_path=cache)) == [0, 5, 6]
    assert unused.calls == 0
    other_shape = FakeMeasure([5, 1, 1, 1, 1, 1])
    ctx = profile_context(other_shape, cache_path=cache, sample_input=torch.zeros(3, 4))
    assert get_partition_method("profile")(ctx) == [0, 1, 6]
    assert other_shape.calls == 1
    assert len(json.loads(cache.read_text())) == 2


def test_profile_remeasures_over_a_broken_cache(tmp_path):
    cache = tmp_path / "profile.json"
    cache.write_text("{not json")
    measure = FakeMeasure([1.0] * 6)
    with pytest.warns(UserWarning, match="unreadable profile cache"):
        assert get_partition_method("profile")(profile_context(measure, cache_path=cache)) == [0, 3, 6]
    assert measure.calls == 1


def test_measured_costs_are_real_and_leave_the_model_alone(single_rank_group):
    layers = tiny_cnn()
    before = [t.clone() for layer in layers for t in layer.state_dict().values()]
    ctx = PartitionContext(layers, 2, sample_input=torch.randn(*TINY_INPUT), micro_batches=4, repeats=2)
    rng = torch.get_rng_state()
    costs = measure_layer_costs(ctx)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(a, b) for a, b in zip(before, [t for layer in layers for t in layer.state_dict().values()]))
    has_parameters = [any(True for _ in layer.parameters()) for layer in layers]
    assert all(f > 0 for f in costs.forward)
    assert [s > 0 for s in costs.step] == has_parameters
    assert costs.cut == [0.0] * len(layers)  # one process: nothing to send
    assert len(costs.rounds) == 2 and costs.backward_input is None  # 1f1b: the backward is not split
    shared = get_partition_method("profile")(ctx)
    assert shared == balance(ctx.measured_costs().per_micro_batch(4), 2)


# ---- report -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_report_predicts_the_textbook_step_for_equal_stages(schedule):
    stages, micro_batches = 3, 5
    ctx = profile_context(FakeMeasure([0.5] * 6), num_stages=stages, micro_batches=micro_batches, schedule=schedule)
    bounds = get_partition_method("profile")(ctx)
    report = partition_report(ctx, bounds, "profile")
    forward, backward = 1.0, 2.0  # two layers of 0.5 s forward, 1 s backward per stage
    assert report.step_time == pytest.approx((micro_batches + stages - 1) * (forward + backward))
    assert report.bubble_fraction == pytest.approx((stages - 1) / (micro_batches + stages - 1))
    assert report.imbalance == pytest.approx(1.0)
    assert [stage.params for stage in report.stages] == [2 * 20] * 3


def test_report_describes_every_stage():
    layers = build_layers("alexnet")
    ctx = PartitionContext(layers, 2, sample_input=torch.zeros(2, 3, 64, 64), micro_batches=4)
    report = partition_report(ctx, [0, 13, 22], "manual:0,13,22")
    assert [stage.params for stage in report.stages] == [
        sum(p.numel() for layer in layers[a:b] for p in layer.parameters()) for a, b in ((0, 13), (13, 22))
    ]
    assert sum(stage.cost_share for stage in report.stages) == pytest.approx(1.0)
    assert report.cost_unit == "FLOP"
    text = report.format()
    assert "0-12" in text and "13-21" in text and "Conv2d x5" in text and "Linear x3" in text
    no_sample = partition_report(PartitionContext(layers, 2), [0, 13, 22], "manual:0,13,22")
    assert no_sample.step_time is None and no_sample.stages[0].memory_bytes is None


# ---- ds-pipe plan -------------------------------------------------------------------------------------------------


def test_plan_json_compares_methods_under_the_same_costs(capsys):
    methods = ["uniform", "parameters", "flops", "manual:0,12,22", "type:conv:3|linear:1"]
    args = ["plan", "--model", "alexnet", "--image-size", "64", "--micro-batch", "2", "--stages", "2"]
    assert main([*args, "--costs", "flops", "--methods", *methods, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert list(result) == methods
    assert result["uniform"]["boundaries"] == ds_utils.partition_uniform(22, 2)
    assert result["manual:0,12,22"]["boundaries"] == [0, 12, 22]
    stats = PartitionContext(build_layers("alexnet"), 2, sample_input=torch.zeros(2, 3, 64, 64)).stats()
    total = sum(stats.forward_flops) + sum(stats.backward_flops)
    for entry in result.values():
        assert sum(entry["stage_costs"]) == total
    assert min(entry["imbalance"] for entry in result.values()) == result["flops"]["imbalance"]


def test_plan_measures_in_one_process_and_says_so(capsys):
    args = ["plan", "--model", "alexnet", "--image-size", "64", "--micro-batch", "2", "--stages", "2", "--repeats", "1"]
    assert main([*args, "--methods", "uniform", "profile"]) == 0
    out = capsys.readouterr().out
    assert "one process" in out
    assert "uniform" in out and "profile" in out


def test_plan_rejects_an_unknown_method(capsys):
    assert main(["plan", "--image-size", "64", "--costs", "flops", "--methods", "sizes"]) == 2
    err = capsys.readouterr().err
    assert "unknown partition method 'sizes'" in err and "profile" in err
