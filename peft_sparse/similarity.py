"""Similarities between sparse experts: pure tensor functions over stored entries, never dense weights.

An expert's delta in one layer is given by sorted flat ``indices`` and ``values`` of shape ``(n, k)`` (entries,
or ``b x b`` blocks). Block experts are expanded to their real weight entries (padding past a ragged edge is
dropped), so experts with different block sizes compare on the same footing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from . import masks


def entry_positions(
    indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, int], block_size: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat weight-entry positions (int64) and their values (1-D) of one layer of one expert."""
    if block_size is None:
        return indices.long().reshape(-1), values.reshape(-1)
    positions, valid = masks.block_entry_positions(indices, block_size, shape)
    return positions[valid], values.reshape(-1)[valid]


def top_fraction_threshold(abs_values: torch.Tensor, fraction: float) -> float:
    """The smallest |value| among the top ``ceil(fraction * n)`` of ``abs_values`` (0.0 if empty)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    n = abs_values.numel()
    if n == 0:
        return 0.0
    keep = max(1, math.ceil(fraction * n))
    return float(torch.kthvalue(abs_values.reshape(-1).double(), n - keep + 1).values)


def sparse_gram(positions: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """``G[i, j] = Σ_p Δ_i[p] Δ_j[p]`` (float64, ``n x n``) over the union of the experts' positions.

    One sparse ``(n_experts x n_union)`` matrix times its transpose: cost grows with the entries that experts
    share, memory with the stored entries.
    """
    if len(positions) != len(values) or not positions:
        raise ValueError("need one values tensor per positions tensor, and at least one expert")
    n = len(positions)
    flat = [p.long().reshape(-1) for p in positions]
    vals = [v.double().reshape(-1) for v in values]
    for i, (p, v) in enumerate(zip(flat, vals, strict=True)):
        if p.numel() != v.numel():
            raise ValueError(f"expert {i}: {p.numel()} positions but {v.numel()} values")
    if sum(p.numel() for p in flat) == 0:
        return torch.zeros(n, n, dtype=torch.float64)
    union, columns = torch.unique(torch.cat(flat), return_inverse=True)
    rows = torch.cat([torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(flat)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*[Ss]parse.*")  # beta / invariant-check notices
        matrix = torch.sparse_coo_tensor(
            torch.stack([rows, columns]), torch.cat(vals), (n, union.numel()), check_invariants=False
        ).coalesce()
        return torch.sparse.mm(matrix, matrix.t()).to_dense()


def cosine_from_gram(gram: torch.Tensor) -> torch.Tensor:
    """Cosine similarity matrix from a Gram matrix; an all-zero expert gets 0 off the diagonal and 1 on it."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denominator = norms[:, None] * norms[None, :]
    similarity = torch.where(denominator > 0, gram / torch.where(denominator > 0, denominator, 1), 0)
    similarity = similarity.clamp(-1.0, 1.0)
    similarity.fill_diagonal_(1.0)
    return similarity


__all__ = ["cosine_from_gram", "entry_positions", "sparse_gram", "top_fraction_threshold"]
