"""ds_pipe_ext: better partitioning, pluggable schedules and a view into DeepSpeed's pipeline engine.

The heavy pieces (they import DeepSpeed) load on first use, so ``ds-pipe --help`` stays quick.
"""

from importlib import import_module

from .compat import SUPPORTED_DEEPSPEED, check_deepspeed

__version__ = "0.1.0"

# An unsupported DeepSpeed fails here, naming the supported range; read from package metadata, not imported.
check_deepspeed()

_LAZY = {
    "PipelineModule": "ds_pipe_ext.module",
    "initialize": "ds_pipe_ext.engine",
    "SchedulePipelineEngine": "ds_pipe_ext.engine",
    "get_schedule": "ds_pipe_ext.schedules",
    "register_schedule": "ds_pipe_ext.schedules",
    "available_schedules": "ds_pipe_ext.schedules",
    "validate": "ds_pipe_ext.observe.simulation",
    "simulate": "ds_pipe_ext.observe.simulation",
    "balance": "ds_pipe_ext.partition",
    "register_partition_method": "ds_pipe_ext.partition",
    "available_partition_methods": "ds_pipe_ext.partition",
    "make_topology": "ds_pipe_ext.topology",
}

__all__ = ["SUPPORTED_DEEPSPEED", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ds_pipe_ext' has no attribute {name!r}")
