"""Where the stages of a pipeline live: K ranks, each holding ``chunks`` model chunks (virtual stages).

A model cut into K x v stages runs on K pipeline ranks; rank r's chunk c is one of those stages. Two placements
are in use: ``loop`` (Megatron's interleaved 1F1B: rank r holds stages r, r + K, r + 2K, ...) and ``v`` (ZB-V and
DualPipeV, two chunks: rank r holds stage r and stage 2K - 1 - r, so rank 0 holds the first and the last stage and
the turn happens on the last rank, without a transfer). Without virtual stages (one chunk) both are the plain
pipeline: rank r holds stage r.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PLACEMENTS", "Layout"]

PLACEMENTS = ("loop", "v")


@dataclass(frozen=True)
class Layout:
    """``ranks`` pipeline ranks holding ``chunks`` chunks each, placed by ``placement``."""

    ranks: int
    chunks: int = 1
    placement: str = "loop"

    def __post_init__(self) -> None:
        if self.placement not in PLACEMENTS:
            raise ValueError(f"unknown placement {self.placement!r}: use one of {', '.join(PLACEMENTS)}")
        if self.ranks < 1 or self.chunks < 1:
            raise ValueError(f"a layout needs at least one rank and one chunk, got {self.ranks} and {self.chunks}")
        if self.placement == "v" and self.chunks != 2:
            raise ValueError(f"the v placement holds two chunks per rank, not {self.chunks}")

    @property
    def stages(self) -> int:
        """Stages in all, virtual ones counted."""
        return self.ranks * self.chunks

    def stage(self, rank: int, chunk: int) -> int:
        """The global stage of ``rank``'s ``chunk``."""
        if self.placement == "v" and chunk == 1:
            return 2 * self.ranks - 1 - rank
        return chunk * self.ranks + rank

    def location(self, stage: int) -> tuple[int, int]:
        """The (rank, chunk) that holds global ``stage``."""
        if self.placement == "v" and stage >= self.ranks:
            return 2 * self.ranks - 1 - stage, 1
        return stage % self.ranks, stage // self.ranks
