"""Tracing: instruction events, Chrome trace files, measured bubble, and the picture of a traced run."""

from __future__ import annotations

import json

import pytest
from deepspeed.runtime.pipe import schedule as ds

from ds_pipe_ext.cli import main
from ds_pipe_ext.observe.simulation import TimelineEvent, simulate, stage_bubble_fractions
from ds_pipe_ext.observe.trace import InstructionTracer, bubble_report, chrome_trace, load_trace
from ds_pipe_ext.schedules import get_schedule
from ds_pipe_ext.schedules.instructions import transfer_runs

COSTS = {"forward": [1.0, 1.5], "backward": [2.0, 2.5], "send": 0.1}


def traced_simulation(tmp_path, schedule: str, stages: int, micro_batches: int, steps: int = 2):
    """Feed a simulated run through real tracers, as the engine would, and write their Chrome trace."""
    result = simulate(schedule, stages, micro_batches, costs=COSTS)
    ranks = []
    for stage in range(stages):
        tracer = InstructionTracer(tmp_path, schedule, rank=stage, stage=stage, replica=0, layout=result.layout)
        tracer.origin = 0.0
        instructions = [
            cmd
            for step in get_schedule(schedule)(micro_batches, stages, stage)
            for group in transfer_runs(step)
            for cmd in group
        ]
        for step in range(steps):
            offset = step * (result.makespan + 1)
            timed = iter(event for event in result.timeline if event.stage == stage)
            for cmd in instructions:
                event = next(timed)
                assert event.instruction is type(cmd)
                tracer.record(cmd, offset + event.start, offset + event.end)
        ranks.append({"rank": stage, "stage": stage, "replica": 0, "events": tracer.events})
    (tmp_path / "trace.json").write_text(json.dumps(chrome_trace(ranks, schedule, result.layout)))
    return result


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_measured_bubble_of_a_simulated_trace_is_the_simulators(tmp_path, schedule):
    result = traced_simulation(tmp_path, schedule, stages=2, micro_batches=6)
    run = load_trace(tmp_path)
    assert (run.schedule, run.stages, run.replicas, run.steps, run.micro_batches) == (schedule, 2, 1, 2, 6)
    report = bubble_report(run)
    assert report.measured == pytest.approx(result.bubble_fraction)
    assert report.measured_pipelined == pytest.approx(result.bubble_fraction)  # the simulated step is all passes
    assert report.predicted == pytest.approx(result.bubble_fraction)
    assert report.forward_cost == pytest.approx(COSTS["forward"])
    assert report.backward_cost == pytest.approx(COSTS["backward"])
    assert report.theoretical == pytest.approx(1 / 7)


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zb-v"])
def test_a_virtual_schedules_trace_keeps_its_chunks_and_costs_per_stage(tmp_path, schedule):
    """Each rank runs every micro-batch once per chunk; the trace says which chunk ran what, the costs come back
    per stage of the model, and the prediction replays the traced chunk count."""
    result = traced_simulation(tmp_path, schedule, stages=2, micro_batches=6)
    run = load_trace(tmp_path)
    assert (run.stages, run.micro_batches, run.layout) == (2, 6, result.layout) and run.layout.chunks == 2
    for stage in (0, 1):
        for chunk in (0, 1):
            forwards = [e.micro_batch for e in run.timeline(1) if (e.stage, e.chunk, e.instruction) == (
                stage, chunk, ds.ForwardPass)]  # fmt: skip
            assert forwards == list(range(6))
    report = bubble_report(run)
    assert report.measured == pytest.approx(result.bubble_fraction)
    assert report.predicted == pytest.approx(result.bubble_fraction)
    owner = [run.layout.location(stage)[0] for stage in range(4)]
    assert report.forward_cost == pytest.approx([COSTS["forward"][rank] for rank in owner])
    assert report.backward_cost == pytest.approx([COSTS["backward"][rank] for rank in owner])
    assert "K=2, 2 virtual stages per rank, M=6" in report.format() and "rank 1:" in report.format()
    threads = [e["args"]["name"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
               if e["name"] == "thread_name"]  # fmt: skip
    holds = "1, 3" if result.layout.placement == "loop" else "1, 2"
    assert threads[1] == f"rank 1: pipeline rank 1 (stages {holds}), replica 0"


def test_tracer_labels_micro_batches_through_buffers(tmp_path):
    tracer = InstructionTracer(tmp_path, "gpipe", rank=0, stage=0, replica=0)
    stream = [cmd for step in get_schedule("gpipe")(3, 2, 0) for cmd in step]
    for cmd in stream:
        tracer.record(cmd, 0.0, 1.0)
    labelled = [(name, micro_batch) for name, _, micro_batch, *_ in tracer.events if name.endswith("Pass")]
    assert labelled == [
        ("ForwardPass", 0),
        ("ForwardPass", 1),
        ("ForwardPass", 2),
        ("BackwardPass", 2),
        ("BackwardPass", 1),
        ("BackwardPass", 0),
    ]
    tracer.record(ds.ForwardPass(buffer_id=0), 2.0, 3.0)  # a new step starts after OptimizerStep
    assert tracer.events[-1][2:4] == (0, 1)


def test_trace_cli_draws_the_measured_timeline(tmp_path, capsys):
    traced_simulation(tmp_path, "1f1b", stages=2, micro_batches=4)
    out = tmp_path / "run.png"
    assert main(["trace", str(tmp_path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "measured" in printed and "theory (K-1)/(M+K-1) 0.200" in printed
    from matplotlib.image import imread

    height, width, _ = imread(out).shape
    assert out.stat().st_size > 5_000 and width > 400 and height > 100


def test_missing_trace_names_the_flag(tmp_path, capsys):
    assert main(["trace", str(tmp_path)]) == 2
    assert "--trace DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_traced_run_holds_every_instruction_and_its_bubble_matches_the_simulator(oracle_runs):
    record = oracle_runs["1f1b"]
    trace = json.loads((record["dir"] / "1f1b_trace" / "trace.json").read_text())
    threads = {e["tid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "thread_name"}
    assert threads == {0: "rank 0: stage 0, replica 0", 1: "rank 1: stage 1, replica 0"}
    steps, micro_batches = len(record["steps"]), record["micro_batches"]
    for stage in (0, 1):
        for name in ("ForwardPass", "BackwardPass"):
            count = sum(1 for e in trace["traceEvents"] if e["name"] == name and e["args"]["stage"] == stage)
            assert count == steps * micro_batches, (stage, name)
    bubble = record["bubble"]
    assert abs(bubble["measured"] - bubble["predicted"]) <= 0.1, bubble
    assert bubble["theoretical"] == pytest.approx(1 / 9)


def test_the_pipelined_bubble_leaves_out_what_comes_before_the_first_pass_and_after_the_last():
    """Two stages, one micro-batch: each idles 2 while the other works, then a 2-long optimizer step on both. Over
    the step both idle 4 of 6; between the first and the last pass, 2 of 4."""
    events = [
        TimelineEvent(0, ds.LoadMicroBatch, 0, 0.0, 0.0),
        TimelineEvent(0, ds.ForwardPass, 0, 0.0, 1.0),
        TimelineEvent(1, ds.ForwardPass, 0, 1.0, 2.0),
        TimelineEvent(1, ds.BackwardPass, 0, 2.0, 3.0),
        TimelineEvent(0, ds.BackwardPass, 0, 3.0, 4.0),
        *(TimelineEvent(stage, ds.OptimizerStep, None, 4.0, 6.0) for stage in (0, 1)),
    ]
    assert stage_bubble_fractions(events, 2) == pytest.approx([4 / 6, 4 / 6])
    assert stage_bubble_fractions(events, 2, window="passes") == pytest.approx([2 / 4, 2 / 4])
    with pytest.raises(ValueError, match="window must be 'step' or 'passes'"):
        stage_bubble_fractions(events, 2, window="all")
