"""The DeepSpeed releases ds_pipe_ext runs on, and every place where they differ.

ds_pipe_ext supports DeepSpeed 0.17.0 up to the newest 0.19.x (:data:`SUPPORTED_DEEPSPEED`); CI runs the tests on
the oldest and the newest (:data:`TESTED_DEEPSPEED`). The rest of the package calls this module wherever releases
differ, and checks no version itself. What differs (read in the sources of 0.17.0, 0.17.6, 0.18.0, 0.18.2-0.18.4,
0.18.6, 0.18.7, 0.18.9 and 0.19.0-0.19.8; the release named is the first that has it):

- :func:`load_ds_config`: ``deepspeed.runtime.tensor_parallel.init_utils.load_ds_config`` is there from 0.18.5
  or 0.18.6 (inside ``DeepSpeedConfig`` before).
- :func:`loss_for_backward`: from 0.18.3 a hook on each stage output divides its gradient by the accumulation
  steps; before it ``PipelineEngine`` divides nowhere (its micro-batches' gradients sum).
- :func:`running_engine_backward`: that hook refuses a backward ``engine.backward`` did not start unless
  ``_running_engine_backward`` is set; ``PipelineEngine`` sets it for its own backwards from 0.18.5 or 0.18.6.
- :func:`stage_output_grad`: from 0.19.3 the hook divides on the last stage only; before, every other stage
  divides the gradient it received once more.
- ``deepspeed.comm.isend`` posts a send from 0.19.6; before, it is a blocking ``send`` returning None. The engine
  posts with ``torch.distributed`` on its own per-link groups (``engine/channels.py``), the same on every release.
- :func:`config_for_deepspeed`: before 0.19.1 DeepSpeed pops ``torch_adam`` out of the caller's config dict.
- :func:`dualpipev`: DeepSpeed's DualPipeV (``deepspeed.runtime.pipe.dualpipev``) is there from 0.19.8.
- :func:`backward_in_pieces`, :func:`split_backward_loss`: from 0.18.3 ``engine.backward`` is pieces the split backward
  can call around each half: the loss scaled by ``engine.scale``'s dispatch (ZeRO optimizers' loss scaler, torch
  autocast's ``GradScaler``), hooks on the stage outputs and the parameters, and ``_backward_epilogue``; before, it
  is one call of ``optimizer.backward(loss)`` for fp16, bf16 and ZeRO, which scales, runs autograd and post-processes
  at once. The split backward runs fp16, bf16 and ZeRO from 0.18.3 (read in 0.18.3-0.19.5, tested on 0.19.8).
  In 0.19.8 (not yet in 0.19.5) ``engine.backward`` divides the loss by the accumulation steps itself and marks its
  graph so that the output hooks do not divide again; :func:`split_backward_loss` does as the release does.

So DeepSpeed's own engine (schedule ``"deepspeed"``) trains with another gradient scale on older releases
(:func:`stock_pipeline_gradient_scale`); ``SchedulePipelineEngine`` divides as 0.19.8 does on every release.
Which release is installed is read from its package metadata, so ``import ds_pipe_ext`` (and ``ds-pipe --help``)
does not import DeepSpeed; this module imports DeepSpeed only inside its functions.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

__all__ = [
    "ALLOW_UNTESTED_ENV",
    "SUPPORTED_DEEPSPEED",
    "TESTED_DEEPSPEED",
    "UnsupportedDeepSpeedError",
    "UntestedDeepSpeedWarning",
    "backward_in_pieces",
    "check_deepspeed",
    "config_for_deepspeed",
    "dualpipev",
    "installed_deepspeed",
    "is_dualpipev_module",
    "load_ds_config",
    "loss_for_backward",
    "running_engine_backward",
    "split_backward_loss",
    "stage_output_grad",
    "stock_pipeline_gradient_scale",
]

#: DeepSpeed releases ds_pipe_ext supports (setup.cfg's ``install_requires`` declares the same).
SUPPORTED_DEEPSPEED = ">=0.17.0,<0.20"
#: The oldest supported release, and the first minor release that is not supported (not yet tested).
OLDEST, NEXT_MINOR = (0, 17, 0), (0, 20)
#: The releases CI runs the tests on: the oldest supported and the newest.
TESTED_DEEPSPEED = ("0.17.0", "0.19.8")
#: Set to 1 to run on a DeepSpeed newer than the supported range (with a warning) instead of refusing it.
ALLOW_UNTESTED_ENV = "DS_PIPE_EXT_ALLOW_UNTESTED_DEEPSPEED"
#: The first release with DeepSpeed's own DualPipeV classes.
DUALPIPEV_SINCE = "0.19.8"
#: The first release whose backward the split backward reproduces with fp16, bf16 or ZeRO (:func:`backward_in_pieces`).
SPLIT_PRECISION_SINCE = "0.18.3"


class UnsupportedDeepSpeedError(ImportError):
    """The installed DeepSpeed is outside :data:`SUPPORTED_DEEPSPEED`, missing, or lacks what a feature needs."""


class UntestedDeepSpeedWarning(UserWarning):
    """ds_pipe_ext runs on a DeepSpeed newer than it was tested with, because :data:`ALLOW_UNTESTED_ENV` is set."""


# ---- which release, and the policy -----------------------------------------------------------------------------------


def installed_deepspeed() -> str | None:
    """The installed DeepSpeed's version, from its package metadata (DeepSpeed is not imported); None if missing."""
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, int, int]:
    """``"0.17.6+cpu"`` -> ``(0, 17, 6)``: the numeric release, without pre-release, post or local parts."""
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        raise UnsupportedDeepSpeedError(f"cannot read DeepSpeed's version {version!r}")
    major, minor, micro = match.groups()
    return int(major), int(minor), int(micro or 0)


