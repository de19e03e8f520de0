"""Pictures of schedules and traces are written, show what the timeline says, and the CLI drives them."""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ElementTree
from collections import Counter

import numpy as np
import pytest
from deepspeed.runtime.pipe.schedule import BackwardPass, ForwardPass, SendActivation
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from ds_pipe_ext.cli import main
from ds_pipe_ext.observe.draw import BOX_COLOURS, box_colour, draw_schedule, draw_timeline
from ds_pipe_ext.observe.simulation import TimelineEvent, ideal_bubble_fraction, simulate

REGISTERED = "1f1b, 1f1b-split, deepspeed, dualpipev, gpipe, interleaved-1f1b, interleaved-zb, zb-h1, zb-v"


def pixels_of(image: np.ndarray, colour: str) -> int:
    return int((np.abs(image[..., :3] - np.array(to_rgb(colour))).max(axis=-1) < 0.02).sum())


def test_png_shows_forward_and_backward_boxes_in_proportion(tmp_path):
    path = tmp_path / "1f1b.png"
    result = draw_schedule("1f1b", 4, 8, path)
    assert result.peak_buffers == [4, 3, 2, 1]
    assert path.stat().st_size > 20_000
    image = imread(path)
    height, width = image.shape[:2]
    assert width > 1000 and height > 300
    forward, backward = pixels_of(image, BOX_COLOURS[ForwardPass]), pixels_of(image, BOX_COLOURS[BackwardPass])
    assert forward > 0.02 * height * width
    assert backward / forward == pytest.approx(2.0, rel=0.15)  # a backward costs two forwards by default


def test_svg_labels_every_box_with_its_micro_batch(tmp_path):
    stages, micro_batches = 3, 5
    path = tmp_path / "gpipe.svg"
    draw_schedule("gpipe", stages, micro_batches, path)
    texts = [element.text for element in ElementTree.parse(path).iter() if element.tag.endswith("text")]
    labels = Counter(int(text) for text in texts if text and text.strip().isdigit())
    for micro_batch in range(micro_batches):  # a forward and a backward box per stage; maybe one axis tick too
        assert 2 * stages <= labels[micro_batch] <= 2 * stages + 1
    title = next(text for text in texts if text and "bubble" in text)
    assert f"{ideal_bubble_fraction(stages, micro_batches):.3f}" in title


def test_virtual_stages_are_shaded_per_chunk_and_rows_name_their_stages(tmp_path):
    """interleaved-1f1b on 2 ranks x 2 chunks: each rank's row names the stages it holds, each chunk has a shade of
    its own (in the picture and the legend), and every box still carries its micro-batch."""
    stages, micro_batches = 2, 4
    svg = tmp_path / "interleaved.svg"
    result = draw_schedule("interleaved-1f1b", stages, micro_batches, svg)
    texts = [element.text for element in ElementTree.parse(svg).iter() if element.tag.endswith("text") and element.text]
    assert {"rank 0: stages 0, 2", "rank 1: stages 1, 3"} <= set(texts)
    assert {f"{kind}, chunk {chunk}" for kind in ("ForwardPass", "BackwardPass") for chunk in (0, 1)} <= set(texts)
    assert any("K=2 ranks x 2 chunks (loop)" in text for text in texts)
    labels = Counter(int(text) for text in texts if text.strip().isdigit())
    for micro_batch in range(micro_batches):  # F and B on 2 chunks of 2 ranks; maybe one axis tick too
        assert 8 <= labels[micro_batch] <= 9
    image = imread(draw_timeline(result.timeline, stages, tmp_path / "interleaved.png", layout=result.layout))
    shades = [pixels_of(image, box_colour(ForwardPass, chunk, 2)) for chunk in (0, 1)]
    assert box_colour(ForwardPass, 0, 2) == BOX_COLOURS[ForwardPass] != box_colour(ForwardPass, 1, 2)
    assert shades[0] > 1000 and shades[1] == pytest.approx(shades[0], rel=0.1)  # as many forwards on each chunk


