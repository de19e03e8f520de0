"""Checkpoints that resume exactly, check before they load, and follow a new stage layout.

DeepSpeed's ``save_checkpoint`` keeps the weights (one file per layer for a pipeline), the optimizer (one
``mp_rank_XX`` file per stage) and the step count, but not what an exact restart also needs: where each rank's
data loader stood and each rank's random state. Its ``load_checkpoint`` fails deep inside on a missing layer file
(an assertion), a truncated one (a zip error) or a different model (a size mismatch, without the file), and it
loads a stage's optimizer state into whichever stage has that index (with another stage count, stage 0's into every
stage), even if the stages hold other layers now.

Here :func:`save_checkpoint` adds the step, the stage boundaries, the layers each pipeline rank holds, the
optimizer's parameter names and every rank's random state to DeepSpeed's ``client_state``; :func:`read_checkpoint`
and :func:`check_checkpoint` reject a bad checkpoint from its files alone, on every rank, before any collective;
and :func:`load_checkpoint` loads through DeepSpeed, re-keying the optimizer state by parameter name when the ranks
hold other layers now. With virtual stages a rank holds several stages, not adjacent ones, and the same boundaries
placed another way (the loop or the v placement, another chunk count) put other layers on a rank: what is compared
is the layers of each rank, not the boundaries.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from .schedules.layout import Layout

#: The key of this module's state in DeepSpeed's ``client_state``.
CLIENT_KEY = "ds_pipe_ext"

_OPTIMIZER_RESTORED = "restored"
_OPTIMIZER_REKEYED = "re-keyed by parameter name for the new stage layout"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, read without loading its tensors.

    ``stage_boundaries`` is ``None`` for a checkpoint of a non-pipeline engine (its model is in
    ``mp_rank_00_model_states.pt``; a pipeline's is in one file per layer). ``rank_layers`` is, per pipeline
    rank, the ``[start, stop)`` layers of each chunk it held, in its chunk order (one chunk per rank without
    virtual stages; read from a checkpoint saved before it was recorded as one stage per rank).
    """

    path: Path
    tag: str
    step: int
    train_batch_size: int
    stage_boundaries: list[int] | None
    rank_layers: list[list[list[int]]] | None = None


@dataclass(frozen=True)
class ResumePoint:
    """What :func:`load_checkpoint` restored: the step to continue after, and how the optimizer state got in."""

    info: CheckpointInfo
    optimizer: str
    random_state: bool

    def describe(self) -> str:
        random_state = "random state" if self.random_state else "no random state (none saved for this rank)"
        return (
            f"{self.info.path} after step {self.info.step}: weights, optimizer state ({self.optimizer}), {random_state}"
        )


# ---- saving ----------------------------------------------------------------------------------------------------------