def check_deepspeed(version: str | None = None, environ: Any = None) -> str:
    """Raise :class:`UnsupportedDeepSpeedError` unless DeepSpeed ``version`` (default: the installed one) may run;
    return the version. ``import ds_pipe_ext`` calls it.

    The policy: releases in :data:`SUPPORTED_DEEPSPEED` run. A newer minor release (0.20 and later) may change the
    ``PipelineEngine`` internals the engine hook overrides, so it is refused, naming the supported range and
    :data:`ALLOW_UNTESTED_ENV`; with that variable set to 1 it runs, with an :class:`UntestedDeepSpeedWarning`.
    Releases older than 0.17.0 are refused (no variable lets them run).
    """
    environ = os.environ if environ is None else environ
    version = installed_deepspeed() if version is None else version
    install = f"pip install 'deepspeed{SUPPORTED_DEEPSPEED}'"
    if version is None:
        raise UnsupportedDeepSpeedError(f"ds_pipe_ext needs DeepSpeed {SUPPORTED_DEEPSPEED}, not installed: {install}")
    found = release(version)
    if found < OLDEST:
        raise UnsupportedDeepSpeedError(
            f"ds_pipe_ext supports DeepSpeed {SUPPORTED_DEEPSPEED}; DeepSpeed {version} is older: {install}"
        )
    if found[:2] < NEXT_MINOR:
        return version
    if environ.get(ALLOW_UNTESTED_ENV, "0") in ("", "0"):
        raise UnsupportedDeepSpeedError(
            f"ds_pipe_ext supports DeepSpeed {SUPPORTED_DEEPSPEED}; DeepSpeed {version} is newer and untested (a minor "
            f"release may change the PipelineEngine internals ds_pipe_ext's engine overrides): {install}, or set "
            f"{ALLOW_UNTESTED_ENV}=1 to try it anyway"
        )
    warnings.warn(
        f"ds_pipe_ext runs on DeepSpeed {version}, outside the tested {SUPPORTED_DEEPSPEED}, because "
        f"{ALLOW_UNTESTED_ENV} is set: check that a run's losses match schedule 'deepspeed' before trusting it",
        UntestedDeepSpeedWarning,
        stacklevel=2,
    )
    return version


# ---- where releases differ -------------------------------------------------------------------------------------------


def load_ds_config(config: Any) -> dict:
    """A DeepSpeed config (a JSON/HJSON file's path, its base64 text, or a dict) as a dict, read as DeepSpeed does."""
    try:
        from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config as deepspeeds
    except ImportError:  # before 0.18.5 or 0.18.6 the same lines were inside DeepSpeedConfig
        deepspeeds = _load_ds_config
    return deepspeeds(config)


