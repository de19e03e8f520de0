"""The topology helpers agree with DeepSpeed's ``ProcessTopology`` and with a row-major brute force."""

from __future__ import annotations

import ast
import itertools
import re

import pytest
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeModelDataParallelTopology, ProcessTopology

from ds_pipe_ext.cli import main
from ds_pipe_ext.topology import (
    allreduce_groups,
    describe,
    make_topology,
    pipeline_groups,
    pipeline_links,
    pipeline_neighbors,
    ranks_of_stage,
    replica_of,
    stage_of,
)

MAX_WORLD = 16


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


#: Every (world, pipe, data, model) that fills a world of 1..MAX_WORLD ranks exactly.
LAYOUTS = [
    (world, pipe, world // model // pipe, model)
    for world in range(1, MAX_WORLD + 1)
    for model in divisors(world)
    for pipe in divisors(world // model)
]


def row_major_rank(coord: dict[str, int], axes: list[str], dims: dict[str, int]) -> int:
    rank = 0
    for axis in axes:
        rank = rank * dims[axis] + coord[axis]
    return rank


@pytest.mark.parametrize(("world", "pipe", "data", "model"), LAYOUTS)
def test_make_topology_is_deepspeeds_own_layout(world: int, pipe: int, data: int, model: int) -> None:
    if model == 1:
        expected = PipeDataParallelTopology(num_pp=pipe, num_dp=data)
    else:
        expected = PipeModelDataParallelTopology(num_pp=pipe, num_mp=model, num_dp=data)
    for given_data in (None, data):
        topo = make_topology(world, pipe, given_data, model)
        assert type(topo) is type(expected)
        assert topo.get_axis_names() == expected.get_axis_names()
        assert topo.mapping == expected.mapping
        assert topo.world_size() == world


@pytest.mark.parametrize("data_outermost", [False, True], ids=["deepspeed-order", "data-outermost"])
@pytest.mark.parametrize(("world", "pipe", "data", "model"), LAYOUTS)
def test_lookups_match_row_major_brute_force(
    world: int, pipe: int, data: int, model: int, data_outermost: bool
) -> None:
    dims = {"pipe": pipe, "data": data, "model": model}
    axes = ["data", "pipe", "model"] if data_outermost else ["pipe", "data", "model"]
    topo = ProcessTopology(axes=axes, dims=[dims[axis] for axis in axes])

    def rank(stage: int, replica: int, slice_: int) -> int:
        return row_major_rank({"pipe": stage, "data": replica, "model": slice_}, axes, dims)

    coords = list(itertools.product(range(pipe), range(data), range(model)))
    for stage, replica, slice_ in coords:
        r = rank(stage, replica, slice_)
        assert stage_of(topo, r) == stage
        assert replica_of(topo, r) == replica
        previous = rank(stage - 1, replica, slice_) if stage > 0 else None
        following = rank(stage + 1, replica, slice_) if stage < pipe - 1 else None
        assert pipeline_neighbors(topo, r) == (previous, following)
    for stage in range(pipe):
        assert sorted(ranks_of_stage(topo, stage)) == sorted(
            rank(stage, d, m) for d in range(data) for m in range(model)
        )

    expected_allreduce = {tuple(rank(p, d, m) for d in range(data)) for p in range(pipe) for m in range(model)}
    assert {tuple(group) for group in allreduce_groups(topo)} == expected_allreduce
    assert len(allreduce_groups(topo)) == pipe * model
    expected_pipelines = {tuple(rank(p, d, m) for p in range(pipe)) for d in range(data) for m in range(model)}
    assert {tuple(group) for group in pipeline_groups(topo)} == expected_pipelines
    expected_links = {
        (rank(p, d, m), rank(p + 1, d, m)) for p in range(pipe - 1) for d in range(data) for m in range(model)
    }
    assert set(pipeline_links(topo)) == expected_links
    assert len(pipeline_links(topo)) == len(expected_links)


def test_lookups_reject_ranks_and_stages_outside_the_topology() -> None:
    topo = make_topology(8, 4)
    with pytest.raises(ValueError, match="stages 0..3"):
        ranks_of_stage(topo, 4)
    with pytest.raises(ValueError, match="stages 0..3"):
        ranks_of_stage(topo, -1)
    with pytest.raises(ValueError, match="rank 8"):
        pipeline_neighbors(topo, 8)


def test_pipe_that_does_not_divide_the_world_names_the_valid_sizes() -> None:
    with pytest.raises(ValueError) as error:
        make_topology(4, 3)
    assert (
        str(error.value)
        == "pipeline size 3 does not divide world size 4; valid pipeline sizes for world size 4: 1, 2, 4"
    )


def _listed_sizes(message: str) -> list[int]:
    return [int(size) for size in message.rsplit(": ", 1)[1].split(", ")]


def _fits(world: int, pipe: int, data: int | None = None, model: int = 1) -> bool:
    return world % (pipe * model) == 0 and (data is None or pipe * data * model == world)


@pytest.mark.parametrize("world", range(1, MAX_WORLD + 1))
def test_every_bad_layout_names_exactly_the_sizes_that_fit(world: int) -> None:
    for model, pipe in itertools.product(range(1, world + 2), range(1, world + 2)):
        if _fits(world, pipe, model=model):
            continue
        with pytest.raises(ValueError) as error:
            make_topology(world, pipe, model=model)
        message = str(error.value)
        if world % model:
            assert message.startswith(f"model size {model} does not divide world size {world};")
            assert _listed_sizes(message) == [m for m in range(1, world + 1) if world % m == 0]
        else:
            assert message.startswith(f"pipeline size {pipe} does not divide world size {world}")
            valid = _listed_sizes(message)
            assert valid == [p for p in range(1, world + 1) if _fits(world, p, model=model)]
            for fitting_pipe in valid:
                make_topology(world, fitting_pipe, model=model)

    for pipe, data in itertools.product(divisors(world), range(1, world + 2)):
        if _fits(world, pipe, data):
            continue
        with pytest.raises(ValueError, match=f"not world size {world};") as error:
            make_topology(world, pipe, data)
        fitting_data = int(re.search(r"the data size must be (\d+)", str(error.value)).group(1))
        assert make_topology(world, pipe, fitting_data).mapping == make_topology(world, pipe).mapping


@pytest.mark.parametrize(
    ("sizes", "name"),
    [
        ({"world_size": 0, "pipe": 1}, "world size"),
        ({"world_size": 4, "pipe": 0}, "pipeline size"),
        ({"world_size": 4, "pipe": -2}, "pipeline size"),
        ({"world_size": 4, "pipe": 2, "data": 0}, "data size"),
        ({"world_size": 4, "pipe": 2, "model": 0}, "model size"),
    ],
)
def test_sizes_below_one_are_rejected(sizes: dict[str, int], name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} must be at least 1"):
        make_topology(**sizes)


def _section(text: str, title: str) -> list[str]:
    """The indented lines under the line starting with ``title``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    return list(itertools.takewhile(lambda line: line.startswith("  "), lines[start + 1 :]))


def test_describe_two_nodes_marks_the_traffic_that_crosses() -> None:
    # world 8 = 4 stages x 2 replicas, ranks 0-3 on node 0 and 4-7 on node 1: stages 0-1 on node 0, 2-3 on node 1.
    text = describe(make_topology(8, 4), ranks_per_node=4)

    grid = text.split("\n\n")[1].splitlines()[1:]
    assert len(grid) == 4
    for stage, row in enumerate(grid):
        cells = re.findall(r"(\d+) @n(\d+)", row)
        assert [(int(r), int(node)) for r, node in cells] == [(2 * stage + d, (2 * stage + d) // 4) for d in range(2)]

    # Each replica's pipeline crosses between stage 1 and stage 2, nowhere else.
    assert _section(text, "pipeline send/receive links") == [
        "  replica 0: 0 -> 2 => 4 -> 6",
        "  replica 1: 1 -> 3 => 5 -> 7",
    ]
    allreduce = _section(text, "gradient all-reduce groups")
    assert [line.split(": ")[1] for line in allreduce] == ["0, 1", "2, 3", "4, 5", "6, 7"]
    assert not any("crosses" in line for line in allreduce)

    # Data outermost would put each replica's whole pipeline on one node and spread every all-reduce over both.
    comparison = _section(text, "crossing nodes (4 ranks per node)")
    assert re.fullmatch(r"\s+gradient all-reduce groups\s+0 of 4\s+4 of 4 \(8 inter-node ring hops\)", comparison[0])
    assert re.fullmatch(r"\s+pipeline links\s+2 of 6\s+0 of 6", comparison[1])
    assert text.splitlines()[-1].startswith("recommendation: keep ['pipe', 'data']: it sends less gradient all-reduce")


def test_describe_recommends_deepspeeds_order_over_data_outermost() -> None:
    data_outermost = ProcessTopology(axes=["data", "pipe"], dims=[2, 4])
    text = describe(data_outermost, ranks_per_node=4)
    assert _section(text, "gradient all-reduce groups")[0].endswith("crosses nodes n0, n1")
    suggestion = re.search(r"use ProcessTopology\(axes=(\[.*?\]), dims=(\[.*?\])\)", text)
    axes, dims = ast.literal_eval(suggestion.group(1)), ast.literal_eval(suggestion.group(2))
    assert ProcessTopology(axes=axes, dims=dims).mapping == make_topology(8, 4).mapping


@pytest.mark.parametrize(("world", "pipe", "data", "model"), [layout for layout in LAYOUTS if layout[0] in (8, 12, 16)])
@pytest.mark.parametrize("ranks_per_node", [2, 4])
def test_describe_counts_crossings_like_brute_force(
    world: int, pipe: int, data: int, model: int, ranks_per_node: int
) -> None:
    text = describe(make_topology(world, pipe, data, model), ranks_per_node)
    rows = {line.split("  ")[1]: line for line in _section(text, "crossing nodes")}
    dims = {"pipe": pipe, "data": data, "model": model}

    def counts(axes: list[str]) -> dict[str, str]:
        def rank(p: int, d: int, m: int) -> int:
            return row_major_rank({"pipe": p, "data": d, "model": m}, axes, dims)

        def crossing(groups: list[list[int]]) -> str:
            return f"{sum(len({r // ranks_per_node for r in g}) > 1 for g in groups)} of {len(groups)}"

        links = [[rank(p, d, m), rank(p + 1, d, m)] for p in range(pipe - 1) for d in range(data) for m in range(model)]
        grads = [[rank(p, d, m) for d in range(data)] for p in range(pipe) for m in range(model)]
        return {"pipeline links": crossing(links), "gradient all-reduce groups": crossing(grads)}

    ours, theirs = counts(["pipe", "data", "model"]), counts(["data", "pipe", "model"])
    for name, row in rows.items():
        if name in ours:
            assert re.findall(r"\d+ of \d+", row) == [ours[name], theirs[name]]
    assert ("pipeline links" in rows) == (pipe > 1)
    assert ("gradient all-reduce groups" in rows) == (data > 1)


def test_describe_without_nodes_has_no_crossing_marks() -> None:
    text = describe(make_topology(16, 2, model=2))
    assert "=>" not in text and "crosses" not in text and "recommendation" not in text
    assert _section(text, "model-parallel groups")[0] == "  stage 0, replica 0: 0, 1"


def test_describe_rejects_bad_ranks_per_node_and_missing_axes() -> None:
    with pytest.raises(ValueError, match="ranks per node"):
        describe(make_topology(8, 4), ranks_per_node=0)
    with pytest.raises(ValueError, match="'pipe' and 'data' axes"):
        describe(ProcessTopology(axes=["pipe", "model"], dims=[2, 2]))


def test_cli_prints_describe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topo", "--world", "8", "--pipe", "4", "--ranks-per-node", "4"]) == 0
    assert capsys.readouterr().out == describe(make_topology(8, 4), ranks_per_node=4) + "\n"
    assert main(["topo", "--world", "8", "--pipe", "2", "--data", "2", "--model", "2"]) == 0
    assert capsys.readouterr().out == describe(make_topology(8, 2, 2, 2)) + "\n"


@pytest.mark.parametrize(
    ("argv", "cause"),
    [
        (["--world", "4", "--pipe", "3"], "pipeline size 3 does not divide world size 4"),
        (["--world", "8", "--pipe", "2", "--data", "3"], "the data size must be 4"),
        (["--world", "8", "--pipe", "2", "--ranks-per-node", "0"], "ranks per node must be at least 1"),
    ],
)
def test_cli_bad_layout_exits_2_with_the_message(
    argv: list[str], cause: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["topo", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert cause in captured.err
