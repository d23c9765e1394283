"""Autograd ops for block-sparse adapters: ΔS is a set of ``b x b`` blocks on a ``ceil(R/b) x ceil(C/b)``
grid. ``values`` holds ``b * b`` numbers per block (row-major inside the block), in ``block_indices`` order.
Slots outside ``S`` at ragged edges are padding: they never affect the output and always get a zero gradient.
Blocks of ``b >= 16`` use batched ``b x b`` products over gathered token slices (bmm); smaller blocks run the
unstructured CSR kernels on their entries. Neither forms a dense ``g^T x``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..masks import block_entry_positions, block_grid, index_dtype
from . import index_cache
from .sparse_linear import apply_delta, dense_grad_x, grad_operands, sampled_product

# Upper bound on the elements of one gathered operand slice (bounds the transient memory of the bmm paths).
_GATHER_BUDGET = 1 << 22
# Blocks smaller than this go through the unstructured kernels on their entries: gathering ``(T, b)`` token
# slices per block copies ``nnz * T / b`` numbers, too many for small ``b``. Measured (CPU, 1 thread, 1 % of
# blocks, load ~3.5), grad_values bmm vs entries/CSR: 2048x2048/2048 tok b=4 510 vs 55 ms, b=8 192 vs 75,
# b=16 46 vs 81, b=32 25 vs 66; 384x384/4096 b=8 3.8 vs 6.7, b=16 1.2 vs 11; 1536x384/4096 b=8 24 vs 34,
# b=16 13 vs 31. Delta forward: b=8 275 vs 84 ms (2048^2), b=16 59 vs 77, 1.6 vs 9.7 (384^2).
_MIN_BMM_BLOCK = 16


_grid = block_grid


def _block_coords(
    block_indices: torch.Tensor, block_size: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-row and block-column of every block (int64, transient)."""
    grid_cols = _grid(shape, block_size)[1]
    blocks = block_indices.long()
    return torch.div(blocks, grid_cols, rounding_mode="floor"), blocks % grid_cols


