"""The README's code is true: its examples run and print what it says."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ds_pipe_ext import partition, schedules

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_block(marker: str) -> str:
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, flags=re.S) if marker in b]
    assert len(blocks) == 1, marker
    return blocks[0]


@pytest.fixture
def clean_registries():
    saved = dict(schedules._REGISTRY), dict(partition._METHODS)
    yield
    schedules._REGISTRY.clear(), schedules._REGISTRY.update(saved[0])
    partition._METHODS.clear(), partition._METHODS.update(saved[1])


def test_readme_schedule_registers_and_validates(clean_registries):
    exec(python_block('@register_schedule("sequential")'), {})
    assert "sequential" in schedules.available_schedules()
    for stages in range(1, 5):
        for micro_batches in range(1, 6):
            schedules.validate("sequential", stages, micro_batches)
    result = schedules.simulate("sequential", 4, 8)
    assert result.peak_buffers == [1, 1, 1, 1] and result.bubble_fraction == pytest.approx(0.75)


def test_readme_partition_method_registers_and_balances(clean_registries):
    exec(python_block('@register_partition_method("depth")'), {})
    ctx = partition.PartitionContext(layers=[object()] * 10, num_stages=3)
    bounds = partition.get_partition_method("depth")(ctx)
    assert bounds[0] == 0 and bounds[-1] == 10 and len(bounds) == 4


def test_readme_simulation_numbers():
    block = python_block("r.bubble_fraction, r.makespan, r.peak_buffers")
    namespace: dict = {}
    exec(block.split("r.bubble_fraction")[0], namespace)
    r = namespace["r"]
    assert (round(r.bubble_fraction, 4), r.makespan, r.peak_buffers) == (0.2727, 33, [4, 3, 2, 1])