def save_checkpoint(engine: Any, save_dir: str | os.PathLike) -> Path:
    """``engine.save_checkpoint`` plus what an exact resume needs; returns the checkpoint's directory.

    DeepSpeed's rank 0 writes ``latest`` without waiting for the other ranks' files, so a job killed while saving
    can leave ``latest`` naming an incomplete checkpoint. Here ``latest`` is replaced only after DeepSpeed's closing
    barrier, when every rank has written its files (with DeepSpeed's default, synchronous checkpoint engine).
    A collective: every rank must call it (DeepSpeed's save is one too).
    """
    from deepspeed import comm as dist

    random_states: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(random_states, _random_state())
    state = {
        "step": engine.global_steps,
        "train_batch_size": engine.train_batch_size(),
        "stage_boundaries": _stage_boundaries(engine),
        "rank_layers": _rank_layers(engine),
        "optimizer_param_names": _optimizer_param_names(engine),
        "random_states": random_states,
    }
    tag = f"global_step{engine.global_steps}"
    engine.save_checkpoint(os.fspath(save_dir), tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
    if dist.get_rank() == 0:
        latest = Path(save_dir) / "latest"
        latest.with_name("latest.tmp").write_text(tag)
        os.replace(latest.with_name("latest.tmp"), latest)
    return Path(save_dir) / tag


def _stage_boundaries(engine: Any) -> list[int] | None:
    from deepspeed.pipe import PipelineModule

    return list(engine.module.parts) if isinstance(engine.module, PipelineModule) else None


def _rank_layers(engine: Any) -> list[list[list[int]]] | None:
    """Per pipeline rank, the ``[start, stop)`` layers of each chunk it holds, in its chunk order: the parameters,
    in the order of its optimizer state, that each rank's ``mp_rank_XX`` file holds."""
    from deepspeed.pipe import PipelineModule

    module = engine.module
    if not isinstance(module, PipelineModule):
        return None
    layout = getattr(module, "layout", None)
    if layout is None:  # DeepSpeed's own modules: DualPipeVModule holds two stages per rank in a V
        ranks = len(module.parts) - 1
        layout = Layout(ranks // 2, 2, "v") if hasattr(module, "phase_bounds") else Layout(ranks)
    return layers_per_rank(list(module.parts), layout)


def layers_per_rank(boundaries: Sequence[int], layout: Layout) -> list[list[list[int]]]:
    """Per rank of ``layout``, the ``[start, stop)`` layers of each of its chunks, in its chunk order, for the
    stages cut at ``boundaries`` (``layout.stages + 1`` of them)."""
    if len(boundaries) != layout.stages + 1:
        raise ValueError(f"{layout} places {layout.stages} stages, not the {len(boundaries) - 1} of {list(boundaries)}")
    return [
        [[boundaries[stage], boundaries[stage + 1]] for stage in (layout.stage(rank, c) for c in range(layout.chunks))]
        for rank in range(layout.ranks)
    ]


def _optimizer_param_names(engine: Any) -> list[list[str]] | None:
    """The optimizer's parameters by name, group by group, in the order its ``state_dict`` numbers them.

    A pipeline stage names its layers by their global index (``"16.weight"``), so the names mean the same
    parameter whichever stage holds it.
    """
    if not isinstance(engine.optimizer, torch.optim.Optimizer):
        return None
    names = {id(p): name for name, p in engine.module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in engine.optimizer.param_groups]


def _random_state() -> dict[str, Any]:
    from deepspeed.accelerator import get_accelerator

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        state["accelerator"] = accelerator.get_rng_state()
    return state


def _set_random_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "accelerator" in state:
        get_accelerator().set_rng_state(state["accelerator"])


# ---- checking, from the files alone ------------------------------------------------------------------------------


def read_checkpoint(load_dir: str | os.PathLike, tag: str | None = None) -> CheckpointInfo:
    """The checkpoint ``tag`` (default: the one ``load_dir/latest`` names), checked to be complete and ours.

    Reads the per-stage ``mp_rank_XX`` files memory-mapped, so no tensor is loaded; needs no process group.
    """
    load_dir = Path(load_dir)
    if tag is None:
        latest = load_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(
                f"no checkpoint to resume from in {load_dir}: {latest} does not exist "
                "(start without resuming, or point to the directory the run saved into)"
            )
        tag = latest.read_text().strip()
    path = load_dir / tag
    first = path / "mp_rank_00_model_states.pt"
    if not first.is_file():
        raise FileNotFoundError(f"checkpoint {path} is incomplete: {first.name} is missing; {_earlier(load_dir)}")
    metadata = _load_file(first, weights_only=False)
    state = metadata.get(CLIENT_KEY)
    if state is None:
        raise ValueError(
            f"checkpoint {path} has no step, data position or random state: it was saved by engine.save_checkpoint, "
            "not ds_pipe_ext.checkpoint.save_checkpoint; load it with engine.load_checkpoint instead"
        )
    for stage in range(1, metadata["mp_world_size"]):
        stage_file = path / f"mp_rank_{stage:02d}_model_states.pt"
        if not stage_file.is_file():
            raise FileNotFoundError(
                f"checkpoint {path} is incomplete: {stage_file.name} is missing; {_earlier(load_dir)}"
            )
        _load_file(stage_file, weights_only=False)
    boundaries = state["stage_boundaries"]
    rank_layers = state.get("rank_layers")
    if rank_layers is None and boundaries is not None:  # saved before the layers per rank were recorded
        rank_layers = layers_per_rank(boundaries, Layout(len(boundaries) - 1))
    return CheckpointInfo(
        path=path,
        tag=tag,
        step=state["step"],
        train_batch_size=state["train_batch_size"],
        stage_boundaries=boundaries,
        rank_layers=rank_layers,
    )


def check_checkpoint(info: CheckpointInfo, model: nn.Module | Sequence[Any]) -> None:
    """Raise, naming the file, unless the checkpoint holds every tensor of ``model`` with its shape.

    ``model`` is the layer list given to a ``PipelineModule`` (checked against the per-layer files), or the
    ``nn.Module`` of a non-pipeline engine (checked against ``mp_rank_00_model_states.pt``). Pass it built on
    the meta device to check without allocating it.
    """
    pipeline = not isinstance(model, nn.Module)
    if pipeline != (info.stage_boundaries is not None):
        written = "a pipeline engine" if info.stage_boundaries is not None else "a non-pipeline engine"
        wanted = "a pipeline (layer list)" if pipeline else "a non-pipeline model"
        raise ValueError(
            f"checkpoint {info.path} was written by {written} but is being loaded into {wanted}: load it with the "
            "kind of engine that wrote it"
        )
    if not pipeline:
        saved = _load_file(info.path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        _check_same_tensors(model.state_dict(), saved, info.path / "mp_rank_00_model_states.pt", "the model")
        return
    layers = list(model)
    for index, layer in enumerate(layers):
        module = _layer_module(layer)
        if module is None:
            continue
        files = sorted(info.path.glob(f"layer_{index:02d}-*model_states.pt"))
        if not files:
            raise FileNotFoundError(
                f"checkpoint {info.path} has no file layer_{index:02d}-model_states.pt for layer {index} "
                f"({type(module).__name__}): it is damaged, or from a model with fewer layers; "
                f"{_earlier(info.path.parent)}"
            )
        for file in files:
            saved = _load_file(file, weights_only=True)
            if len(files) == 1:  # tensor-sliced layers ("model" axis) hold slices: their shapes differ by design
                _check_same_tensors(module.state_dict(), saved, file, f"layer {index} ({type(module).__name__})")
    extra = sorted(
        file.name
        for file in info.path.glob("layer_*-*model_states.pt")
        if int(file.name[len("layer_") :].split("-")[0]) >= len(layers)
    )
    if extra:
        raise ValueError(
            f"checkpoint {info.path} is from a different model: it has {extra[-1]}, this model has {len(layers)} layers"
        )


def _layer_module(layer: Any) -> nn.Module | None:
    """The module whose state DeepSpeed saves for ``layer``, built on the meta device; None if it saves none."""
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    if isinstance(layer, nn.Module):
        return layer
    if isinstance(layer, TiedLayerSpec) and layer.forward_fn is not None:
        return None  # DeepSpeed runs a function of the tied module here and saves no file
    if isinstance(layer, LayerSpec):
        with torch.device("meta"):
            return layer.build()
    return None


def _earlier(load_dir: Path) -> str:
    return f"resume from an earlier checkpoint: write its tag (a directory in {load_dir}) into {load_dir}/latest"


def _load_file(path: Path, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    except Exception as exc:  # noqa: BLE001 - a zip, pickle or EOF error all mean the same to the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"checkpoint file {path} is truncated or unreadable ({reason}); {_earlier(path.parent.parent)}"
        ) from exc


def _check_same_tensors(expected: dict[str, Any], saved: dict[str, Any], path: Path, what: str) -> None:
    missing = [key for key in expected if key not in saved]
    unexpected = [key for key in saved if key not in expected]
    if missing or unexpected:
        raise ValueError(
            f"checkpoint file {path} is from a different model: {what} has tensors {sorted(expected)}, the file has "
            f"{sorted(saved)}"
        )
    for key, tensor in expected.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"checkpoint file {path} is from a different model: {what} has {key} of shape {tuple(tensor.shape)}, "
                f"the file has {tuple(saved[key].shape)}"
            )


# ---- loading -------------------------------------------------------------------------------------------------------


def load_checkpoint(engine: Any, info: CheckpointInfo) -> ResumePoint:
    """Load ``info``'s checkpoint into ``engine`` and restore this rank's random state.

    Where every pipeline rank holds the layers it held when saved, this is ``engine.load_checkpoint``. Otherwise
    (another partition, stage count, chunk count or placement) DeepSpeed's per-stage optimizer state would land on
    the wrong parameters, so the weights come from DeepSpeed (one file per layer, any layout) and the optimizer
    state is put together by parameter name from every stage's file. Call it last, after building data loaders:
    creating a ``DataLoader`` iterator draws from torch's generator. A collective.
    """
    from deepspeed import comm as dist

    same_layout = _rank_layers(engine) == info.rank_layers
    if not same_layout and engine.optimizer is not None and not isinstance(engine.optimizer, torch.optim.Optimizer):
        if _stage_boundaries(engine) == info.stage_boundaries:
            saved, now = f"layers per pipeline rank {info.rank_layers}", f"{_rank_layers(engine)}"
        else:
            saved, now = f"stage boundaries {info.stage_boundaries}", f"{_stage_boundaries(engine)}"
        raise ValueError(
            f"checkpoint {info.path} was saved with {saved}, this run has {now}: the state of "
            f"{type(engine.optimizer).__name__} (ZeRO, fp16 or bf16) is stored per stage and cannot follow; resume "
            f"with the saved boundaries (partition_method='manual:{','.join(map(str, info.stage_boundaries or []))}'),"
            " as many stages and the same schedule placement and chunk count"
        )
    load_path, client_state = engine.load_checkpoint(
        os.fspath(info.path.parent), tag=info.tag, load_optimizer_states=same_layout
    )
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint at {info.path}")
    optimizer = _OPTIMIZER_RESTORED
    if not same_layout and engine.optimizer is not None:
        _load_optimizer_by_name(engine, info)
        optimizer = _OPTIMIZER_REKEYED
    random_states = client_state[CLIENT_KEY]["random_states"]
    rank = dist.get_rank()
    if rank < len(random_states):
        _set_random_state(random_states[rank])
    return ResumePoint(info=info, optimizer=optimizer, random_state=rank < len(random_states))


def _load_optimizer_by_name(engine: Any, info: CheckpointInfo) -> None:
    """Give ``engine.optimizer`` the saved state of each of its parameters, found by name in any stage's file."""
    names_by_group = _optimizer_param_names(engine)
    wanted = {name for names in names_by_group for name in names}
    saved_state: dict[str, Any] = {}
    saved_group: dict[str, dict[str, Any]] = {}
    for path in sorted(info.path.glob("mp_rank_*_model_states.pt")):
        checkpoint = _load_file(path, weights_only=False)
        optimizer, saved_names = checkpoint["optimizer"], checkpoint[CLIENT_KEY]["optimizer_param_names"]
        if optimizer is None or saved_names is None:
            raise ValueError(
                f"{path} keeps its optimizer state per stage (ZeRO, fp16 or bf16), so it cannot follow new stage "
                f"boundaries: resume with the saved ones, {info.stage_boundaries}"
            )
        for names, group in zip(saved_names, optimizer["param_groups"]):
            hyperparameters = {key: value for key, value in group.items() if key != "params"}
            for name, index in zip(names, group["params"]):
                saved_group[name] = hyperparameters
                if name in wanted and index in optimizer["state"]:  # copied out of the memory-mapped file
                    saved_state[name] = {
                        key: value.clone() if torch.is_tensor(value) else value
                        for key, value in optimizer["state"][index].items()
                    }
    current = engine.optimizer.state_dict()
    state = {}
    for names, group in zip(names_by_group, current["param_groups"]):
        absent = [name for name in names if name not in saved_group]
        if absent:
            raise ValueError(f"checkpoint {info.path} has no optimizer state for parameters {absent}")
        group.update(saved_group[names[0]])
        state.update({index: saved_state[name] for name, index in zip(names, group["params"]) if name in saved_state})
    engine.optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


# ---- the data position -----------------------------------------------------------------------------------------


class _SkipOnce(Sampler[int]):
    """``sampler``'s order without its first ``skip`` indices on the first pass; whole passes after that, as
    ``RepeatingLoader`` starts a new epoch."""

    def __init__(self, sampler: Sampler[int], skip: int):
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.sampler), skip, None)

    def __len__(self) -> int:
        return len(self.sampler) - self.skip


