"""``ds_pipe_ext.initialize``: one resolution of the schedule, and delegation to ``deepspeed.initialize``."""

from __future__ import annotations

import hashlib
import inspect
import re

import deepspeed
import pytest
import torch
from deepspeed.runtime.pipe.engine import PipelineEngine
from torch import nn

import ds_pipe_ext
from ds_pipe_ext.config import resolve_schedule
from ds_pipe_ext.engine import SchedulePipelineEngine
from ds_pipe_ext.schedules import GPipeSchedule, ZBH1Schedule

REGISTERED = "1f1b, 1f1b-split, deepspeed, dualpipev, gpipe, interleaved-1f1b, interleaved-zb, zb-h1, zb-v"

CONFIG = {
    "train_batch_size": 4,
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
    "steps_per_print": 10**6,
}


class Module:
    """Stands in for a PipelineModule: what ``resolve_schedule`` reads of one."""

    def __init__(self, schedule=None, partition_schedule=None):
        self.schedule, self.partition_schedule = schedule, partition_schedule


def test_the_schedule_comes_from_wherever_it_is_named():
    assert resolve_schedule(None, {}) == "1f1b"
    assert resolve_schedule("GPipe", {}) == "gpipe"
    assert resolve_schedule(None, {"pipeline": {"schedule": "zb-h1"}}) == "zb-h1"
    assert resolve_schedule(None, {}, Module("gpipe")) == "gpipe"
    assert resolve_schedule("gpipe", {"pipeline": {"schedule": "GPIPE"}}, Module("gpipe")) == "gpipe"
    assert resolve_schedule(None, {}, default="deepspeed") == "deepspeed"


@pytest.mark.parametrize(
    "schedule, config, module, message",
    [
        ("gpipe", {"pipeline": {"schedule": "1f1b"}}, None, r"'gpipe' in initialize\(schedule=...\) and '1f1b' in "),
        (None, {"pipeline": {"schedule": "zb-h1"}}, Module("gpipe"), r"'zb-h1' in the config's pipeline.schedule "),
        (
            None,
            {"pipeline": {"schedule": "gpipe"}},
            Module(None, "1f1b"),
            r"planned .* '1f1b' .* pass schedule='gpipe'",
        ),
        (
            "zigzag",
            {},
            None,
            r"unknown schedule 'zigzag'; registered: " + REGISTERED,
        ),
    ],
)
def test_a_conflict_names_both_choices(schedule, config, module, message):
    with pytest.raises(ValueError, match=message):
        resolve_schedule(schedule, config, module)


def layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)]


def batches():
    generator = torch.Generator().manual_seed(1)
    return iter([(torch.randn(2, 4, generator=generator), torch.randint(0, 3, (2,), generator=generator))] * 2)


def build(run_schedule=None, config=CONFIG, partition_method="uniform", **module_options):
    module = ds_pipe_ext.PipelineModule(
        layers(), num_stages=1, loss_fn=nn.CrossEntropyLoss(), partition_method=partition_method, **module_options
    )
    return ds_pipe_ext.initialize(
        model=module, model_parameters=module.parameters(), config=config, schedule=run_schedule
    )


def test_initialize_runs_the_chosen_schedule_on_deepspeeds_own_engine(single_rank_group):
    engine, optimizer, loader, scheduler = build("gpipe")
    assert type(engine) is SchedulePipelineEngine and isinstance(engine, PipelineEngine)
    assert engine.schedule_cls is GPipeSchedule and optimizer is engine.optimizer and loader is None
    before = [p.detach().clone() for p in engine.module.parameters()]
    loss = engine.train_batch(batches())
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    config = {**CONFIG, "pipeline": {"schedule": "zb-h1"}}
    assert build(config=config)[0].schedule_cls is ZBH1Schedule
    untouched = build("deepspeed")[0]
    assert type(untouched) is PipelineEngine  # DeepSpeed's, as deepspeed.initialize returns it
    assert torch.isfinite(untouched.train_batch(batches()))


def test_a_partition_planned_for_another_schedule_is_refused(single_rank_group):
    config = {**CONFIG, "pipeline": {"schedule": "gpipe"}}
    memory = dict(partition_method="memory", sample_input=torch.zeros(2, 4), micro_batches=2)
    with pytest.raises(ValueError, match=r"planned the activations of schedule '1f1b'.*pass schedule='gpipe'"):
        build(config=config, **memory)
    assert build(config=config, schedule="gpipe", **memory)[0].schedule_cls is GPipeSchedule
    assert build(config=config)[0].schedule_cls is GPipeSchedule  # uniform does not depend on the schedule


def test_the_engine_takes_over_only_deepspeeds_pipeline_engine():
    with pytest.raises(TypeError, match=r"built a DeepSpeedEngine for this model \(use schedule 'deepspeed'"):
        SchedulePipelineEngine.adopt(object.__new__(deepspeed.DeepSpeedEngine), GPipeSchedule)


#: ``deepspeed.initialize``'s pipeline branch, whitespace-normalised and hashed, in each supported release (keyed by
#: the releases read). ds_pipe_ext.initialize delegates to it and then adopts the PipelineEngine it built; a release
#: that changes the branch must be read again before it is added here. All build a plain ``PipelineEngine`` for a
#: ``PipelineModule``: 0.17.0 from the config alone, later releases after ``set_optimizer_flags(config, model)``,
#: 0.19.8 through ``DualPipeVEngine if isinstance(model, DualPipeVModule) else PipelineEngine``.
KNOWN_PIPELINE_BRANCHES = {
    "0.17.0": "15d2421362eba097",
    "0.17.6, 0.18.0, 0.18.2-0.18.4, 0.18.6, 0.18.7, 0.18.9, 0.19.0-0.19.7": "92c5f346cc5888c5",
    "0.19.8": "9e78066490260bd9",
}


def pipeline_branch() -> str:
    source = inspect.getsource(deepspeed.initialize)
    branch = source[source.index("assert mpu is None") : source.index("# Restore zero.Init")]
    return hashlib.sha256(re.sub(r"\s+", " ", branch).encode()).hexdigest()[:16]


def test_deepspeeds_pipeline_branch_is_the_one_ds_pipe_ext_delegates_to():
    assert pipeline_branch() in KNOWN_PIPELINE_BRANCHES.values(), (deepspeed.__version__, pipeline_branch())
