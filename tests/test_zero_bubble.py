"""ZB-H1: the schedule is valid, has the paper's bubble and 1F1B's memory bound; training with it matches 1F1B and the
1-stage run. The split backward itself is tested in ``test_split_backward.py``."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass
from launch import run_example
from test_training import layer_weights

from ds_pipe_ext.observe.simulation import ScheduleError, simulate, validate
from ds_pipe_ext.schedules import BackwardInputPass, ComputeOrderSchedule, Pass, get_schedule
from ds_pipe_ext.schedules.zero_bubble import SplitOneFOneBSchedule, ZBH1Schedule

GRID = [(stages, micro_batches) for stages in range(1, 7) for micro_batches in range(1, 13)]


# The schedule.


def test_zb_h1_is_registered():
    assert get_schedule("ZB-H1") is ZBH1Schedule
    assert get_schedule("1F1B-split") is SplitOneFOneBSchedule


def test_zb_h1_is_valid_over_the_grid():
    for stages, micro_batches in GRID:
        validate("zb-h1", stages, micro_batches)


def compute_order(schedule: str, stages: int, micro_batches: int, stage: int) -> list[tuple[str, int]]:
    """A stage's forwards and (input) backwards in the order it runs them, by micro-batch."""
    kinds = {ForwardPass: "F", BackwardPass: "B", BackwardInputPass: "B"}
    timeline = simulate(schedule, stages, micro_batches).timeline
    return [(kinds[e.instruction], e.micro_batch) for e in timeline if e.stage == stage and e.instruction in kinds]


@pytest.mark.parametrize("stages, micro_batches", [(2, 8), (4, 8), (4, 3), (5, 12)])
def test_forwards_and_b_passes_keep_1f1b_order(stages, micro_batches):
    for stage in range(stages):
        assert compute_order("zb-h1", stages, micro_batches, stage) == compute_order(
            "1f1b", stages, micro_batches, stage
        )


def test_equal_pass_times_give_the_papers_bubble():
    """(K-1)(T_F + T_B - T_W) idle per stage, against 1F1B's (K-1)(T_F + T_B + T_W) (Qi et al., section 2.1)."""
    for stages, micro_batches in GRID:
        if micro_batches < stages:
            continue
        zb = simulate("zb-h1", stages, micro_batches, {"forward": 1, "backward_input": 1, "backward_weight": 1})
        assert zb.makespan == 3 * micro_batches + (stages - 1)
        one_f_one_b = simulate("1f1b", stages, micro_batches, {"forward": 1, "backward": 2})
        assert one_f_one_b.makespan == 3 * micro_batches + 3 * (stages - 1)


def test_a_full_backward_cost_splits_into_equal_halves_unless_they_are_given():
    def makespan(**costs) -> float:
        return simulate("zb-h1", 3, 6, costs).makespan

    slow_last_w = [1.5, 1.5, 2.0]
    assert makespan(backward=3) == makespan(backward_input=1.5, backward_weight=1.5)
    assert makespan(backward=3, backward_weight=slow_last_w) == makespan(
        backward_input=1.5, backward_weight=slow_last_w
    )
    assert makespan(backward=3, backward_weight=slow_last_w) > makespan(backward=3)


def test_bubble_is_below_1f1b_everywhere_with_default_costs():
    for stages, micro_batches in GRID:
        zb, one_f_one_b = simulate("zb-h1", stages, micro_batches), simulate("1f1b", stages, micro_batches)
        if stages == 1:
            assert zb.bubble_fraction == one_f_one_b.bubble_fraction == 0
        else:
            assert zb.bubble_fraction < one_f_one_b.bubble_fraction


def peak_awaiting_b(timeline: list, stage: int) -> int:
    """Most micro-batches forwarded but not yet through B at once on ``stage``, from the simulated timeline."""
    waiting, peak = 0, 0
    for event in sorted((e for e in timeline if e.stage == stage), key=lambda e: e.start):
        waiting += {ForwardPass: 1, BackwardInputPass: -1}.get(event.instruction, 0)
        peak = max(peak, waiting)
    return peak


