"""Where to cut a pipeline's layer list into stages, chosen by name.

:mod:`.solver` is the exact min-max solver, :mod:`.costs` what layers cost (counted or measured),
:mod:`.context` what a method may look at, :mod:`.registry` the names, :mod:`.methods` the methods and
:mod:`.report` the report of a partition.
"""

from . import methods  # noqa: F401  (registers the built-in methods)
from .context import PartitionContext, SampleInput
from .costs import LayerCosts, LayerStats
from .registry import available_partition_methods, get_partition_method, register_partition_method
from .report import PartitionReport, compare_partitions, format_comparison, partition_report
from .solver import balance, check_boundaries, min_max_split

__all__ = [
    "LayerCosts",
    "LayerStats",
    "PartitionContext",
    "PartitionReport",
    "SampleInput",
    "available_partition_methods",
    "balance",
    "check_boundaries",
    "compare_partitions",
    "format_comparison",
    "get_partition_method",
    "min_max_split",
    "partition_report",
    "register_partition_method",
]
