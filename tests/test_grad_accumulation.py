"""Gradient-accumulation scaling is right for every schedule (DeepSpeed's own regression test), and gradient
clipping sees the norm over all stages."""

from __future__ import annotations

import json
import math

import pytest
from launch import ROOT, launch

from ds_pipe_ext.schedules import available_schedules


@pytest.mark.slow
def test_first_weight_becomes_one_minus_two_lr_for_every_schedule():
    schedules = available_schedules()  # "deepspeed" included
    result = launch(ROOT / "tests" / "scripts" / "grad_accum_scaling.py", schedules, ranks=2, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [json.loads(line.split("]: ", 1)[-1]) for line in result.stdout.splitlines() if '"first_weight"' in line]
    weights = {(line["schedule"], line["clipping"]): line["first_weight"] for line in lines}
    assert weights.keys() == {(schedule, clipping) for schedule in schedules for clipping in (0.0, 1.0)}
    for (schedule, clipping), weight in weights.items():
        # Without clipping: 1 - 2 x lr. Clipped to norm 1: the norm over both stages' gradients (2, 2) is 2 sqrt 2.
        expected = 1 - 0.1 * 2 if clipping == 0 else 1 - 0.1 * 2 / (2 * math.sqrt(2))
        assert weight == pytest.approx(expected, abs=1e-6), (schedule, clipping)