def test_memory_stays_within_1f1b_bounds():
    """As in the paper: per stage, activations awaiting B peak where 1F1B's do (K - s); counting those awaiting W
    too, every stage holds at most stage 0's 1F1B peak, and asks DeepSpeed for no more buffers than that."""
    for stages, micro_batches in GRID:
        zb, one_f_one_b = simulate("zb-h1", stages, micro_batches), simulate("1f1b", stages, micro_batches)
        for stage in range(stages):
            assert peak_awaiting_b(zb.timeline, stage) == one_f_one_b.peak_buffers[stage]
            assert zb.peak_buffers[stage] == max(one_f_one_b.peak_buffers)
            schedule = ZBH1Schedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
            assert schedule.num_pipe_buffers() == max(2, zb.peak_buffers[stage])


def test_1f1b_split_holds_1f1b_memory_on_every_stage_with_a_bubble_between_1f1b_and_zb_h1():
    for stages, micro_batches in GRID:
        validate("1f1b-split", stages, micro_batches)
        split, one_f_one_b = simulate("1f1b-split", stages, micro_batches), simulate("1f1b", stages, micro_batches)
        assert split.peak_buffers == one_f_one_b.peak_buffers
        for stage in range(stages):
            schedule = SplitOneFOneBSchedule(micro_batches=micro_batches, stages=stages, stage_id=stage)
            assert schedule.num_pipe_buffers() == max(2, split.peak_buffers[stage])
        if stages > 1 and micro_batches > 1:
            zb = simulate("zb-h1", stages, micro_batches)
            assert zb.bubble_fraction < split.bubble_fraction < one_f_one_b.bubble_fraction
    equal = {"forward": 1, "backward_input": 1, "backward_weight": 1}
    assert simulate("1f1b-split", 2, 8, equal).makespan == 26  # 1F1B: 27, ZB-H1: 25


def orders_within(micro_batches: int, cap: int) -> Iterator[list[Pass]]:
    """Every order of one stage's passes (each kind in micro-batch order, a micro-batch's F before its B before its
    W) that never holds more than ``cap`` micro-batches between their F and their W."""

    def extend(order: list[Pass], f: int, b: int, w: int) -> Iterator[list[Pass]]:
        if w == micro_batches:
            yield order
        if f < micro_batches and f - w < cap:
            yield from extend([*order, Pass("F", f)], f + 1, b, w)
        if b < f:
            yield from extend([*order, Pass("I", b)], f, b + 1, w)
        if w < b:
            yield from extend([*order, Pass("W", w)], f, b, w + 1)

    return extend([], 0, 0, 0)


def schedule_running(orders: tuple[list[Pass], ...], micro_batches: int) -> type[ComputeOrderSchedule]:
    """A schedule whose stage s runs ``orders[s]``, lowered as every compute order is."""

    class GivenOrders(ComputeOrderSchedule):
        def order(self):
            return orders[self.stage_id]

        def num_pipe_buffers(self) -> int:
            return micro_batches

    return GivenOrders


