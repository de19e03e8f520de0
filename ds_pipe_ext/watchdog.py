"""Say which rank died when one does, and end the job at once instead of waiting on it.

When a rank dies, DeepSpeed's launcher notices within a second and terminates the ranks it started, but the
survivors die silently of its SIGTERM and the launcher's one line names the command of the last rank it
started, whichever rank died. A rank on another node is noticed only when a send or receive to it fails, or
after the process group's timeout (``deepspeed.init_distributed(timeout=...)``; DeepSpeed's default is 10
minutes, ``DEEPSPEED_TIMEOUT`` in minutes).

:class:`PeerWatchdog` learns the process of every rank on this node, then watches them from a thread. A rank
that finds one gone prints which rank died and exits with :data:`EXIT_PEER_DIED`, whether it notices first,
is stopped by the launcher's SIGTERM, or fails in a send or receive to the dead rank.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType, TracebackType
from typing import Any

import psutil

#: The exit status of a rank that stops because another rank on its node died.
EXIT_PEER_DIED = 1


@dataclass(frozen=True)
class Peer:
    """A rank's process, told apart from a later process with the same pid by its start time."""

    rank: int
    host: str
    pid: int
    started: float

    @classmethod
    def this_process(cls, rank: int) -> Peer:
        return cls(rank, socket.gethostname(), os.getpid(), psutil.Process().create_time())

    def is_alive(self) -> bool:
        try:
            process = psutil.Process(self.pid)
            return process.create_time() == self.started and process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False


class PeerWatchdog:
    """A context manager around training: inside it, a rank on this node dying ends every rank of the node.

    Entering and a normal exit are collectives (every rank must enter and leave it): leaving ends with a barrier,
    so no rank's normal exit looks like a death to a rank still watching. ``poll_seconds`` is how often the
    thread looks.
    """

    def __init__(self, poll_seconds: float = 0.25):
        self.poll_seconds = poll_seconds
        self.rank: int | None = None
        self.peers: list[Peer] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous_sigterm: Any = None
        self._handling_sigterm = False
        self._exiting = threading.Lock()

    def __enter__(self) -> PeerWatchdog:
        from deepspeed import comm as dist

        self.rank = dist.get_rank()
        everyone: list[Any] = [None] * dist.get_world_size()
        me = Peer.this_process(self.rank)
        dist.all_gather_object(everyone, me)
        self.peers = [peer for peer in everyone if peer.host == me.host and peer.rank != me.rank]
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="ds_pipe_ext-peer-watchdog", daemon=True)
        self._thread.start()
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, self._on_sigterm)
            self._previous_sigterm = signal.SIG_DFL if previous is None else previous  # None: set outside Python
            self._handling_sigterm = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._handling_sigterm:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._handling_sigterm = False
        if exc_type is None:
            from deepspeed import comm as dist

            dist.barrier()
        elif issubclass(exc_type, Exception):
            # A send or receive to a killed rank fails at once, often before the killed process is reaped.
            self._exit_if_a_peer_died(wait=4 * self.poll_seconds, cause=exc)

    def dead_peers(self) -> list[Peer]:
        """The ranks on this node whose process has ended."""
        return [peer for peer in self.peers if not peer.is_alive()]

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self._exit_if_a_peer_died()

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        # DeepSpeed's launcher sends SIGTERM after it reaped the dead rank, so the death is already visible.
        self._exit_if_a_peer_died(wait=2 * self.poll_seconds)
        previous = self._previous_sigterm
        signal.signal(signal.SIGTERM, previous)
        self._handling_sigterm = False
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.raise_signal(signum)

    def _exit_if_a_peer_died(self, wait: float = 0.0, cause: BaseException | None = None) -> None:
        deadline = time.monotonic() + wait
        dead = self.dead_peers()
        while not dead and time.monotonic() < deadline:
            time.sleep(self.poll_seconds / 5)
            dead = self.dead_peers()
        if not dead:
            return
        self._exiting.acquire()  # whoever saw it first reports and exits; the others wait for the exit
        lost = ", ".join(f"rank {peer.rank} (pid {peer.pid})" for peer in dead)
        detail = str(cause).splitlines()[0] if cause is not None and str(cause) else ""
        seen = f" (rank {self.rank} got {type(cause).__name__}: {detail})" if detail else ""
        print(
            f"[ds_pipe_ext] {lost} on {dead[0].host} died{seen}; rank {self.rank} stops too, so the job ends instead "
            "of waiting for it. Restart the job (from its last checkpoint to keep its progress).",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PEER_DIED)