def block_entry_indices(
    block_indices: torch.Tensor, block_size: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat position in ``S`` of every value slot (``-1`` for padding) and the mask of real slots.

    Both results have ``len(block_indices) * block_size**2`` entries, in the layout of ``values``.
    """
    positions, valid = block_entry_positions(block_indices, block_size, (int(shape[0]), int(shape[1])))
    return torch.where(valid, positions, torch.full_like(positions, -1)), valid


def _scatter_blocks(
    base: torch.Tensor | None,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Dense ``base + scaling * blocks`` (``base`` None: zeros) of ``shape``; padding slots are dropped."""
    numel = shape[0] * shape[1]
    # One spare trailing slot absorbs all padding entries (no data-dependent masking, so no device sync).
    if base is None:
        flat = torch.zeros(numel + 1, dtype=dtype, device=values.device)
    else:  # one pass over the weight: copy into uninitialised memory (a zero fill first doubled the traffic)
        flat = torch.empty(numel + 1, dtype=dtype, device=values.device)
        flat[:numel].copy_(base.detach().reshape(-1))
        flat[numel] = 0
    if block_indices.numel():
        flat.index_add_(0, _slot_positions(block_indices, block_size, shape), values.detach().to(dtype), alpha=scaling)
    return flat[:numel].view(shape)


def _slot_positions(block_indices: torch.Tensor, block_size: int, shape: tuple[int, int]) -> torch.Tensor:
    """Flat position of every value slot, ``R * C`` (one spare slot) for padding; cached per index tensor."""

    def build() -> torch.Tensor:
        numel = shape[0] * shape[1]
        positions, valid = block_entry_indices(block_indices, block_size, shape)
        positions = torch.where(valid, positions, torch.full_like(positions, numel))
        return positions.to(index_dtype(numel + 1))

    return index_cache.cached(block_indices, ("slots", block_size, int(shape[0]), int(shape[1])), build)


def _sorted_entries(
    block_indices: torch.Tensor, block_size: int, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Value slots of the real entries in flat-position order, and those sorted flat positions (cached)."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        numel = shape[0] * shape[1]
        flat, valid = block_entry_indices(block_indices, block_size, shape)
        keys, order = torch.sort(torch.where(valid, flat, torch.full_like(flat, numel)))
        real = int(valid.sum())
        return order[:real], keys[:real]

    return index_cache.cached(block_indices, ("sorted", block_size, int(shape[0]), int(shape[1])), build)


def _padded_blocks(t2: torch.Tensor, block_size: int, n_blocks: int) -> torch.Tensor:
    """2-D ``(T, K)`` padded with zero columns to ``n_blocks * b`` and viewed as ``(T, n_blocks, b)``."""
    pad = n_blocks * block_size - t2.shape[1]
    padded = F.pad(t2, (0, pad)) if pad else t2.contiguous()
    return padded.view(t2.shape[0], n_blocks, block_size)


def _chunk_slices(count: int, tokens: int, block_size: int) -> list[slice]:
    """Slices over the blocks so that one gathered ``(n, T, b)`` operand stays within the memory budget."""
    step = max(1, _GATHER_BUDGET // max(1, tokens * block_size))
    return [slice(start, start + step) for start in range(0, count, step)]


def block_grads(
    rows_op: torch.Tensor,
    cols_op: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``scaling * (rows_op^T @ cols_op)`` restricted to the given blocks, flattened like ``values``.

    ``rows_op`` is ``(T, R)`` and ``cols_op`` is ``(T, C)``; padding slots come out exactly zero.
    """
    count = block_indices.numel()
    b = block_size
    grid = _grid(shape, b)
    dtype = torch.promote_types(rows_op.dtype, cols_op.dtype)
    tokens = rows_op.shape[0]
    if count == 0 or tokens == 0:
        return torch.zeros(count * b * b, dtype=out_dtype, device=rows_op.device)
    if b < _MIN_BMM_BLOCK:
        slots, positions = _sorted_entries(block_indices, b, shape)
        out = torch.zeros(count * b * b, dtype=out_dtype, device=rows_op.device)
        out[slots] = sampled_product(rows_op, cols_op, positions, shape, scaling, out_dtype)
        return out
    block_rows, block_cols = _block_coords(block_indices, b, shape)
    left = _padded_blocks(rows_op.to(dtype), b, grid[0]).transpose(0, 1)  # (nR, T, b)
    right = _padded_blocks(cols_op.to(dtype), b, grid[1]).transpose(0, 1)
    parts = []
    for sl in _chunk_slices(count, tokens, b):
        gathered_rows = left.index_select(0, block_rows[sl])  # (n, T, b)
        gathered_cols = right.index_select(0, block_cols[sl])
        parts.append(torch.bmm(gathered_rows.transpose(1, 2), gathered_cols))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    if scaling != 1.0:
        out = out.mul_(scaling)
    return out.reshape(-1).to(out_dtype)


def apply_block_delta(
    x2: torch.Tensor,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float,
    right_transposed: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x2 @ ΔS^T`` (``right_transposed``) or ``x2 @ ΔS`` for 2-D ``x2`` with block-sparse ``ΔS``."""
    b = block_size
    grid_rows, grid_cols = _grid(shape, b)
    tokens = x2.shape[0]
    # x @ ΔS^T: input blocks follow the block column, output the block row; x @ ΔS the other way round.
    n_src, n_dst, width = (grid_cols, grid_rows, shape[0]) if right_transposed else (grid_rows, grid_cols, shape[1])
    count = block_indices.numel()
    if count == 0 or tokens == 0:
        return torch.zeros(tokens, width, dtype=dtype, device=x2.device)
    if b < _MIN_BMM_BLOCK:
        slots, positions = _sorted_entries(block_indices, b, shape)
        return apply_delta(x2, values.detach()[slots], positions, shape, scaling, right_transposed, dtype)
    block_rows, block_cols = _block_coords(block_indices, b, shape)
    src_idx, dst_idx = (block_cols, block_rows) if right_transposed else (block_rows, block_cols)
    blocks = values.detach().to(dtype).view(count, b, b)
    if scaling != 1.0:
        blocks = blocks * scaling
    blocks = blocks.transpose(1, 2) if right_transposed else blocks
    # Padding slots of a block only meet zero-padded input columns or land in cropped output columns.
    source = _padded_blocks(x2.to(dtype), b, n_src)
    target = torch.zeros(tokens, n_dst, b, dtype=dtype, device=x2.device)
    for sl in _chunk_slices(count, tokens, b):
        gathered = source.index_select(1, src_idx[sl])  # (T, n, b)
        products = torch.bmm(gathered.transpose(0, 1), blocks[sl])  # (n, T, b)
        target.index_add_(1, dst_idx[sl], products.transpose(0, 1))
    return target.view(tokens, n_dst * b)[:, :width]


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scaling: float,
    transposed: bool,
) -> torch.Tensor:
    """Adapted output ``x @ S_eff^T + b`` (``x @ S_eff + b`` if ``transposed``) with block-sparse ΔS: composed
    in the promoted dtype of weight and values, one GEMM in ``x``'s dtype (as :func:`sparse_linear`)."""
    work = torch.promote_types(weight.dtype, values.dtype)
    merged = _scatter_blocks(weight, values, block_indices, block_size, tuple(weight.shape), scaling, work)
    merged = merged.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, merged.T if transposed else merged, bias)


def linear_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scaling: float,
    transposed: bool,
    need_x: bool,
    need_values: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`linear_forward` for ``x`` and ``values`` (``None`` where not needed)."""
    shape = tuple(weight.shape)
    grad_x = grad_values = None
    if need_x:
        work = torch.promote_types(weight.dtype, values.dtype)
        merged = _scatter_blocks(weight, values, block_indices, block_size, shape, scaling, work)
        grad_x = dense_grad_x(g, merged.to(x.dtype), transposed, x.dtype)
        del merged
    if need_values:
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        rows_op, cols_op = grad_operands(x2, g2, transposed)
        grad_values = block_grads(rows_op, cols_op, block_indices, block_size, shape, scaling, values.dtype)
    return grad_x, grad_values


def delta_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float,
    transposed: bool,
) -> torch.Tensor:
    """Only the block adapter term ``x @ ΔS^T`` (``x @ ΔS`` if ``transposed``), in ``promote_types(x, values)``."""
    dtype = torch.promote_types(x.dtype, values.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    out = apply_block_delta(x2, values, block_indices, block_size, shape, scaling, not transposed, dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def delta_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float,
    transposed: bool,
    need_x: bool,
    need_values: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`delta_forward` for ``x`` and ``values`` (``None`` where not needed)."""
    g2 = g.reshape(-1, g.shape[-1])
    grad_x = grad_values = None
    if need_x:
        dtype = torch.promote_types(g.dtype, values.dtype)
        grad_x = apply_block_delta(g2, values, block_indices, block_size, shape, scaling, transposed, dtype)
        grad_x = grad_x.to(x.dtype).reshape(x.shape)
    if need_values:
        rows_op, cols_op = grad_operands(x.reshape(-1, x.shape[-1]), g2, transposed)
        grad_values = block_grads(rows_op, cols_op, block_indices, block_size, shape, scaling, values.dtype)
    return grad_x, grad_values
