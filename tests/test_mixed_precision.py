"""The split-backward schedules with bf16, fp16 and ZeRO stage 1 train bit for bit as 1F1B does, on 2 CPU ranks.

One launch of ``tests/scripts/mixed_precision_split.py`` trains the GPT of ``ds_pipe_ext.models.gpt`` (tied embedding
and head, LayerNorm, causal attention) in each DeepSpeed configuration under 1F1B and the split schedules, from the
same weights on the same batches, and resumes a zb-h1 run from a checkpoint. The split does the arithmetic of one
backward and runs what DeepSpeed runs around it, so the comparisons are exact: the same losses, the same weights on
every rank (a digest of their bits), the same skipped steps and loss scales.
"""

from __future__ import annotations

import json

import pytest
from launch import ROOT, launch

from ds_pipe_ext import compat

SCRIPT = ROOT / "tests" / "scripts" / "mixed_precision_split.py"

#: case: the optimizer DeepSpeed builds for it, and the schedules it runs (the first is the reference).
CASES = {
    "fp32": ("AdamW", ["1f1b", "zb-h1"]),
    "bf16": ("BF16_Optimizer", ["1f1b", "zb-h1", "1f1b-split"]),
    "bf16_immediate": ("BF16_Optimizer", ["1f1b", "zb-h1"]),
    "bf16_zero1": ("DeepSpeedZeroOptimizer", ["1f1b", "zb-h1"]),
    "bf16_zero1_fp32_grads": ("BF16_Optimizer", ["1f1b", "zb-h1"]),
    "fp32_zero1": ("DeepSpeedZeroOptimizer", ["1f1b", "zb-h1"]),
    "fp16": ("FP16_Optimizer", ["1f1b", "zb-h1"]),
    "fp16_zero1": ("DeepSpeedZeroOptimizer", ["1f1b", "zb-h1"]),
    "bf16_checkpointed": ("BF16_Optimizer", ["1f1b", "zb-h1"]),
    # Virtual stages, compared within a placement: loop (interleaved), v (zb-v and dualpipev against dualpipev
    # with every backward whole). Across placements the tied weight's two gradients sum on one rank or across two.
    "bf16_zero1_virtual": ("DeepSpeedZeroOptimizer", ["interleaved-1f1b", "interleaved-zb"]),
    "bf16_zero1_virtual_v": ("DeepSpeedZeroOptimizer", ["dualpipev-whole", "zb-v", "dualpipev"]),
    "fp16_zero1_virtual": ("DeepSpeedZeroOptimizer", ["interleaved-1f1b", "interleaved-zb"]),
    "fp16_zero1_virtual_v": ("DeepSpeedZeroOptimizer", ["dualpipev-whole", "zb-v", "dualpipev"]),
}
#: What the script is asked to run: each virtual case runs both placements.
LAUNCHED = [name for name in CASES if not name.endswith("_v")] + ["resume"]

pytestmark = pytest.mark.skipif(
    not compat.backward_in_pieces(),
    reason=f"the split runs mixed precision from DeepSpeed {compat.SPLIT_PRECISION_SINCE}",
)


@pytest.fixture(scope="module")
def records() -> dict[tuple[str, str], dict]:
    """Every run's record, by (case, schedule); the resume case's by ("resume", "uninterrupted" or "resumed")."""
    result = launch(SCRIPT, LAUNCHED, ranks=2, timeout=2400)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    found = {}
    for line in result.stdout.splitlines():
        if "RECORD " in line:
            record = json.loads(line.split("RECORD ", 1)[1])
            case = record["case"]
            if case.endswith("_virtual") and record["schedule"] in ("dualpipev-whole", "zb-v", "dualpipev"):
                case += "_v"
            found[(case, record.get("run", record["schedule"]))] = record
    return found


def same_training(run: dict, reference: dict) -> None:
    """Bit for bit: every loss, every rank's weights, the steps skipped and the loss scale after each step."""
    assert run["losses"] == reference["losses"]
    assert run["digests"] == reference["digests"]
    assert (run["skipped_steps"], run["loss_scales"]) == (reference["skipped_steps"], reference["loss_scales"])


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_split_schedules_train_bit_for_bit_as_their_whole_backward_reference(records, case):
    optimizer, (reference, *splits) = CASES[case]
    assert records[(case, reference)]["optimizer"] == optimizer
    assert len(records[(case, reference)]["losses"]) == 6
    for schedule in splits:
        assert records[(case, schedule)]["optimizer"] == optimizer
        same_training(records[(case, schedule)], records[(case, reference)])


@pytest.mark.slow
def test_the_runs_are_what_they_say(records):
    """Accumulation steps not a power of two (where DeepSpeed divides by them matters to the last bit); bf16 runs
    that differ from fp32 ones; checkpoints by DeepSpeed's non-reentrant function; fp16 with ZeRO overflowing at
    first, skipping steps and halving its loss scale, then training; FP16_Optimizer at its initial scale."""
    assert records[("bf16", "1f1b")]["micro_batches"] == 3
    assert records[("bf16_zero1_virtual_v", "zb-v")]["micro_batches"] == 4
    assert records[("bf16", "1f1b")]["losses"] != records[("fp32", "1f1b")]["losses"]
    assert records[("bf16_checkpointed", "zb-h1")]["checkpoint_func"] == "non_reentrant_checkpoint"
    assert records[("bf16", "zb-h1")]["checkpoint_func"] is None
    for case in ("fp16_zero1", "fp16_zero1_virtual"):
        fp16 = records[(case, "interleaved-zb" if "virtual" in case else "zb-h1")]
        assert 0 < fp16["skipped_steps"] < 6
        assert fp16["loss_scales"][-1] < fp16["loss_scales"][0] == 2.0**20
    assert records[("fp16", "zb-h1")]["skipped_steps"] == 0 and records[("fp16", "zb-h1")]["loss_scales"][0] == 2.0**16


@pytest.mark.slow
def test_zb_h1_with_bf16_and_zero_1_resumes_exactly(records):
    """Checkpointed after step 2 (``ds_pipe_ext.checkpoint``), resumed in a new engine: steps 3-6 as in the run
    that never stopped, and the same weights at the end."""
    whole, resumed = records[("resume", "uninterrupted")], records[("resume", "resumed")]
    assert resumed["from_step"] == 2 and whole["optimizer"] == resumed["optimizer"] == "DeepSpeedZeroOptimizer"
    assert resumed["losses"] == whole["losses"][2:]
    assert resumed["digests"] == whole["digests"]
    assert whole["losses"] == records[("bf16_zero1", "zb-h1")]["losses"]  # the same run, saving on the way
