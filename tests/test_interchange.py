"""torch.distributed.pipelining's action CSV: written from every registered schedule and read back, torch's own
schedules dumped by torch and read here, the files we refuse and why, ``csv:PATH`` wherever a schedule is named,
and (slow) the GPT trained from a CSV exactly as from the schedule it was written from."""

from __future__ import annotations

import csv
import io
import json
import re

import pytest
import torch
import torch.distributed.pipelining.schedules as torch_schedules
from launch import GPT_EXAMPLE, ROOT, import_script, launch, losses, skip_unless_trains_here, write_config
from torch import nn
from torch_oracle import dump_csv, torch_pipeline_order

from ds_pipe_ext import PipelineModule
from ds_pipe_ext.cli import main
from ds_pipe_ext.config import check_schedule_fits, resolve_schedule
from ds_pipe_ext.observe.simulation import simulate, validate
from ds_pipe_ext.schedules import (
    ComputeOrderSchedule,
    Layout,
    Pass,
    available_schedules,
    get_schedule,
    read_actions,
    write_actions,
)

COMPUTE_ORDERS = [name for name in available_schedules() if issubclass(get_schedule(name), ComputeOrderSchedule)]


def chunk_counts(name: str) -> tuple[int, ...]:
    schedule = get_schedule(name)
    return (1,) if schedule.chunks == 1 else (2,) if schedule.placement == "v" else (2, 3)


def runs(schedule: type, ranks: int, micro_batches: int) -> bool:
    try:
        schedule(micro_batches, ranks, 0)
    except ValueError:
        return False
    return True


def lowered(schedule: type, ranks: int, micro_batches: int) -> list[list[list[str]]]:
    return [[[repr(i) for i in step] for step in schedule(micro_batches, ranks, rank).steps()] for rank in range(ranks)]


def write_file(tmp_path, text: str, name: str = "schedule.csv") -> str:
    path = tmp_path / name
    path.write_text(text)
    return f"csv:{path}"


# ---- round trip -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPUTE_ORDERS)
def test_every_schedule_reads_back_as_the_order_it_was_written_from_and_lowers_alike(name, tmp_path):
    """Idle steps included: the CSV schedule lowers to the registered schedule's instructions, buffer for buffer."""
    checked = 0
    for chunks in chunk_counts(name):
        schedule = get_schedule(name).with_chunks(chunks)
        for ranks in (1, 2, 3, 4):
            for micro_batches in (1, 2, 4, 5, 8):
                if not runs(schedule, ranks, micro_batches):
                    continue
                text = write_actions(name, ranks, micro_batches, chunks)
                table = read_actions(text)
                layout = Layout(ranks, chunks, schedule.placement)  # one rank: loop and v are the same
                assert [*map(table.layout.location, range(layout.stages))] == [
                    *map(layout.location, range(layout.stages))
                ]
                assert table.micro_batches == micro_batches
                for rank in range(ranks):
                    assert table.orders[rank] == tuple(schedule(micro_batches, ranks, rank).order())
                path = write_file(tmp_path, text, f"{name}-{chunks}-{ranks}-{micro_batches}.csv")
                assert lowered(get_schedule(path), ranks, micro_batches) == lowered(schedule, ranks, micro_batches)
                checked += 1
    assert checked >= 8 * len(chunk_counts(name))


def test_torch_parses_every_cell_we_write():
    text = write_actions("zb-v", 3, 6)
    for rank, row in enumerate(csv.reader(io.StringIO(text))):
        actions = [torch_schedules._Action.from_str(cell) for cell in row]
        stages = {action.stage_index for action in actions if action is not None}
        assert stages == {rank, 5 - rank}
        assert {action.computation_type.value for action in actions} == {"F", "I", "W"}


# ---- torch's schedules, dumped by torch, read here --------------------------------------------------------------

#: torch's schedule, ours, chunks per rank.
TORCH_EQUIVALENTS = [
    (torch_schedules.ScheduleInterleaved1F1B, "interleaved-1f1b", 2),
    (torch_schedules.ScheduleInterleaved1F1B, "interleaved-1f1b", 3),
    (torch_schedules.ScheduleInterleavedZeroBubble, "interleaved-zb", 2),
    (torch_schedules.ScheduleZBVZeroBubble, "zb-v", 2),
]


