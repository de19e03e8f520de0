"""Gradient-accumulation scaling is right for every schedule (DeepSpeed's own regression test)."""

from __future__ import annotations

import json

import pytest
from launch import ROOT, launch

from ds_pipe_ext.schedules import available_schedules


@pytest.mark.slow
def test_first_weight_becomes_one_minus_two_lr_for_every_schedule():
    schedules = ["deepspeed", *available_schedules()]
    result = launch(ROOT / "tests" / "scripts" / "grad_accum_scaling.py", schedules, ranks=2, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = [json.loads(line.split("]: ", 1)[-1]) for line in result.stdout.splitlines() if '"first_weight"' in line]
    weights = {line["schedule"]: line["first_weight"] for line in lines}
    assert weights.keys() == set(schedules)
    for schedule, weight in weights.items():
        assert weight == pytest.approx(1 - 2 * 0.1, abs=1e-6), schedule