def repeating_loader(engine: Any, dataset: Dataset, completed_steps: int = 0) -> Any:
    """The training loader DeepSpeed's ``PipelineEngine`` builds from ``training_data`` (a ``DistributedSampler``
    in order, micro-batches, repeated), positioned after ``completed_steps`` steps of ``engine``'s batch size.

    Each data-parallel replica has read ``completed_steps x gradient_accumulation_steps`` micro-batches of its own
    share; the loader skips those in the current epoch without loading them. For a pipeline engine, give it to
    ``engine.set_dataloader``; for another engine, iterate it.
    """
    from deepspeed import comm as dist
    from deepspeed.utils import RepeatingLoader
    from torch.utils.data.distributed import DistributedSampler

    rank = engine.mpu.get_data_parallel_rank() if engine.mpu is not None else dist.get_rank()
    sampler = DistributedSampler(dataset, num_replicas=engine.dp_world_size, rank=rank, shuffle=False)
    micro_batch = engine.train_micro_batch_size_per_gpu()
    per_epoch = len(sampler) // micro_batch if engine.dataloader_drop_last() else math.ceil(len(sampler) / micro_batch)
    consumed = completed_steps * engine.gradient_accumulation_steps()
    skip = (consumed % per_epoch) * micro_batch
    return RepeatingLoader(engine.deepspeed_io(dataset, data_sampler=_SkipOnce(sampler, skip)))