@pytest.mark.parametrize(("torch_cls", "name", "chunks"), TORCH_EQUIVALENTS)
def test_torchs_dumped_schedule_reads_as_ours_and_validates(torch_cls, name, chunks, tmp_path):
    """torch's idle steps are its own timing; without them each rank runs our order. torch's REDUCE_GRAD (in the
    one-stage schedules' orders) is skipped: the lowering reduces at the end of the batch."""
    checked = 0
    for ranks in (2, 3, 4):
        for micro_batches in (ranks, 2 * ranks, 8):
            pipeline_order = torch_pipeline_order(torch_cls, ranks, micro_batches, chunks)
            if pipeline_order is None:
                continue
            path = tmp_path / f"{torch_cls.__name__}-{ranks}-{micro_batches}.csv"
            dump_csv(pipeline_order, path)
            schedule = get_schedule(f"csv:{path}")
            ours = get_schedule(name).with_chunks(chunks)
            assert (schedule.chunks, schedule.placement) == (ours.chunks, ours.placement)
            for rank in range(ranks):
                passes = [p for p in schedule(micro_batches, ranks, rank).order() if p is not None]
                assert passes == [p for p in ours(micro_batches, ranks, rank).order() if p is not None], (ranks, rank)
            for backend in ("gloo", "nccl"):
                validate(schedule, ranks, micro_batches, backend=backend)
            checked += 1
    assert checked >= 6


def test_torchs_1f1b_order_is_refused_where_its_last_rank_is_off_by_one(tmp_path):
    """torch 2.14.1's ``Schedule1F1B._get_pipeline_order`` (its picture of the schedule; torch does not run it)
    has the last rank forward micro-batches 1 to M instead of 0 to M-1. The replay refuses it at the first pass
    that cannot run; with that row's micro-batches counted from 0 it is our 1f1b, pass for pass."""
    for ranks, micro_batches in ((2, 4), (3, 4), (4, 8)):
        pipeline_order = torch_pipeline_order(torch_schedules.Schedule1F1B, ranks, micro_batches)
        path = tmp_path / f"1f1b-{ranks}-{micro_batches}.csv"
        dump_csv(pipeline_order, path)
        last = f"row {ranks} \\(rank {ranks - 1}\\), column 2, action '{ranks - 1}B0'.*holds no activation"
        with pytest.raises(ValueError, match=last):
            resolve_schedule(f"csv:{path}", {})
        last_row = pipeline_order[ranks - 1]
        forwards = sorted(a.microbatch_index for a in last_row if a and a.computation_type.value == "F")
        assert forwards == list(range(1, micro_batches + 1))
        pipeline_order[ranks - 1] = [
            a._replace(microbatch_index=a.microbatch_index - 1) if a and a.computation_type.value == "F" else a
            for a in last_row
        ]
        dump_csv(pipeline_order, path)
        schedule = get_schedule(resolve_schedule(f"csv:{path}", {}))
        ours = get_schedule("1f1b")
        for rank in range(ranks):
            passes = [p for p in schedule(micro_batches, ranks, rank).order() if p is not None]
            assert passes == [p for p in ours(micro_batches, ranks, rank).order() if p is not None]


def test_communication_actions_are_skipped_and_overlapped_pairs_split(tmp_path):
    """torch's compute_comms format: the sends and receives are ours to place; an OVERLAP_F_B cell is its passes."""
    text = (
        "0F0,0SEND_F0,0F1,0SEND_F1,0RECV_B0,0B0,,0RECV_B1,0B1,0REDUCE_GRAD\n"
        "1RECV_F0,1F0,1RECV_F1,(1F1;1B0)OVERLAP_F_B,1SEND_B0,1B1,1SEND_B1\n"
    )
    table = read_actions(text)
    assert table.orders == (
        (Pass("F", 0), Pass("F", 1), Pass("B", 0), None, Pass("B", 1)),
        (Pass("F", 0), Pass("F", 1), Pass("B", 0), Pass("B", 1)),
    )
    assert table.where(0, 2) == "row 1 (rank 0), column 6, action '0B0'"
    validate(get_schedule(write_file(tmp_path, text)), 2, 2)


# ---- what is refused, and the fix -------------------------------------------------------------------------------

