"""Reading and checking a DeepSpeed config before any rank touches a collective.

DeepSpeed checks batch sizes inside the engine with a bare assertion, after process groups exist. These
checks run first, on every rank, from the config alone, so a bad launch fails everywhere with one message.
"""

from __future__ import annotations

from typing import Any

#: The schedule name that means "DeepSpeed's untouched engine and its TrainSchedule".
DEEPSPEED_BUILTIN = "deepspeed"
DEFAULT_SCHEDULE = "1f1b"


def load_config(args: Any = None, config: Any = None) -> dict:
    """The config as a dict, from ``args.deepspeed_config`` (a path) or ``config`` (a path or a dict)."""
    from deepspeed.runtime.tensor_parallel.init_utils import load_ds_config

    if getattr(args, "deepspeed_config", None) is not None:
        if config is not None:
            raise ValueError("pass the DeepSpeed config either as --deepspeed_config or as config=, not both")
        config = args.deepspeed_config
    if config is None:
        raise ValueError("DeepSpeed needs a config: pass --deepspeed_config ds_config.json (or config=)")
    return dict(config) if isinstance(config, dict) else load_ds_config(config)


def schedule_name(schedule: str | None, config: dict) -> str:
    """The schedule to run: ``schedule``, else ``config["pipeline"]["schedule"]``, else 1F1B; checked."""
    from .schedules import get_schedule

    name = (schedule or config.get("pipeline", {}).get("schedule") or DEFAULT_SCHEDULE).lower()
    if name != DEEPSPEED_BUILTIN:
        get_schedule(name)
    return name


def gradient_accumulation_steps(config: dict, data_parallel_size: int) -> int:
    """Micro-batches per step implied by the config, or a ValueError that says which size to change.

    DeepSpeed requires ``train_batch_size == micro_batch * accumulation_steps * data_parallel_size`` and
    fills in whichever one of the three is missing.
    """
    train = config.get("train_batch_size")
    micro = config.get("train_micro_batch_size_per_gpu")
    gas = config.get("gradient_accumulation_steps")
    dp = data_parallel_size
    if train is not None and micro is not None:
        if train % (micro * dp):
            raise ValueError(
                f"train_batch_size {train} is not micro-batch {micro} x accumulation steps x data-parallel size "
                f"{dp}: make train_batch_size a multiple of {micro * dp}"
            )
        implied = train // (micro * dp)
        if gas is not None and gas != implied:
            raise ValueError(
                f"gradient_accumulation_steps {gas} disagrees with train_batch_size {train} = micro-batch {micro} x "
                f"accumulation steps x data-parallel size {dp} (which needs {implied}); drop one of the three"
            )
        return implied
    if train is not None and gas is not None:
        if train % (gas * dp):
            raise ValueError(
                f"train_batch_size {train} is not divisible by accumulation steps {gas} x data-parallel size {dp}"
            )
        return gas
    if micro is not None:
        return gas or 1
    raise ValueError("the DeepSpeed config needs train_batch_size or train_micro_batch_size_per_gpu")
