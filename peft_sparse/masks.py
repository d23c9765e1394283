"""Mask scoring and selection: pure tensor functions, no modules.

A mask is a sorted 1-D tensor of flat positions in the weight's storage layout (entries), or of flat positions
in the grid of ``block_size x block_size`` blocks covering the weight (blocks; ragged edge blocks are smaller).
"""

from __future__ import annotations

import math
import zlib

import torch

SCORE_KINDS = ("magnitude", "gradient", "snip")


def index_dtype(numel: int) -> torch.dtype:
    """int32 when every position fits, else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def block_grid(shape: tuple[int, int], block_size: int) -> tuple[int, int]:
    """Number of block rows and block columns covering a weight of ``shape``."""
    return math.ceil(shape[0] / block_size), math.ceil(shape[1] / block_size)


def num_slots(shape: tuple[int, int], block_size: int | None) -> int:
    """Number of selectable units: entries, or blocks of the grid."""
    if block_size is None:
        return shape[0] * shape[1]
    rows, cols = block_grid(shape, block_size)
    return rows * cols


def score(weight: torch.Tensor, grad: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Saliency of every weight entry: |W|, |dL/dW| or |W * dL/dW| (float32)."""
    if kind == "magnitude":
        return weight.detach().abs().float()
    if grad is None:
        raise ValueError(f"score kind {kind!r} needs a gradient")
    if kind == "gradient":
        return grad.detach().abs().float()
    if kind == "snip":
        return (weight.detach().float() * grad.detach().float()).abs()
    raise ValueError(f"unknown score kind {kind!r}; expected one of {SCORE_KINDS}")


def block_scores(scores: torch.Tensor, block_size: int) -> torch.Tensor:
    """Sum of entry scores in each block (ragged edges padded with zeros), flattened over the block grid."""
    rows, cols = block_grid(tuple(scores.shape), block_size)
    padded = scores.new_zeros(rows * block_size, cols * block_size)
    padded[: scores.shape[0], : scores.shape[1]] = scores
    return padded.view(rows, block_size, cols, block_size).sum(dim=(1, 3)).flatten()


def top_k_indices(flat_scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` largest scores, sorted ascending; ties go to the lower position (deterministic)."""
    flat = flat_scores.detach().flatten()
    n = flat.numel()
    if not 0 <= k <= n:
        raise ValueError(f"cannot keep {k} of {n} positions")
    if k in (0, n):
        return torch.arange(k, device=flat.device).to(index_dtype(n))
    kth = torch.topk(flat, k, sorted=False).values.min()  # the k-th largest score: O(n log k), no full sort
    above = torch.nonzero(flat > kth).flatten()
    ties = torch.nonzero(flat == kth).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values.to(index_dtype(n))


def select(scores: torch.Tensor, k: int, block_size: int | None) -> torch.Tensor:
    """Top-``k`` entries (or blocks when ``block_size`` is set) of a 2-D score matrix."""
    flat = scores.flatten() if block_size is None else block_scores(scores, block_size)
    return top_k_indices(flat, k)


def select_global(scores: dict[str, torch.Tensor], total: int, block_size: int | None) -> dict[str, torch.Tensor]:
    """Top-``total`` units over all layers together; returns the per-layer selection (possibly empty)."""
    flats = {name: (s.flatten() if block_size is None else block_scores(s, block_size)) for name, s in scores.items()}
    sizes = [f.numel() for f in flats.values()]
    if total > sum(sizes):
        raise ValueError(f"global budget {total} exceeds the {sum(sizes)} selectable positions")
    chosen = top_k_indices(torch.cat(list(flats.values())), total).long()
    result, start = {}, 0
    for (name, flat), size in zip(flats.items(), sizes, strict=True):
        local = chosen[(chosen >= start) & (chosen < start + size)] - start
        result[name] = local.to(index_dtype(flat.numel()))
        start += size
    return result


def random_indices(num_positions: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct positions drawn uniformly with a fixed seed, sorted ascending."""
    if not 0 <= k <= num_positions:
        raise ValueError(f"cannot keep {k} of {num_positions} positions")
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(num_positions, generator=generator)[:k]
    return torch.sort(chosen).values.to(index_dtype(num_positions))


def layer_seed(seed: int | None, adapter_name: str, module_name: str) -> int:
    """A stable per-layer seed: from ``seed`` if given, else from the adapter name (so adapters differ)."""
    base = str(seed) if seed is not None else f"adapter:{adapter_name}"
    return zlib.crc32(f"{base}|{module_name}".encode())


def split_budget(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Spread ``total`` over layers in proportion to ``sizes`` (largest remainders; sums exactly to total)."""
    capacity = sum(sizes.values())
    if total > capacity:
        raise ValueError(f"budget of {total} exceeds the {capacity} entries of the targeted weights")
    exact = {name: total * size / capacity for name, size in sizes.items()}
    counts = {name: int(math.floor(x)) for name, x in exact.items()}
    remainder = total - sum(counts.values())
    by_fraction = sorted(exact, key=lambda n: (-(exact[n] - counts[n]), n))
    for name in by_fraction[:remainder]:
        counts[name] += 1
    return counts


def entries_to_rows(num_entries: float, shape: tuple[int, int], block_size: int | None) -> int:
    """Stored rows for a budget of ``num_entries`` weight entries: entries, or whole blocks (at least one)."""
    capacity = num_slots(shape, block_size)
    if block_size is None:
        rows = int(round(num_entries))
    else:
        rows = int(round(num_entries / block_size**2))
    return min(max(rows, 1), capacity)


def block_entry_positions(
    block_indices: torch.Tensor, block_size: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat storage position of every value slot of the given blocks, and which slots lie inside the weight."""
    _, cols = block_grid(shape, block_size)
    blocks = block_indices.long()
    offsets = torch.arange(block_size, device=blocks.device)
    rows = (blocks // cols)[:, None, None] * block_size + offsets[None, :, None]
    columns = (blocks % cols)[:, None, None] * block_size + offsets[None, None, :]
    rows, columns = rows.expand(-1, block_size, block_size), columns.expand(-1, block_size, block_size)
    valid = (rows < shape[0]) & (columns < shape[1])
    return (rows * shape[1] + columns).flatten(), valid.flatten()


def check_indices(indices: torch.Tensor, num_positions: int, expected: int | None, where: str) -> None:
    """Raise ``ValueError`` (naming ``where``) unless indices are 1-D, integer, strictly increasing, in range."""
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"{where}: indices must be a 1-D integer tensor, got {tuple(indices.shape)} {indices.dtype}")
    if expected is not None and indices.numel() != expected:
        raise ValueError(f"{where}: expected {expected} indices, found {indices.numel()}")
    if indices.numel() == 0:
        return
    if int(indices.min()) < 0 or int(indices.max()) >= num_positions:
        raise ValueError(f"{where}: indices out of range [0, {num_positions})")
    if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
        raise ValueError(f"{where}: indices must be sorted and free of duplicates")
