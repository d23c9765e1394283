"""Plain reference versions of the sparse ops: build the dense ΔS by scatter and let autograd differentiate.

Slow and memory-hungry (autograd forms the dense weight gradient), but obviously correct; the tests hold the
fast ops in ``sparse_linear`` / ``block_sparse`` to these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dense_delta(
    values: torch.Tensor, indices: torch.Tensor, shape: tuple[int, int], scaling: float = 1.0
) -> torch.Tensor:
    """Dense ``scaling * ΔS`` of ``shape`` with ``values`` at the flat ``indices`` (differentiable)."""
    flat = torch.zeros(shape[0] * shape[1], dtype=values.dtype, device=values.device)
    return (flat.index_add(0, indices.long(), values) * scaling).view(shape[0], shape[1])


def dense_block_delta(
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float = 1.0,
) -> torch.Tensor:
    """Dense ``scaling * ΔS`` from ``b x b`` blocks, built on a padded grid and cropped to ``shape``."""
    b = block_size
    grid_rows, grid_cols = math.ceil(shape[0] / b), math.ceil(shape[1] / b)
    grid = torch.zeros(grid_rows * grid_cols, b, b, dtype=values.dtype, device=values.device)
    grid = grid.index_add(0, block_indices.long(), values.view(-1, b, b))
    padded = grid.view(grid_rows, grid_cols, b, b).transpose(1, 2).reshape(grid_rows * b, grid_cols * b)
    return padded[: shape[0], : shape[1]] * scaling


def _apply(x: torch.Tensor, delta: torch.Tensor, transposed: bool) -> torch.Tensor:
    dtype = torch.promote_types(x.dtype, delta.dtype)
    delta = delta.to(dtype)
    return F.linear(x.to(dtype), delta.T if transposed else delta)


def sparse_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Reference for :func:`peft_sparse.ops.sparse_linear`."""
    merged = weight.detach() + dense_delta(values, indices, tuple(weight.shape), scaling).to(weight.dtype)
    return F.linear(x, merged.T if transposed else merged, bias)


def sparse_delta_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Reference for :func:`peft_sparse.ops.sparse_delta`."""
    return _apply(x, dense_delta(values, indices, shape, scaling), transposed)


def block_sparse_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Reference for :func:`peft_sparse.ops.block_sparse_linear`."""
    delta = dense_block_delta(values, block_indices, block_size, tuple(weight.shape), scaling)
    merged = weight.detach() + delta.to(weight.dtype)
    return F.linear(x, merged.T if transposed else merged, bias)


def block_sparse_delta_reference(
    x: torch.Tensor,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Reference for :func:`peft_sparse.ops.block_sparse_delta`."""
    return _apply(x, dense_block_delta(values, block_indices, block_size, shape, scaling), transposed)
