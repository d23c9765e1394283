"""Structures derived from a tensor, cached weakly on it: CSR row pointers and columns or block slot positions
of a mask (the index tensor), and the token-major copy of a layer input that q/k/v (or gate/up) share.

Without it the kernels rebuild these on every call (a ``searchsorted`` and integer divisions per forward and
backward, one transposed copy of the shared input per projection). The cache is keyed on the tensor object
itself (weakly, so an entry dies with its tensor) and remembers the tensor's version counter: ``set_mask`` /
``update_layer`` / ``.to()`` give a new tensor, and every in-place write (``load_state_dict`` copies into the
buffer, ``copy_``) bumps the version, so a stale entry is never used. Living inside the kernels, the cache is
invisible to ``torch.compile`` (the custom ops are opaque nodes) and needs no extra module state to keep in
sync under FSDP / DTensor or in checkpoints. Tensors without a version counter (inference mode) and tensor
subclasses are not cached.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
from torch.utils.weak import WeakTensorKeyDictionary

T = TypeVar("T")

# indices tensor -> {key: (version, value)}
_CACHE: WeakTensorKeyDictionary = WeakTensorKeyDictionary()


def _version(indices: torch.Tensor) -> int | None:
    if indices.is_inference() or type(indices) is not torch.Tensor:
        return None
    return indices._version


def cached(indices: torch.Tensor, key: Hashable, build: Callable[[], T]) -> T:
    """``build()``, reused while ``indices`` is the same tensor at the same version (rebuilt otherwise)."""
    version = _version(indices)
    if version is None:
        return build()
    entries = _CACHE.get(indices)
    if entries is None:
        entries = {}
        _CACHE[indices] = entries
    hit = entries.get(key)
    if hit is not None and hit[0] == version:
        return hit[1]
    value = build()
    entries[key] = (version, value)
    return value


def clear() -> None:
    """Drop every cached entry (tests, or to release memory at once)."""
    _CACHE.clear()


def cache_size() -> int:
    """Number of index tensors with cached structures."""
    return len(_CACHE)
