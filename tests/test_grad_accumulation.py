"""Gradient-accumulation scaling is right for every schedule (DeepSpeed's own regression test), and gradient
clipping sees the norm over all stages."""

from __future__ import annotations

import json
import math

import pytest
from launch import ROOT, launch

from ds_pipe_ext.compat import stock_pipeline_gradient_scale
from ds_pipe_ext.schedules import available_schedules, get_schedule


def expected_first_weight(schedule: str, clipping: float) -> float:
    """Every weight's gradient is 2 per micro-batch; ds_pipe_ext's schedules average the micro-batches on every
    DeepSpeed release, DeepSpeed's own engine scales them as its release does (a sum before 0.18.3). A schedule
    with two chunks per rank runs four layers and four micro-batches; each share is per weight and micro-batch."""
    layers = micro_batches = 2 * getattr(get_schedule(schedule), "chunks", 1)
    if schedule == "deepspeed":
        scale = stock_pipeline_gradient_scale(stages=2, accumulation_steps=2)
    else:
        scale = [1 / micro_batches] * layers
    grads = [2 * micro_batches * share for share in scale]
    norm = math.hypot(*grads)
    if 0 < clipping < norm:
        grads = [grad * clipping / norm for grad in grads]
    return 1 - 0.1 * grads[0]


def test_the_expected_weights_are_one_minus_two_lr_and_its_clipped_value():
    # Without clipping: 1 - 2 x lr. Clipped to norm 1: the norm over both stages' gradients (2, 2) is 2 sqrt 2.
    assert expected_first_weight("1f1b", 0.0) == pytest.approx(1 - 0.1 * 2)
    assert expected_first_weight("1f1b", 1.0) == pytest.approx(1 - 0.1 * 2 / (2 * math.sqrt(2)))
    assert expected_first_weight("interleaved-1f1b", 1.0) == pytest.approx(1 - 0.1 * 2 / (2 * math.sqrt(4)))


@pytest.mark.slow
def test_first_weight_becomes_one_minus_two_lr_for_every_schedule():
    schedules = available_schedules()  # "deepspeed" included
    result = launch(ROOT / "tests" / "scripts" / "grad_accum_scaling.py", schedules, ranks=2, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [json.loads(line.split("]: ", 1)[-1]) for line in result.stdout.splitlines() if '"first_weight"' in line]
    weights = {(line["schedule"], line["clipping"]): line["first_weight"] for line in lines}
    assert weights.keys() == {(schedule, clipping) for schedule in schedules for clipping in (0.0, 1.0)}
    for (schedule, clipping), weight in weights.items():
        assert weight == pytest.approx(expected_first_weight(schedule, clipping), abs=1e-6), (schedule, clipping)
