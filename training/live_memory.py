"""Live tensor memory, counted op by op: how many bytes of tensor storage exist at each moment of a computation, and
their peak, whatever device the tensors are on, ``meta`` included.

The memory planner (``training/planner.py``) predicts what a visit needs by running the visit's own code on
``meta`` tensors (shapes and dtypes, no data): no allocator reports anything there, so the bytes are counted here,
one storage at a time. Every aten operator (forward, backward and optimizer alike) passes through
``LiveMemory.__torch_dispatch__``; each storage an operator *creates* is counted once, when it first appears, and
uncounted when its last reference dies (a weak reference to the storage object: torch keeps one Python object per
live storage, so the callback fires exactly when the storage is freed). Views, in-place results and aliases of an
input share the input's storage and are never counted again, so tensors that existed before the tracker (the
model's weights) are never counted at all: the caller adds those.

The ``meta`` device has no values, so ``tensor.item()`` / ``bool(tensor)`` (``aten._local_scalar_dense``) would
fail; Hugging Face's mask code asks, e.g., whether an attention mask is all ones. The tracker answers for it: True
for a boolean tensor, 0 otherwise, the answers of an unpadded batch, the case a visit trains on.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["LiveMemory"]

_LOCAL_SCALAR = torch.ops.aten._local_scalar_dense.default


class LiveMemory(TorchDispatchMode):
    """Within the context: ``live`` (bytes of the tensor storages created since it was entered that are still
    alive) and ``peak`` (their maximum so far; ``reset_peak`` starts a new one). Storages freed after the context
    was left are still uncounted, so ``live`` stays right for a tracker entered again."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}  # storage key (_cdata) -> bytes counted for it
        self._refs: dict[int, weakref.ref] = {}  # keeps the weak references (and their callbacks) alive

    def reset_peak(self) -> None:
        """Start a new peak from the bytes alive now."""
        self.peak = self.live

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is _LOCAL_SCALAR and args[0].device.type == "meta":
            return _meta_scalar(args[0])
        out = func(*args, **kwargs)
        inputs = {key for key, _ in _storages(_leaves(args))}
        if kwargs:
            inputs.update(key for key, _ in _storages(_leaves(tuple(kwargs.values()))))
        for key, storage in _storages(_leaves(out)):
            if key not in inputs:
                self._count(key, storage)
            elif key in self._sizes and self._sizes[key] != storage.nbytes():  # resized in place (out= ops)
                self._grow(key, storage.nbytes() - self._sizes[key])
        return out

    def _count(self, key: int, storage: torch.UntypedStorage) -> None:
        if key in self._sizes:
            return
        self._sizes[key] = 0
        self._refs[key] = weakref.ref(storage, self._on_free(key))
        self._grow(key, storage.nbytes())

    def _grow(self, key: int, delta: int) -> None:
        self._sizes[key] += delta
        self.live += delta
        self.peak = max(self.peak, self.live)

    def _on_free(self, key: int) -> Callable[[weakref.ref], None]:
        def free(_: weakref.ref) -> None:
            self.live -= self._sizes.pop(key, 0)
            self._refs.pop(key, None)

        return free


def _meta_scalar(t: torch.Tensor) -> bool | int | float:
    """The value a meta tensor's ``.item()`` stands for: that of an unpadded batch (see the module docstring)."""
    if t.dtype == torch.bool:
        return True
    return 0.0 if t.is_floating_point() else 0


def _leaves(value: Any) -> Iterator[Any]:
    """The tensors (and other leaves) of an operator's arguments or results: tensors, or (nested) lists and tuples of
    them; faster than a general pytree walk, which matters at thousands of operators per simulated visit."""
    if isinstance(value, (tuple, list)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def _storages(values: Iterator[Any]) -> Iterator[tuple[int, torch.UntypedStorage]]:
    """(key, storage) of every tensor among ``values``; a tensor subclass made of inner tensors (a quantized weight)
    stands for the storages of those."""
    for value in values:
        if not isinstance(value, torch.Tensor):
            continue
        if type(value) is not torch.Tensor and hasattr(value, "__tensor_flatten__"):
            names, _ = value.__tensor_flatten__()
            yield from _storages(iter([getattr(value, name) for name in names]))
            continue
        try:
            storage = value.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested or storage-less tensors: nothing to count
            continue
        yield storage._cdata, storage
