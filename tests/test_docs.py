"""The README and docs are true: their code runs and prints what they say, their links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ds_pipe_ext import schedules
from ds_pipe_ext.observe import simulation
from ds_pipe_ext.partition import PartitionContext, get_partition_method
from ds_pipe_ext.partition import registry as partition_registry
from ds_pipe_ext.schedules import registry as schedule_registry

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def python_block(marker: str) -> str:
    blocks = [
        block
        for page in PAGES
        for block in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
        if marker in block
    ]
    assert len(blocks) == 1, marker
    return blocks[0]


@pytest.fixture
def clean_registries():
    saved = dict(schedule_registry._REGISTRY), dict(partition_registry._METHODS)
    yield
    schedule_registry._REGISTRY.clear(), schedule_registry._REGISTRY.update(saved[0])
    partition_registry._METHODS.clear(), partition_registry._METHODS.update(saved[1])


def test_the_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    assert "bash examples/alexnet_cifar/quickstart.sh" in text and "bash .ci/run" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_and_quoted_results_exist(page):
    text = page.read_text()
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith("http"):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
    for results in re.findall(r"`((?:bench/results/)?[a-z_]+\.md)`", text):
        if "results" in results or page == README:
            assert (ROOT / "bench" / "results" / Path(results).name).exists(), f"{page.name} quotes {results}"


def test_the_sequential_schedule_registers_and_validates(clean_registries):
    exec(python_block('@register_schedule("sequential")'), {})
    assert "sequential" in schedules.available_schedules()
    for stages in range(1, 5):
        for micro_batches in range(1, 6):
            simulation.validate("sequential", stages, micro_batches)
    result = simulation.simulate("sequential", 4, 8)
    assert result.peak_buffers == [1, 1, 1, 1] and result.bubble_fraction == pytest.approx(0.75)


def test_the_architecture_pages_schedule_is_valid(clean_registries):
    exec(python_block('@register_schedule("forward-order-gpipe")'), {})
    simulation.validate("forward-order-gpipe", 4, 8)


def test_the_architecture_pages_partition_method_balances(clean_registries):
    exec(python_block('@register_partition_method("depth")'), {})
    ctx = PartitionContext(layers=[object()] * 10, num_stages=3)
    bounds = get_partition_method("depth")(ctx)
    assert bounds[0] == 0 and bounds[-1] == 10 and len(bounds) == 4


def test_the_simulation_numbers():
    block = python_block("r.bubble_fraction, r.makespan, r.peak_buffers")
    namespace: dict = {}
    exec(block.split("r.bubble_fraction")[0], namespace)
    r = namespace["r"]
    assert (round(r.bubble_fraction, 4), r.makespan, r.peak_buffers) == (0.2727, 33, [4, 3, 2, 1])