def _load_ds_config(config: Any) -> dict:
    """DeepSpeed 0.19.8's ``load_ds_config``, for the releases without one."""
    import base64

    import hjson
    from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

    if isinstance(config, dict):
        return config
    if isinstance(config, str):
        if os.path.exists(config):
            with open(config) as file:
                return hjson.load(file, object_pairs_hook=dict_raise_error_on_duplicate_keys)
        try:
            return hjson.loads(base64.urlsafe_b64decode(config).decode("utf-8"))
        except (UnicodeDecodeError, AttributeError, ValueError) as exc:
            raise ValueError(
                "Expected a string path to an existing deepspeed config, or a dictionary or a valid base64. "
                f"Received: {config}"
            ) from exc
    raise ValueError(
        f"Expected a string path to an existing deepspeed config, or a dictionary or a valid base64. Received: {config}"
    )


def config_for_deepspeed(config: Any) -> Any:
    """What to give ``deepspeed.initialize`` as its config: a copy of a dict. Before 0.19.1 DeepSpeed pops
    ``torch_adam`` and ``adam_w_mode`` out of the dict it is given, so a second engine built from the same dict got
    FusedAdam instead of ``torch.optim.Adam`` (and a checkpoint of the one does not load into the other)."""
    import copy

    return copy.deepcopy(config) if isinstance(config, dict) else config


def _output_hook_scales() -> bool:
    """Whether DeepSpeed's forward hooks each output to divide its gradient by the accumulation steps (0.18.3 on)."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return hasattr(DeepSpeedEngine, "_backward_prologue_per_tensor")


def loss_for_backward(engine: Any, loss: Any) -> Any:
    """The last stage's ``loss`` to run the backward from, so that gradients are divided by the accumulation steps
    once. From 0.18.3 DeepSpeed's hook on the stage output divides; before it ``engine.backward`` divided only with
    ``enable_backward_allreduce``, which ``PipelineEngine`` turns off, so its micro-batches' gradients summed."""
    if _output_hook_scales() or engine.enable_backward_allreduce:
        return loss
    return loss / engine.gradient_accumulation_steps()


@contextmanager
def running_engine_backward(engine: Any) -> Iterator[None]:
    """Around a backward ``engine.backward`` did not start: DeepSpeed's output hook (0.18.3 on) refuses one unless
    ``_running_engine_backward`` is set. ``PipelineEngine`` sets it for its own from 0.18.5 or 0.18.6; in 0.18.3 and
    0.18.4 the backward of DeepSpeed's own stages but the last fail."""
    engine._running_engine_backward = True
    try:
        yield
    finally:
        engine._running_engine_backward = False


