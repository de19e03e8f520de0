"""What a schedule keeps alive: the peak bytes of activations saved for backward on this rank.

GPipe and 1F1B have the same bubble; they differ in how many micro-batches' activations a stage holds at once.
This meter counts the tensors autograd saves for backward (each storage once, parameters excluded) from the
moment they are saved until their graph is freed, which is exactly the memory the schedule decides.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import torch


class _Saved:
    __slots__ = ("tensor", "meter", "key")

    def __init__(self, tensor: torch.Tensor, meter: ActivationMemoryMeter, key: int):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter._release(self.key)


class ActivationMemoryMeter:
    """``with meter: engine.train_batch()`` records ``meter.peak_bytes``, the most activation bytes alive at once."""

    def __init__(self, parameters: Iterable[torch.Tensor] = ()):
        self._parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
        self._refs: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()  # backward may release saved tensors from autograd's threads
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def __enter__(self) -> ActivationMemoryMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def _pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self._parameter_storages or storage.nbytes() == 0:
            return tensor
        with self._lock:
            if self._refs.get(key, 0) == 0:
                self._sizes[key] = storage.nbytes()
                self.live_bytes += storage.nbytes()
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            self._refs[key] = self._refs.get(key, 0) + 1
        # an alias: holding a node's own output (ReLU saves it) would make a cycle through the graph, never freed
        return _Saved(tensor.detach(), self, key)

    @staticmethod
    def _unpack(saved):
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _release(self, key: int) -> None:
        with self._lock:
            self._refs[key] -= 1
            if self._refs[key] == 0:
                del self._refs[key]
                self.live_bytes -= self._sizes.pop(key)