def test_chunks_without_a_layout_still_get_their_shades_and_rank_rows(tmp_path):
    events = [TimelineEvent(0, ForwardPass, 0, 0.0, 1.0, chunk=0), TimelineEvent(0, ForwardPass, 0, 1.0, 2.0, chunk=1)]
    svg = draw_timeline(events, 1, tmp_path / "chunks.svg")
    texts = {element.text for element in ElementTree.parse(svg).iter() if element.tag.endswith("text")}
    assert {"rank 0", "ForwardPass, chunk 0", "ForwardPass, chunk 1"} <= texts


def test_cli_draws_a_virtual_schedule_with_more_chunks(tmp_path, capsys):
    args = ["schedule", "--schedule", "interleaved-1f1b", "--virtual-stages", "3", "--stages", "2"]
    assert main([*args, "--micro-batches", "4", "--out", str(tmp_path / "i3.svg")]) == 0
    out = capsys.readouterr().out
    assert "interleaved-1f1b: 2 stages x 3 chunks placed 'loop' (6 in all), 4 micro-batches" in out
    assert "rank 1: stages 1, 3, 5" in (tmp_path / "i3.svg").read_text()
    assert (
        main(["schedule", "--schedule", "zb-v", "--virtual-stages", "3", "--stages", "2", "--micro-batches", "4"]) == 2
    )
    assert "pass virtual_stages=2" in capsys.readouterr().err


def test_traced_timelines_in_seconds_are_drawn(tmp_path):
    events, clock = [], 1_700_000_000.0  # wall-clock seconds, as a tracer records them
    for micro_batch in range(3):
        for stage, instruction, duration in (
            (0, ForwardPass, 0.0123),
            (0, SendActivation, 0.002),
            (1, ForwardPass, 0.02),
        ):
            events.append(TimelineEvent(stage, instruction, micro_batch, clock, clock + duration))
            clock += duration
    path = draw_timeline(events, 2, tmp_path / "trace.png", title="measured", xlabel="seconds")
    image = imread(path)
    assert pixels_of(image, BOX_COLOURS[ForwardPass]) > 1000
    assert pixels_of(image, BOX_COLOURS[BackwardPass]) == 0


def test_unsupported_suffix_names_the_supported_ones(tmp_path):
    with pytest.raises(ValueError, match=r"ending in \.png or \.svg"):
        draw_schedule("1f1b", 2, 2, tmp_path / "pipe.jpg")


def test_missing_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install ds_pipe_ext\[plot\]"):
        draw_schedule("1f1b", 2, 2, tmp_path / "pipe.png")


def test_cli_prints_bubble_makespan_and_peaks_and_writes_the_picture(tmp_path, capsys):
    path = tmp_path / "gpipe.png"
    assert main(["schedule", "--schedule", "GPipe", "--stages", "4", "--micro-batches", "8", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"bubble fraction: {3 / 11:.4f}" in out
    assert "makespan: 33" in out
    assert "peak buffers per stage: 8 8 8 8" in out
    assert imread(path).shape[1] > 1000


def test_cli_per_stage_costs_match_the_library(capsys):
    costs = {"forward": [1.0, 3.0, 1.0], "backward": 2.5, "send": 0.5}
    args = ["--forward-cost", "1,3,1", "--backward-cost", "2.5", "--send-cost", "0.5"]
    assert main(["schedule", "--stages", "3", "--micro-batches", "4", *args]) == 0
    expected = simulate("1f1b", 3, 4, costs)
    out = capsys.readouterr().out
    assert f"bubble fraction: {expected.bubble_fraction:.4f}" in out
    assert f"makespan: {expected.makespan:g}" in out


def test_cli_draws_deepspeeds_own_schedule_like_ours(capsys):
    main(["schedule", "--schedule", "deepspeed", "--stages", "3", "--micro-batches", "5"])
    deepspeed = capsys.readouterr().out.splitlines()[1:]
    main(["schedule", "--schedule", "1f1b", "--stages", "3", "--micro-batches", "5"])
    assert capsys.readouterr().out.splitlines()[1:] == deepspeed


def test_cli_errors(capsys):
    assert main(["schedule", "--schedule", "zigzag", "--stages", "2", "--micro-batches", "2"]) == 2
    assert REGISTERED in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["schedule", "--stages", "2", "--micro-batches", "2", "--forward-cost", "fast"])
    assert "one per stage, like 1,1,2,1" in capsys.readouterr().err