def stage_output_grad(engine: Any, grad: Any) -> Any:
    """What the hook on a stage output (0.18.3 on) does to its gradient: divide by the accumulation steps on the last
    stage only. Every other stage receives a gradient divided already; before 0.19.3 DeepSpeed divided it again."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return DeepSpeedEngine._backward_prologue_per_tensor(engine, grad) if engine.is_last_stage() else grad


def backward_in_pieces() -> bool:
    """Whether ``engine.backward`` is made of pieces the split backward can run around each of its halves (0.18.3
    on): ``engine.scale`` scales the loss as ``engine.backward`` does, the optimizers' work happens in hooks on the
    stage outputs and the parameters, and ``engine._backward_epilogue`` ends it. Before 0.18.3, fp16, bf16 and ZeRO
    run their backward as one ``optimizer.backward(loss)``, which cannot be split."""
    from deepspeed.runtime.engine import DeepSpeedEngine

    return hasattr(DeepSpeedEngine, "scale")


def _engine_backward_marks_its_graph() -> bool:
    """Whether ``engine.backward`` divides the loss by the accumulation steps itself and marks the autograd graph it
    runs, so that DeepSpeed's hooks on the stage outputs leave that graph's gradients alone (0.19.8; from 0.18.3 to
    0.19.5 at least, the hooks divide and the loss is not)."""
    from deepspeed.runtime import engine as ds_engine

    return hasattr(ds_engine, "_ENGINE_BACKWARD_GRAPH_TRACKER")


@contextmanager
def split_backward_loss(engine: Any, loss: Any) -> Iterator[Any]:
    """The last stage's ``loss`` to start a split backward's I from, as ``engine.backward`` starts its backward:
    divided by the accumulation steps once, and scaled as ``engine.backward`` scales it (``engine.scale``: the loss
    scaler of DeepSpeed's ZeRO optimizers, torch autocast's ``GradScaler``; nothing for fp32 and bf16, nor for fp16
    without ZeRO, whose FP16_Optimizer ``engine.backward`` leaves unscaled from 0.18.3).

    Where ``engine.backward`` divides the loss and marks its graph (0.19.8), this does the same with DeepSpeed's own
    tracker, for the backward run inside the ``with``; elsewhere the loss is :func:`loss_for_backward`'s. Releases
    without ``engine.scale`` run the split in fp32 only (:func:`backward_in_pieces`), unscaled."""
    if not _engine_backward_marks_its_graph():
        loss = loss_for_backward(engine, loss)
        yield engine.scale(loss) if backward_in_pieces() else loss
        return
    from deepspeed.runtime.engine import _ENGINE_BACKWARD_GRAPH_TRACKER as tracker

    state = tracker.new_state()
    loss = engine.scale(loss / engine.gradient_accumulation_steps())
    handle = None
    if loss.requires_grad:
        handle = loss.register_hook(lambda grad: tracker.register_current_graph(grad, state))
    try:
        yield loss
    finally:
        if handle is not None:
            handle.remove()
        tracker.unregister(state)


def stock_pipeline_gradient_scale(stages: int, accumulation_steps: int) -> list[float]:
    """Per stage, what DeepSpeed's own ``PipelineEngine`` (schedule ``"deepspeed"``) multiplies the sum of the
    micro-batches' gradients by on this release: ``1 / accumulation_steps`` on every stage from 0.19.3 (and in
    ``SchedulePipelineEngine`` on every release); 1 (a sum) before 0.18.3; in between, the last stage's share once,
    every other stage's twice."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    once = 1 / accumulation_steps
    if not _output_hook_scales():
        return [1.0] * stages
    if "_backward_prologue_per_tensor" in vars(PipelineEngine):
        return [once] * stages
    return [once * once] * (stages - 1) + [once]


def check_loss_rank(placement: str, schedule: str) -> None:
    """Refuse a placement whose last stage is not on the last pipeline rank (``v``) where DeepSpeed broadcasts the
    loss from the last rank regardless: before 0.19.8 ``train_batch`` does not ask the engine
    (``_loss_stage_global_rank``), and every rank would wait in a different broadcast."""
    from deepspeed.runtime.pipe.engine import PipelineEngine

    if placement == "v" and not hasattr(PipelineEngine, "_loss_stage_global_rank"):
        raise UnsupportedDeepSpeedError(
            f"schedule {schedule!r} puts the last stage (the loss) on the first pipeline rank, but DeepSpeed "
            f"{installed_deepspeed()} broadcasts the loss from the last rank only; run it on DeepSpeed "
            f"{DUALPIPEV_SINCE} or later (pip install 'deepspeed>={DUALPIPEV_SINCE},<{NEXT_MINOR[0]}.{NEXT_MINOR[1]}'),"
            " or use a loop-placed schedule (interleaved-1f1b, interleaved-zb)"
        )


def dualpipev(feature: str = "this") -> Any:
    """DeepSpeed's ``deepspeed.runtime.pipe.dualpipev`` module, or an :class:`UnsupportedDeepSpeedError` saying
    that ``feature`` needs DeepSpeed 0.19.8 or later."""
    try:
        from deepspeed.runtime.pipe import dualpipev as module
    except ImportError as exc:
        raise UnsupportedDeepSpeedError(
            f"{feature} needs DeepSpeed's DualPipeV (deepspeed.runtime.pipe.dualpipev), which DeepSpeed has from "
            f"{DUALPIPEV_SINCE} on; this is DeepSpeed {installed_deepspeed()}: pip install "
            f"'deepspeed>={DUALPIPEV_SINCE},<{NEXT_MINOR[0]}.{NEXT_MINOR[1]}'"
        ) from exc
    return module


def is_dualpipev_module(model: Any) -> bool:
    """Whether ``model`` is DeepSpeed's ``DualPipeVModule`` (never, on a release without one)."""
    try:
        module = dualpipev()
    except UnsupportedDeepSpeedError:
        return False
    return isinstance(model, module.DualPipeVModule)
