"""The engine side: DeepSpeed's ``PipelineEngine`` running any registered schedule, and ``initialize``."""

from .initialize import initialize
from .pipeline_engine import SchedulePipelineEngine, send_window

__all__ = ["SchedulePipelineEngine", "initialize", "send_window"]
