"""The planner: its ranking against brute force over a small grid with fake costs, the budget it cannot meet, the
CLI's JSON, partition_method="auto" and schedule="auto" in a module, schedules that declare knobs; and the
measurements it stands on (robust to a disturbed round, the spread, the link)."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from dataclasses import replace
from functools import partial

import pytest
import torch
from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass
from launch import ROOT, launch, run_example, write_config
from torch import nn

from ds_pipe_ext import PipelineModule
from ds_pipe_ext.cli import main
from ds_pipe_ext.config import resolve_schedule
from ds_pipe_ext.models.examples import example_model
from ds_pipe_ext.observe.simulation import simulate
from ds_pipe_ext.partition import PartitionContext
from ds_pipe_ext.partition.costs import LayerCosts, LinkCosts, measure_layer_costs
from ds_pipe_ext.partition.report import predict_step
from ds_pipe_ext.planner import NoPlanFits, Plan, PlanSearch, PlanSpace, search_plans
from ds_pipe_ext.schedules import GPipeSchedule, available_schedules, get_schedule, register_schedule
from ds_pipe_ext.schedules import registry as schedule_registry
from ds_pipe_ext.schedules.instructions import BackwardWeightPass
from ds_pipe_ext.topology import divisors

#: Dyadic numbers, so that float sums are exact and ties are real ties in the solver and in brute force alike.
WEIGHTS = [0.5, 0.25, 1.0, 0.75, 0.125, 0.25]
CUT = [2**-6, 2**-5, 2**-7, 2**-6, 2**-8, 0.0]
STEP = [0.5, 0.0, 0.25, 0.25, 0.0, 0.125]
LINK = LinkCosts(send_latency=2**-10, send_per_byte=2**-30, allreduce_latency=2**-9, allreduce_per_byte=2**-28)


class FakeCosts:
    """Stands in for measuring: passes proportional to the micro-batch size (the sample's first dimension), fixed
    optimizer steps and cuts; counts the measurements per size."""

    def __init__(self):
        self.calls: Counter[int] = Counter()

    def __call__(self, ctx) -> LayerCosts:
        size = ctx.sample().shape[0]
        self.calls[size] += 1
        forward = [w * size for w in WEIGHTS]
        backward = [2 * f for f in forward]
        return LayerCosts(
            forward,
            backward,
            list(STEP),
            list(CUT),
            "s",
            backward_input=[b / 2 for b in backward],
            backward_weight=[b / 2 for b in backward],
            link=LINK,
        )


def layers() -> list[nn.Module]:
    return [nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)]


def sample_input(size: int) -> torch.Tensor:
    return torch.zeros(size, 16)


SCHEDULES = ["1f1b", "gpipe", "zb-h1"]


def template(measure=None) -> PartitionContext:
    return PartitionContext(layers(), 1, schedule="auto", measure=measure or FakeCosts())


def splits(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        yield [0, *cuts, n]


def worst(stage_cost, bounds: list[int]) -> float:
    """The largest ``stage_cost`` over the stages of ``bounds``."""
    return max(stage_cost(s, a, b) for s, (a, b) in enumerate(zip(bounds, bounds[1:])))


def brute_force(world: int, global_batch: int, budget: float) -> dict[tuple[int, int, str], dict]:
    """Every (stages, micro-batches, schedule) by exhaustive search over the splits: the fastest slowest stage
    among the splits that fit (lexicographically largest on ties), else the least memory."""
    measure, n, found = FakeCosts(), len(WEIGHTS), {}
    for stages in [k for k in divisors(world) if k <= n]:
        replicas = world // stages
        for micro_batches in divisors(global_batch // replicas):
            size = global_batch // (replicas * micro_batches)
            base = replace(template(measure), sample_input=partial(sample_input, size))
            for name in SCHEDULES:
                ctx = base.variant(
                    num_stages=stages, micro_batches=micro_batches, schedule=name, data_parallel_size=replicas
                )
                costs = ctx.measured_costs()
                memory = ctx.stage_memory(simulate(name, stages, micro_batches).peak_buffers)

                peak, slowest = partial(worst, memory), partial(worst, costs.stage_time(micro_batches))
                fitting = [bounds for bounds in splits(n, stages) if peak(bounds) <= budget]
                if fitting:
                    best = min(slowest(bounds) for bounds in fitting)
                    bounds = max(b for b in fitting if slowest(b) == best)
                else:
                    lightest = min(peak(bounds) for bounds in splits(n, stages))
                    bounds = max(b for b in splits(n, stages) if peak(b) == lightest)
                step = predict_step(ctx, bounds, costs)[0]
                found[(stages, micro_batches, name)] = {
                    "fits": bool(fitting),
                    "boundaries": bounds,
                    "step": step,
                    "peak": peak(bounds),
                }
    return found


def lightest_peak(world: int, global_batch: int) -> float:
    return min(entry["peak"] for entry in brute_force(world, global_batch, budget=0).values())


@pytest.fixture(scope="module")
def budget() -> float:
    """Half-way between the lightest and the heaviest combination's lightest split: some fit, some do not."""
    peaks = sorted(entry["peak"] for entry in brute_force(4, 8, budget=0).values())
    return peaks[len(peaks) // 2]


def test_the_ranking_is_brute_forces(budget):
    expected = brute_force(4, 8, budget)
    space = PlanSpace(world_size=4, global_batch=8, memory_budget=budget, schedules=SCHEDULES)
    search = search_plans(template(), space, sample_input)
    found = {(plan.stages, plan.micro_batches, plan.schedule): plan for plan in search.plans + search.over_budget}
    assert set(found) == set(expected)
    for key, plan in found.items():
        assert (plan in search.plans) == expected[key]["fits"], key
        assert plan.boundaries == expected[key]["boundaries"], key
        assert plan.step_time == expected[key]["step"], key
        assert plan.peak_memory == expected[key]["peak"], key
    fitting = sorted((entry["step"], key) for key, entry in expected.items() if entry["fits"])
    assert 0 < len(search.plans) < len(expected)
    assert [plan.step_time for plan in search.plans] == [step for step, _ in fitting]
    assert search.best().step_time == fitting[0][0]
    assert all(plan.peak_memory <= budget for plan in search.plans)
    assert [plan.peak_memory for plan in search.over_budget] == sorted(plan.peak_memory for plan in search.over_budget)


def test_costs_are_measured_once_per_micro_batch_size():
    measure = FakeCosts()
    search_plans(template(measure), PlanSpace(world_size=4, global_batch=8), sample_input)
    # 4 replicas x {1, 2} micro-batches, 2 x {1, 2, 4}, 1 x {1, 2, 4, 8}: sizes 1, 2, 4 and 8
    assert measure.calls == {1: 1, 2: 1, 4: 1, 8: 1}


def test_an_infeasible_budget_names_the_smallest_that_fits():
    smallest = lightest_peak(4, 8)
    space = PlanSpace(world_size=4, global_batch=8, memory_budget=smallest - 1, schedules=SCHEDULES)
    with pytest.raises(NoPlanFits, match=f"the smallest budget that fits is {smallest:.0f} bytes") as error:
        search_plans(template(), space, sample_input).best()
    assert error.value.smallest.peak_memory == smallest
    assert "raise the budget" in str(error.value)
    just_enough = search_plans(template(), replace(space, memory_budget=smallest), sample_input)
    assert just_enough.best().peak_memory == smallest


def test_what_cannot_be_formed_is_skipped_with_the_reason():
    space = PlanSpace(world_size=4, global_batch=6, stages=[1, 3, 4], micro_batches=[1, 4])
    search = search_plans(template(), space, sample_input)
    assert {(plan.stages, plan.micro_batches) for plan in search.plans} == {(4, 1)}
    assert any("3 does not divide the world of 4" in reason for reason in search.skipped)
    assert any("global batch 6 does not split over 4 replicas" in reason for reason in search.skipped)
    assert any("6 samples do not split into 4" in reason for reason in search.skipped)


VIRTUAL = [name for name in available_schedules() if getattr(get_schedule(name), "chunks", 1) > 1]


def test_virtual_stage_schedules_are_planned_over_all_their_stages():
    """Each virtual plan: the fastest split into ranks x chunks stages (brute force), the step the simulator
    predicts for it with the chunks, and per rank the memory of the chunks it holds; a shape a schedule refuses is
    skipped with the schedule's own reason."""
    search = search_plans(template(), PlanSpace(world_size=2, global_batch=8, schedules=VIRTUAL), sample_input)
    assert {plan.schedule for plan in search.plans} == set(VIRTUAL) and {plan.stages for plan in search.plans} == {2}
    one_rank = "schedule zb-v on 1 stages, 4 micro-batches: one rank has no bubble for chunks to shrink, only more work"
    assert one_rank in search.skipped
    assert any(r.startswith("schedule dualpipev on 2 stages, 2 micro-batches: ") for r in search.skipped)
    for plan in search.plans:
        assert plan.virtual_stages == 2 and len(plan.boundaries) == 5
        size = plan.micro_batch_size
        ctx = replace(template(), sample_input=partial(sample_input, size)).variant(
            num_stages=4, virtual_stages=2, micro_batches=plan.micro_batches, schedule=plan.schedule
        )
        costs = ctx.measured_costs()
        slowest = partial(worst, costs.stage_time(plan.micro_batches))
        assert slowest(plan.boundaries) == min(slowest(bounds) for bounds in splits(len(WEIGHTS), 4))
        assert (plan.step_time, plan.bubble) == predict_step(ctx, plan.boundaries, costs)
        assert plan.stage_memory == expected_rank_memory(ctx, plan)
    (plan,) = [p for p in search.plans if p.schedule == "zb-v" and p.micro_batches == 4]
    assert plan.script_flags()[-2:] == ["--virtual-stages", "2"] and plan.module_kwargs()["virtual_stages"] == 2
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def expected_rank_memory(ctx: PartitionContext, plan: Plan) -> list[float]:
    """Per rank: its chunks' parameters, gradients and optimizer state, plus the activation bytes of the fullest
    moment of the simulated step, counted instruction by instruction."""
    spans = list(zip(plan.boundaries, plan.boundaries[1:]))
    static, stats, layout = ctx.stage_memory([0] * 4), ctx.stats(), ctx.layout
    result = simulate(ctx.simulated_schedule(), 2, plan.micro_batches)
    memory = []
    for rank in (0, 1):
        held, fullest = Counter(), 0.0
        for event in (e for e in result.timeline if e.stage == rank):
            stage = layout.stage(rank, event.chunk)
            if event.instruction is ForwardPass:
                held[stage] += 1
            elif event.instruction in (BackwardPass, BackwardWeightPass):
                held[stage] -= 1
            fullest = max(fullest, sum(n * stats.activation_bytes(*spans[s]) for s, n in held.items()))
        memory.append(sum(static(s, *spans[s]) for s in (layout.stage(rank, 0), layout.stage(rank, 1))) + fullest)
    return memory


def test_a_virtual_plan_over_the_budget_takes_a_lighter_split_or_is_over_budget():
    space = PlanSpace(world_size=2, global_batch=8, stages=[2], micro_batches=[4], schedules=["interleaved-1f1b"])
    (free,) = search_plans(template(), space, sample_input).plans
    for budget in (free.peak_memory - 1, free.peak_memory / 4):
        search = search_plans(template(), replace(space, memory_budget=budget), sample_input)
        (plan,) = search.plans + search.over_budget
        assert plan.boundaries != free.boundaries
        assert (plan in search.plans) == (plan.peak_memory <= budget)
    assert search.over_budget  # a quarter of the fastest split's memory fits no split


def test_a_module_with_chunks_is_planned_with_the_schedules_that_run_them():
    def planned(chunks: int) -> PlanSearch:
        space = PlanSpace(world_size=2, global_batch=8, stages=[2], micro_batches=[4], virtual_stages=chunks)
        return search_plans(template(), space, sample_input)

    assert {plan.schedule for plan in planned(1).plans} == set(available_schedules()) - set(VIRTUAL)
    assert "schedule zb-v on 2 stages, 4 micro-batches: it runs 2 chunk(s) per rank, the module holds 1" in (
        planned(1).skipped
    )
    assert {plan.schedule for plan in planned(2).plans} == set(VIRTUAL)
    three = planned(3)
    assert {(plan.schedule, plan.virtual_stages) for plan in three.plans} == {
        ("interleaved-1f1b", 3),
        ("interleaved-zb", 3),
    }
    assert "schedule zb-v on 2 stages, 4 micro-batches: the v placement holds two chunks per rank, not 3" in (
        three.skipped
    )


def test_a_plan_says_how_to_run_it():
    plan = search_plans(template(), PlanSpace(world_size=2, global_batch=8, stages=[2]), sample_input).best()
    assert plan.ds_config() == {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.micro_batches,
        "pipeline": {"schedule": plan.schedule},
    }
    assert plan.module_kwargs()["partition_method"] == "manual:" + ",".join(map(str, plan.boundaries))
    command = example_model("alexnet").command(plan.world_size, 224, plan.script_flags())
    assert command.startswith("deepspeed --num_gpus 2 examples/alexnet_cifar/train.py --deepspeed_config ")
    assert f"-p 2 --partition {plan.partition_method} --schedule {plan.schedule}" in command
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# ---- schedules with knobs -------------------------------------------------------------------------------------------


@pytest.fixture
def knobbed_schedule():
    class Knobbed(GPipeSchedule):
        """GPipe, with a knob whose values the planner tries one by one."""

        @classmethod
        def variants(cls, stages, micro_batches):
            return [({"depth": depth}, type(f"Knobbed{depth}", (cls,), {"depth": depth})) for depth in (1, 2)]

    register_schedule("knobbed-test")(Knobbed)
    yield
    del schedule_registry._REGISTRY["knobbed-test"]


def test_a_schedule_that_declares_knobs_is_tried_with_each(knobbed_schedule):
    space = PlanSpace(world_size=2, global_batch=4, stages=[2], micro_batches=[2], schedules=["knobbed-test"])
    plans = search_plans(template(), space, sample_input).plans
    assert sorted(plan.knobs["depth"] for plan in plans) == [1, 2]
    assert all(plan.ds_config()["pipeline"] == {"schedule": "knobbed-test", **plan.knobs} for plan in plans)


# ---- ds-pipe plan --auto ---------------------------------------------------------------------------------------------


AUTO_SPACE = ["--auto", "--world", "2", "--global-batch", "8", "--model", "alexnet", "--image-size", "64"]
AUTO_ARGS = ["plan", *AUTO_SPACE, "--micro-batches", "2", "4", "--schedules", "1f1b", "gpipe", "zb-h1"]


def test_plan_auto_json_round_trips_and_is_the_librarys_search(monkeypatch, capsys):
    fake = FakeAlexNetCosts()
    monkeypatch.setattr("ds_pipe_ext.partition.costs.measure_layer_costs", fake)
    assert main([*AUTO_ARGS, "--memory-budget", "4GiB", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["budget"] == 4 * 2**30 and printed["plans"]
    assert [Plan.from_dict(entry).to_dict() for entry in printed["plans"]] == printed["plans"]
    example = example_model("alexnet")
    space = PlanSpace(2, 8, 4 * 2**30, micro_batches=[2, 4], schedules=["1f1b", "gpipe", "zb-h1"])
    ctx = PartitionContext(example.build_layers(64), 1, schedule="auto", measure=fake)
    expected = search_plans(ctx, space, lambda size: example.sample_input(size, 64))
    assert [Plan.from_dict(entry) for entry in printed["plans"]] == expected.plans


def test_plan_auto_lists_each_plan_with_its_command(monkeypatch, capsys):
    monkeypatch.setattr("ds_pipe_ext.partition.costs.measure_layer_costs", FakeAlexNetCosts())
    assert main([*AUTO_ARGS, "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "plans fit" in out and "memory per rank, by stage" in out
    assert out.count("DeepSpeed config keys") == 3
    assert out.count("deepspeed --num_gpus 2 examples/alexnet_cifar/train.py") == 3
    assert "slower plans that fit" in out


def test_plan_auto_names_the_budget_that_would_fit(monkeypatch, capsys):
    monkeypatch.setattr("ds_pipe_ext.partition.costs.measure_layer_costs", FakeAlexNetCosts())
    assert main([*AUTO_ARGS, "--memory-budget", "1MiB"]) == 2
    err = capsys.readouterr().err
    assert "no plan fits the memory budget of 1048576 bytes (1.0 MiB) per rank" in err
    assert "the smallest budget that fits is" in err


@pytest.mark.parametrize(("text", "message"), [("lots", "expected bytes"), ("0GiB", "must be positive")])
def test_plan_auto_rejects_a_budget_it_cannot_read(text, message, capsys):
    with pytest.raises(SystemExit):
        main([*AUTO_ARGS, "--memory-budget", text])
    assert message in capsys.readouterr().err


class FakeAlexNetCosts(FakeCosts):
    def __call__(self, ctx) -> LayerCosts:
        size, n = ctx.sample().shape[0], len(ctx.layers)
        self.calls[size] += 1
        forward = [0.001 * size * (1 + i % 4) for i in range(n)]
        return LayerCosts(forward, [2 * f for f in forward], [0.01] * n, [0.0] * n, "s")


# ---- in a module -----------------------------------------------------------------------------------------------------


def auto_module(schedule: str, memory_budget: float | None = None) -> PipelineModule:
    """A one-stage module partitioned by the planner, measuring real (tiny) layers."""
    layers = [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 5)]
    return PipelineModule(
        layers,
        num_stages=1,
        partition_method="auto",
        schedule=schedule,
        sample_input=lambda: torch.zeros(2, 3, 10, 10),
        micro_batches=2,
        memory_budget=memory_budget,
    )


def test_auto_module_picks_a_schedule_that_initialize_resolves(single_rank_group):
    module = auto_module("auto")
    assert module.schedule in available_schedules() and module.plan.schedule == module.schedule
    assert module.parts == module.plan.boundaries == [0, 6]
    assert module.partition_report.schedule == module.schedule
    assert resolve_schedule("auto", {}, module) == module.schedule
    assert resolve_schedule(None, {"pipeline": {"schedule": "auto"}}, module) == module.schedule
    other = next(name for name in available_schedules() if name != module.schedule)
    with pytest.raises(ValueError, match="named twice, differently"):
        resolve_schedule(other, {}, module)


def test_auto_module_keeps_a_named_schedule_and_its_budget(single_rank_group):
    module = auto_module("gpipe")
    assert module.schedule == "gpipe" and module.plan.schedule == "gpipe"
    with pytest.raises(NoPlanFits, match=f"smallest budget that fits is {module.plan.peak_memory:.0f} bytes"):
        auto_module("gpipe", memory_budget=module.plan.peak_memory - 1)


def test_schedule_auto_needs_the_auto_partition():
    with pytest.raises(ValueError, match="use partition_method='auto'"):
        PipelineModule([nn.ReLU(), nn.ReLU()], num_stages=1, partition_method="uniform", schedule="auto")
    with pytest.raises(ValueError, match="chosen by the planner together with the partition"):
        get_schedule("auto")


def test_resolve_schedule_defers_auto_until_a_module_chose():
    assert resolve_schedule("auto", {}) == "auto"

    class Unplanned:
        schedule = None

    with pytest.raises(ValueError, match="build the module with schedule='auto' and partition_method='auto'"):
        resolve_schedule("auto", {}, Unplanned())


# ---- the measurements the planner stands on -------------------------------------------------------------------------


class SlowOnce(nn.Module):
    """A layer whose forward takes 5 ms, but 300 ms once, in the second timed round: a disturbed round."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        time.sleep(0.3 if self.calls == 3 else 0.005)  # call 1 warms up, call 2 is round 0
        return x * 1.0


def test_one_disturbed_round_does_not_move_the_cost():
    ctx = PartitionContext([SlowOnce(), nn.Linear(4, 4)], 2, sample_input=torch.zeros(2, 4), repeats=5)
    costs = measure_layer_costs(ctx)
    assert max(times[0] for times in costs.rounds) > 0.25  # the disturbance was measured ...
    assert costs.forward[0] < 0.05  # ... and the median left it out (the spread of such tiny times is noise)


def test_split_schedules_measure_both_halves_of_the_backward():
    ctx = PartitionContext([nn.Linear(64, 64), nn.Linear(64, 64)], 2, sample_input=torch.zeros(8, 64), repeats=2)
    assert measure_layer_costs(ctx).backward_input is None
    split = measure_layer_costs(replace(ctx, schedule="zb-h1"))
    assert split.backward_input[0] == 0  # the first layer's input needs no gradient: its backward is all W
    assert all(value > 0 for value in split.backward_weight) and split.backward_input[1] > 0


def test_spread_is_the_interquartile_range_over_the_median():
    rounds = [[1.0, 1.0], [1.1, 1.0], [1.2, 1.0], [1.3, 1.0], [9.0, 1.0]]
    costs = replace(LayerCosts.counted([1.0, 1.0], [0.0, 0.0], "s"), rounds=rounds)
    assert costs.spread(0, 1) == pytest.approx((1.3 - 1.1) / 1.2)
    assert costs.spread(1, 2) == 0.0
    assert LayerCosts.counted([1.0], [1.0], "FLOP").spread(0, 1) is None


def test_all_reduce_scales_from_the_measured_group_like_a_ring():
    link = LinkCosts(send_latency=1e-4, send_per_byte=1e-9, allreduce_latency=1e-3, allreduce_per_byte=2e-9)
    assert link.allreduce(1e6, 1) == 0.0
    assert link.allreduce(1e6, 2) == pytest.approx(2 * 1e-4 + 1e6 * 1e-9)  # not measured: the send link, 2(r-1) hops
    measured = replace(link, allreduce_ranks=2)
    assert measured.allreduce(1e6, 2) == pytest.approx(1e-3 + 1e6 * 2e-9)
    assert measured.allreduce(1e6, 4) == pytest.approx(1e-3 + 1.5 * 1e6 * 2e-9)
    assert link.send(0) == 0.0 and link.send(1e3) == pytest.approx(1e-4 + 1e-6)


def test_variants_share_what_was_measured():
    measure = FakeCosts()
    ctx = replace(template(measure), sample_input=partial(sample_input, 4))
    for stages in (1, 2, 3):
        ctx.variant(num_stages=stages, micro_batches=2, schedule="gpipe").measured_costs()
    assert measure.calls == {4: 1}
    with pytest.raises(TypeError, match="changes only the plan"):
        ctx.variant(layers=[])


def test_the_step_ends_when_the_last_stage_has_stepped_and_all_reduced():
    ctx = replace(template(), sample_input=partial(sample_input, 2)).variant(
        num_stages=2, micro_batches=4, schedule="1f1b", data_parallel_size=2
    )
    costs, spans = ctx.measured_costs(), [(0, 3), (3, 6)]
    per_stage = lambda values: [sum(values[a:b]) for a, b in spans]
    sends = [costs.cut[2], costs.cut[2]]  # the one cut, sent forward by stage 0 and backward by stage 1
    passes = {"forward": per_stage(costs.forward), "backward": per_stage(costs.backward), "send": sends}
    passes.update(backward_input=per_stage(costs.backward_input), backward_weight=per_stage(costs.backward_weight))
    timeline = simulate("1f1b", 2, 4, costs=passes).timeline
    ends = [max(event.end for event in timeline if event.stage == stage) for stage in (0, 1)]
    grads = per_stage(ctx.stats().grad_bytes)
    tails = [step + LINK.allreduce(nbytes, 2) for step, nbytes in zip(per_stage(STEP), grads)]
    assert predict_step(ctx, [0, 3, 6], costs)[0] == pytest.approx(max(e + t for e, t in zip(ends, tails)))
    no_tails = replace(costs, step=[0.0] * 6)
    assert predict_step(ctx.variant(data_parallel_size=1), [0, 3, 6], no_tails)[0] == pytest.approx(max(ends))


# ---- on launched ranks ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_auto_measures_on_every_launched_rank(tmp_path):
    out = tmp_path / "plans.json"
    args = ["plan", *AUTO_SPACE, "--micro-batches", "2", "--schedules", "1f1b", "zb-h1", "--repeats", "2"]
    script = ROOT / "ds_pipe_ext" / "__main__.py"
    result = launch(script, [*args, "--out", str(out)], 2, launcher_args=["--no_local_rank"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("plans fit") == 1  # rank 0 prints
    assert "measured on 2 ranks at once (in situ)" in result.stdout
    plans = [Plan.from_dict(entry) for entry in json.loads(out.read_text())["plans"]]
    assert {plan.schedule for plan in plans} == {"1f1b", "zb-h1"} and all(plan.step_time > 0 for plan in plans)


@pytest.mark.slow
def test_the_example_trains_with_the_planners_choice(tmp_path):
    config = write_config(tmp_path / "ds_config.json", train_batch=16, micro_batch=4)
    args = ["--dataset", "synthetic", "--image-size", "64", "--steps", "2", "-p", "2"]
    record = run_example(tmp_path, "auto", 2, config, [*args, "--partition", "auto", "--schedule", "auto"])
    assert record["schedule"] in available_schedules()
    assert len(record["stage_boundaries"]) == 3 and len(record["steps"]) == 2
    assert "partition 'auto'" in record["stdout"]


def test_the_gpt_example_plans_from_its_layer_specs(capsys):
    """The tied embedding and head are specs the planner partitions like the example does; its command names
    the GPT script and the sequence length."""
    from ds_pipe_ext.models.gpt import GPTConfig

    example = example_model("gpt")
    assert (example.default_size, int(example.make_batch(64, 8, None)[0].max()) < GPTConfig.vocab_size) == (
        GPTConfig.seq_len,
        True,
    )
    inputs, labels = example.make_batch(3, 16, torch.Generator().manual_seed(0))
    assert inputs.shape == labels.shape == (3, 16) and torch.equal(inputs[:, 1:], labels[:, :-1])
    assert main(
        [
            "plan",
            "--model",
            "gpt",
            "--size",
            "16",
            "--auto",
            "--world",
            "2",
            "--global-batch",
            "8",
            "--micro-batches",
            "2",
            "--schedules",
            "1f1b",
            "--costs",
            "flops",
            "--json",
        ]
    ) in (0, None)
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert {plan["stages"] for plan in plans} == {1, 2}
    command = example.command(2, 16, ["-p", "2"])
    assert command.startswith("deepspeed --num_gpus 2 examples/gpt/train.py") and "--seq-len 16 -p 2" in command