BAD_FILES = {
    "not an action": ("0F0,0X1\n", r"row 1 \(rank 0\), column 2: '0X1' is not an action; write \{stage\}"),
    "no micro-batch": ("0F0,0B\n", r"column 2: '0B' is not an action"),
    "no rows": (",,\n\n", r"no rows; write one row of actions per pipeline rank, e.g. 0F0,0B0"),
    "no compute actions": ("0SEND_F0,\n", r"no compute actions \(F, I, B or W\) in any row"),
    "stages fit no placement": (
        "0F0,2F0,2B0,0B0\n1F0,3F0,3B0,1B0\n2F0,1B0\n",
        r"fit no placement \(3 rows, stages 0 to 3; row 1: 0, 2; row 2: 1, 3; row 3: 1, 2\)",
    ),
    "stage on the wrong row": ("1F0,1B0\n0F0,0B0\n", r"fit no placement .*row 1: 1; row 2: 0\)"),
    "a pass missing": ("0F0,0F1,0B0\n1F0,1B0,1F1,1B1\n", r"row 1 \(rank 0\).*backward_input of micro-batch 1"),
    "a pass twice": ("0F0,0B0,0F0,0B0\n1F0,1B0\n", r"csv:\S+: row 1 \(rank 0\), column 3, action '0F0'"),
    "W before its I": (
        "0F0,0W0,0I0\n1F0,1I0,1W0\n",
        r"row 1 \(rank 0\), column 2, action '0W0', BackwardWeightPass\(buffer_id=0\): micro-batch 0 has not had "
        "its backward_input yet",
    ),
    "ranks disagree on the order": (
        "0F0,0F1,0B1,0B0\n1F0,1B0,1F1,1B1\n",
        r"row 1 \(rank 0\), column 3, action '0B1', RecvGrad\(buffer_id=1\): receives micro-batch 0's grad",
    ),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_file_is_refused_naming_the_row_column_and_action(case, tmp_path, capsys):
    text, message = BAD_FILES[case]
    path = write_file(tmp_path, text)
    with pytest.raises(ValueError, match=message):
        resolve_schedule(path, {})  # where a run resolves its schedule: parsed, then replayed
    assert main(["schedule", path]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_file_that_cannot_be_read_names_it(tmp_path):
    with pytest.raises(ValueError, match=r"schedule csv:\S+missing.csv: cannot read the file \(No such file"):
        get_schedule(f"csv:{tmp_path / 'missing.csv'}")
    with pytest.raises(ValueError, match=r"schedule 'csv:' names no csv source: write csv:PATH"):
        get_schedule("csv:")


def test_a_run_of_other_sizes_is_refused_naming_both_numbers(tmp_path):
    path = write_file(tmp_path, write_actions("interleaved-1f1b", 2, 8))
    check_schedule_fits(path, 2, 8, 2)
    with pytest.raises(ValueError, match=r"schedules 8 micro-batches, but this run has 4 \(gradient_accumulation"):
        check_schedule_fits(path, 2, 4, 2)
    with pytest.raises(ValueError, match=r"has 2 rows, one per pipeline rank \(4 stages in all\), but this run has 4 "):
        check_schedule_fits(path, 4, 8, 2)
    for chunks in (1, 3):
        with pytest.raises(
            ValueError, match=rf"places 2 chunk\(s\) per rank \(4 stages on 2 rows\), not {chunks}: pass"
        ):
            check_schedule_fits(path, 2, 8, chunks)


# ---- csv:PATH wherever a schedule is named ----------------------------------------------------------------------


def test_the_config_and_initialize_name_a_csv_like_any_schedule(tmp_path):
    path = write_file(tmp_path, write_actions("zb-h1", 2, 4), "ZB-H1.csv")  # the path keeps its case
    assert resolve_schedule(None, {"pipeline": {"schedule": path}}) == path
    assert resolve_schedule(path.replace("csv:", "CSV:"), {"pipeline": {"schedule": path}}) == path
    with pytest.raises(ValueError, match="named twice, differently"):
        resolve_schedule("zb-h1", {"pipeline": {"schedule": path}})
    assert simulate(path, 2, 4).bubble_fraction == pytest.approx(simulate("zb-h1", 2, 4).bubble_fraction)


def test_the_module_takes_the_files_chunks_and_placement_and_refuses_other_sizes(tmp_path):
    path = write_file(tmp_path, write_actions("zb-v", 2, 4))
    layers = [nn.Linear(4, 4) for _ in range(6)]
    with pytest.raises(ValueError, match=r"has 2 rows, one per pipeline rank .* but this run has 3 pipeline ranks"):
        PipelineModule(layers, num_stages=3, partition_method="uniform", schedule=path, virtual_stages=2)
    with pytest.raises(ValueError, match=r"places 2 chunk\(s\) per rank .*not 1: pass virtual_stages=2"):
        PipelineModule(layers, num_stages=2, partition_method="uniform", schedule=path)
    with pytest.raises(ValueError, match=r"schedules 4 micro-batches, but this run has 8"):
        PipelineModule(layers, num_stages=2, partition_method="uniform", schedule=path, virtual_stages=2,
                       micro_batches=8)  # fmt: skip


@pytest.fixture(scope="module")
def gpt_example():
    return import_script(GPT_EXAMPLE, "gpt_train_interchange")


@pytest.mark.parametrize(("written_from", "chunks", "placement"), [("zb-v", 2, "v"), ("interleaved-zb", 3, "loop")])
def test_the_example_runs_the_files_chunks_and_refuses_other_micro_batches(
    gpt_example, monkeypatch, tmp_path, written_from, chunks, placement
):
    skip_unless_trains_here(written_from)
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write_file(tmp_path, write_actions(written_from, 2, 8, chunks))
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4)
    args = gpt_example.get_args(["--deepspeed_config", str(config), "-p", "2", "--schedule", path, "--layers", "6"])
    plan = gpt_example.RunPlan(args, gpt_example.build_example(args))
    assert (plan.schedule, plan.virtual_stages, plan.placement) == (path, chunks, placement)
    config = write_config(tmp_path / "ds_config.json", train_batch=16, micro_batch=4)
    with pytest.raises(ValueError, match=r"schedules 8 micro-batches, but this run has 4"):
        gpt_example.RunPlan(args, gpt_example.build_example(args))


def test_the_cli_writes_any_schedules_csv_and_draws_a_csv(tmp_path, capsys):
    out = tmp_path / "i.csv"
    assert main(["schedule", "interleaved-1f1b", "--stages", "2", "--micro-batches", "4", "--virtual-stages", "3",
                 "--csv", str(out)]) == 0  # fmt: skip
    with open(out, newline="") as written_csv:
        assert written_csv.read() == write_actions("interleaved-1f1b", 2, 4, 3)
    written = capsys.readouterr().out
    assert main(["schedule", f"csv:{out}", "--out", str(tmp_path / "i.png")]) == 0
    drawn = capsys.readouterr().out
    assert f"csv:{out}: 2 stages x 3 chunks placed 'loop' (6 in all), 4 micro-batches" in drawn
    assert written.splitlines()[1:4] == drawn.splitlines()[1:4]  # the same bubble, makespan and buffers
    assert main(["schedule", f"csv:{out}", "--micro-batches", "8"]) == 2
    assert "schedules 4 micro-batches, but this run has 8" in capsys.readouterr().err
    assert main(["schedule", "deepspeed", "--stages", "2", "--micro-batches", "4", "--csv", str(out)]) == 2
    assert "only compute orders have an action CSV" in capsys.readouterr().err


# ---- the GPT from a CSV, on CPU ranks (slow) --------------------------------------------------------------------


@pytest.mark.slow
def test_the_gpt_trains_from_a_csv_exactly_as_from_its_schedule(tmp_path):
    """One launch, two runs: interleaved-1f1b by name and by the CSV written from it; the CSV lowers to the same
    instructions, so the losses are equal bit for bit."""
    config = write_config(tmp_path / "ds_config.json", train_batch=32, micro_batch=4)
    path = write_file(tmp_path, write_actions("interleaved-1f1b", 2, 8))
    common = ["--deepspeed_config", str(config), "-p", "2", "--partition", "uniform", "--steps", "3"]
    runs = {
        name: [*common, "--schedule", schedule, "--log-json", str(tmp_path / f"{name}.json")]
        for name, schedule in (("registered", "interleaved-1f1b"), ("csv", path))
    }
    spec = tmp_path / "runs.json"
    spec.write_text(json.dumps({"script": str(GPT_EXAMPLE.relative_to(ROOT)), "runs": runs}))
    result = launch(ROOT / "tests" / "scripts" / "example_runs.py", [str(spec)], ranks=2, timeout=900)
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
    registered, from_csv = (json.loads((tmp_path / f"{name}.json").read_text()) for name in runs)
    assert (from_csv["schedule"], from_csv["virtual_stages"]) == (path, 2)
    assert len(losses(registered)) == 3 and torch.isfinite(torch.tensor(losses(registered))).all()
    assert losses(from_csv) == losses(registered)