@pytest.mark.parametrize("stages, micro_batches", [(2, 4), (3, 3)])
@pytest.mark.parametrize("f, b, w", [(1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 1, 3)])
def test_within_1f1b_memory_per_stage_no_order_of_passes_beats_1f1b_split(stages, micro_batches, f, b, w):
    """Every order of passes holding at most 1F1B's K - s micro-batches on stage s, searched exhaustively, takes at
    least M(F+B+W) + (K-1)(F+B), and 1f1b-split takes exactly that. Unless W > F + B, that leaves more than half of
    1F1B's bubble: the per-stage memory bound and a halved bubble exclude each other (docs/zero_bubble.md)."""
    costs = {"forward": f, "backward_input": b, "backward_weight": w, "backward": b + w}
    caps = [min(stages - stage, micro_batches) for stage in range(stages)]
    makespans = []
    for orders in itertools.product(*(orders_within(micro_batches, cap) for cap in caps)):
        try:
            makespans.append(simulate(schedule_running(orders, micro_batches), stages, micro_batches, costs).makespan)
        except ScheduleError:  # orders whose sends and receives cross deadlock
            continue
    bound = micro_batches * (f + b + w) + (stages - 1) * (f + b)
    assert len(makespans) > 1
    assert min(makespans) == bound
    split, one_f_one_b = (simulate(name, stages, micro_batches, costs) for name in ("1f1b-split", "1f1b"))
    assert split.makespan == bound
    assert split.peak_buffers == one_f_one_b.peak_buffers == caps
    if w <= f + b:
        assert split.bubble_fraction > one_f_one_b.bubble_fraction / 2


# Training, under DeepSpeed's launcher: zb-h1 against the oracle runs of tests/conftest.py (fp32, dropout 0).

ZB_RUNS = {
    "zb-h1": (2, ["-p", "2", "--schedule", "zb-h1", "--partition", "manual:0,12,22"]),
    "zb-h1_pipe2_data2": (4, ["-p", "2", "--schedule", "zb-h1", "--partition", "uniform"]),
    "1f1b-split": (2, ["-p", "2", "--schedule", "1f1b-split", "--partition", "manual:0,12,22"]),
}


@pytest.fixture(scope="module")
def runs(oracle_runs, tmp_path_factory) -> dict[str, dict]:
    """The two zb-h1 runs, with the config and arguments the oracle's 1f1b run was given, and the oracle's runs."""
    reference = oracle_runs["1f1b"]
    same = ["--dataset", reference["dataset"], "--image-size", str(reference["image_size"])]
    same += ["--dropout", str(reference["dropout"]), "--seed", str(reference["seed"])]
    same += ["--steps", str(len(reference["steps"]))]
    tmp = tmp_path_factory.mktemp("zero_bubble")
    records = dict(oracle_runs)
    for name, (ranks, args) in ZB_RUNS.items():
        checkpoint = tmp / f"{name}_ckpt"
        config = reference["dir"] / "ds_config.json"
        records[name] = run_example(tmp, name, ranks, config, [*same, *args, "--save-dir", str(checkpoint)])
        records[name]["checkpoint"] = checkpoint
    return records


def losses(record: dict) -> list[float]:
    return [step["loss"] for step in record["steps"]]


@pytest.mark.slow
@pytest.mark.parametrize("run", ZB_RUNS)
@pytest.mark.parametrize("reference", ["1f1b", "one_stage"])
def test_zb_h1_losses_match_1f1b_and_one_stage(runs, run, reference):
    assert runs[run]["schedule"] == ZB_RUNS[run][1][3] and len(losses(runs[run])) >= 5
    torch.testing.assert_close(
        torch.tensor(losses(runs[run])), torch.tensor(losses(runs[reference])), rtol=1e-5, atol=0
    )


@pytest.mark.slow
@pytest.mark.parametrize("run", ZB_RUNS)
def test_zb_h1_final_weights_match_the_run_that_sums_gradients_alike(runs, run):
    """Per tensor, in norm, as tests/test_training.py compares, against 1f1b on one replica (8 micro-batches
    summed) or the 1-stage run on two (4 each, all-reduced): summed in another order, the last bits differ, and
    Adam turns that into up to ~3e-5 on weights whose gradient is ~0."""
    reference = "1f1b" if runs[run]["data_parallel_size"] == 1 else "one_stage"
    weights, expected = layer_weights(runs[run]["checkpoint"]), layer_weights(runs[reference]["checkpoint"])
    assert expected and weights.keys() == expected.keys()
    for key, tensor in weights.items():
        relative = (tensor - expected[key]).norm() / expected[key].norm()
        assert relative <= 1e-5, f"{key}: {relative:.2e}"
