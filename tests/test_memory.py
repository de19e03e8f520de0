"""The activation meter counts what autograd keeps for backward, once per storage, parameters excluded."""

from __future__ import annotations

import torch

from ds_pipe_ext.observe.memory import ActivationMemoryMeter


def test_peak_grows_with_micro_batches_in_flight_and_falls_after_backward():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 8))
    meter = ActivationMemoryMeter(model.parameters())
    inputs = [torch.randn(4, 64, requires_grad=True) for _ in range(3)]
    with meter:
        single = model(inputs[0]).sum()
        one_in_flight = meter.live_bytes
        single.backward()
        assert meter.live_bytes == 0
        losses = [model(x).sum() for x in inputs]  # GPipe-style: all forwards, then all backwards
        assert meter.live_bytes == 3 * one_in_flight
        for loss in losses:
            loss.backward()
    assert meter.live_bytes == 0
    assert meter.peak_bytes == 3 * one_in_flight
    # Saved: the first Linear's input (4x64 floats) and the ReLU output (4x128), which is also the second Linear's
    # input and so counted once; no weights.
    assert one_in_flight == 4 * (4 * 64 + 4 * 128)


def test_a_graph_dropped_without_backward_releases_its_activations():
    """ReLU saves its own output: a meter holding that tensor would keep its graph alive through a reference cycle
    (and so the activations the meter is measuring), for as long as the process runs."""
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU())
    meter = ActivationMemoryMeter(model.parameters())
    with meter:
        output = model(torch.randn(4, 64, requires_grad=True))
        assert meter.live_bytes == 4 * (4 * 64 + 4 * 128)
        del output
    assert meter.live_bytes == 0
