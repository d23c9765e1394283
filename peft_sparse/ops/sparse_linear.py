"""Autograd ops for unstructured sparse adapters: ``x @ (S + scaling * ΔS)``, ΔS given by flat indices.

Storage layout ``S`` is ``(R, C)``: ``(out, in)`` for ``nn.Linear`` (``y = x @ S.T``), ``(in, out)`` for GPT-2
``Conv1D`` (``transposed=True``, ``y = x @ S``). Only ``x`` and ``values`` get gradients; the base weight is
frozen and the dense weight gradient ``g^T x`` is never formed.
"""

# Measurements behind the choices below (CPU, torch 2.13+cpu, torch.set_num_threads(1), fp32, random masks,
# best of 5-7 interleaved rounds on the shared 2-core AMD EPYC; other jobs were running, so treat as +-30 %).
#
# grad_values = g^T x sampled at the mask, 1 % density (run at load ~1.5):
#   S shape, tokens    dense g^T x+gather*   naive (g[:,r]*x[:,c]).sum   sampled_addmm   same, 1024-tok chunks
#   2048x2048, 2048        212 ms              915 ms                      31.6 ms         38.0 ms
#   384x384,   4096       14.8 ms             43.5 ms                       6.9 ms          6.2 ms
#   1536x384,  4096       57.0 ms              274 ms                      23.4 ms         22.1 ms
#   384x1536,  4096       64.1 ms              327 ms                      21.1 ms         18.2 ms
#   (* not allowed, baseline only.) 256-token chunks: 31.0 / 6.9 / 24.7 / 23.8 ms, i.e. chunking is neutral.
#   Split (run at load ~3.5, everything ~2x slower): of 12.1 ms for 384x384 the two token-contiguous
#   transposes of g and x take 9.3 ms and the sampled kernel 1.6 ms; 2048x2048: 32 ms + 48 ms.
# Chosen: torch.sparse.sampled_addmm on a CSR pattern built from the sorted indices (crow by searchsorted), in
# storage orientation (so CSR order == index order), over 1024-token slices: as fast as one call within noise,
# 3-9x faster than the dense product and 13-40x faster than the naive gather, and it bounds the transient
# transposed copies to 1024 x (R + C) elements.
#
# sparse_delta fwd+bwd, CSR matmuls vs a transient dense ΔS + GEMM (load ~2-3.5):
#   2048x2048/2048 tok: 1 % 358 vs 1015 ms, 2 % 594 vs 1086, 3 % 688 vs 1009, 5 % 914 vs 1303 ms;
#   1536x384/4096 tok: 1 % 72 vs 296 ms, 5 % 147 vs 279 ms. An earlier run at 10 % (2048^2) had the dense
#   path 2-3x ahead (forward 594 vs 1085 ms), hence _CSR_MAX_DENSITY = 0.05.
#
# sparse_linear fwd+bwd at 1 % (load ~3.5): 2048x2048/2048 tok 653 ms vs nn.Linear 994 ms trainable / 529 ms
# frozen; 384x384/4096 65 vs 76 / 53 ms; 1536x384/4096 208 vs 289 / 198 ms.

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import index_cache

# Tokens per slice of the sampled product on CPU (accelerators take all tokens at once).
_TOKEN_CHUNK = 1024
# Above this fraction of non-zeros, a transient dense ΔS + GEMM beats CSR matmuls for the delta-only op.
_CSR_MAX_DENSITY = 0.05


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the sparse kernels run in: fp32 for half types (no half CSR kernels on CPU), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _csr_structure(indices: torch.Tensor, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR row pointers and column indices of the sorted flat ``indices`` (cached per index tensor)."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        rows_n, cols_n = shape
        rows = torch.div(indices, cols_n, rounding_mode="floor")
        cols = indices - rows * cols_n
        bounds = torch.arange(rows_n + 1, device=indices.device, dtype=indices.dtype)
        crow = torch.searchsorted(rows, bounds, out_int32=indices.dtype == torch.int32)
        return crow, cols

    return index_cache.cached(indices, ("csr", int(shape[0]), int(shape[1])), build)


def _csr(indices: torch.Tensor, shape: tuple[int, int], values: torch.Tensor) -> torch.Tensor:
    """CSR tensor of ``shape`` whose non-zeros sit at the sorted flat ``indices`` (in the order of values)."""
    crow, cols = _csr_structure(indices, shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow, cols, values, tuple(shape), check_invariants=False)


def token_major(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` flattened to ``(tokens, features)``, as a contiguous ``(features, tokens)`` matrix in ``dtype``.

    The layout the sampled kernel reads. Cached on ``t`` while it is alive and unchanged: the q/k/v (and gate/up)
    projections of a block share their input, so their backwards transpose it once instead of once each.
    """
    return index_cache.cached(t, ("token_major", dtype), lambda: t.reshape(-1, t.shape[-1]).to(dtype).T.contiguous())


def sampled_product(
    rows_op: torch.Tensor,
    cols_op: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    scaling: float,
    out_dtype: torch.dtype,
    shared: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scaling * (rows_op^T @ cols_op)`` read only at the flat ``indices`` of a ``shape`` matrix.

    ``rows_op`` is ``(T, R)``, ``cols_op`` is ``(T, C)``; the result has one entry per index, in index order.
    ``shared`` (optional) is the tensor ``cols_op`` was flattened from, whose token-major copy other layers may
    reuse (see :func:`token_major`).
    """
    nnz = indices.numel()
    tokens = rows_op.shape[0]
    dtype = compute_dtype(torch.promote_types(rows_op.dtype, cols_op.dtype))
    if nnz == 0 or tokens == 0:
        return torch.zeros(nnz, dtype=out_dtype, device=rows_op.device)
    # beta=0 still reads the pattern's values (0 * NaN is NaN), so they must be zeros, not uninitialised memory.
    pattern = _csr(indices, shape, torch.zeros(nnz, dtype=dtype, device=rows_op.device))
    chunk = _TOKEN_CHUNK if rows_op.device.type == "cpu" else tokens
    if tokens <= chunk and shared is not None:
        # The kernel wants both operands token-contiguous: (R, T) on the left, (T, C) with unit token stride.
        right = token_major(shared, dtype).T
        left = rows_op.to(dtype).T.contiguous()
        return torch.sparse.sampled_addmm(pattern, left, right, beta=0.0, alpha=scaling).values().to(out_dtype)
    total = None
    for start in range(0, tokens, chunk):
        # The kernel makes both operands token-contiguous itself.
        left = rows_op[start : start + chunk].to(dtype).T
        right = cols_op[start : start + chunk].to(dtype)
        part = torch.sparse.sampled_addmm(pattern, left, right, beta=0.0, alpha=scaling).values()
        total = part if total is None else total.add_(part)
    return total.to(out_dtype)


def compose_weight(
    weight: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Transient ``S + scaling * scatter(values)`` in ``dtype`` (default: the weight's), no autograd history."""
    dtype = weight.dtype if dtype is None else dtype
    merged = weight.detach().to(dtype, memory_format=torch.contiguous_format, copy=True)
    if indices.numel():
        merged.view(-1).index_add_(0, indices, values.detach().to(merged.dtype), alpha=scaling)
    return merged


def dense_grad_x(g: torch.Tensor, matrix: torch.Tensor, transposed: bool, dtype: torch.dtype) -> torch.Tensor:
    """``g @ M`` (Linear layout) or ``g @ M^T`` (transposed layout), returned in ``dtype``."""
    g = g.to(matrix.dtype)
    return torch.matmul(g, matrix.T if transposed else matrix).to(dtype)


def grad_operands(x2: torch.Tensor, g2: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row-side, column-side) operands whose product ``A^T B`` is the storage-layout weight gradient."""
    return (x2, g2) if transposed else (g2, x2)


def linear_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    transposed: bool,
) -> torch.Tensor:
    """``x @ S_eff^T + b`` (``x @ S_eff + b`` if ``transposed``): ``S_eff`` composed in the promoted dtype of
    weight and values (exact), then multiplied in ``x``'s dtype, like ``F.linear`` on a dense ``S_eff`` under
    autocast (bf16 ``x`` on fp32 weights: one rounding of ``W + ΔW``, one bf16 GEMM)."""
    merged = compose_weight(weight, values, indices, scaling, torch.promote_types(weight.dtype, values.dtype))
    merged = merged.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, merged.T if transposed else merged, bias)


def linear_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float,
    transposed: bool,
    need_x: bool,
    need_values: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of :func:`linear_forward` for ``x`` and ``values`` (``None`` where not needed)."""
    grad_x = grad_values = None
    if need_x:
        merged = compose_weight(weight, values, indices, scaling, torch.promote_types(weight.dtype, values.dtype))
        grad_x = dense_grad_x(g, merged.to(x.dtype), transposed, x.dtype)
        del merged
    if need_values:
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        rows_op, cols_op = grad_operands(x2, g2, transposed)
        shared = None if transposed else x
        grad_values = sampled_product(rows_op, cols_op, indices, tuple(weight.shape), scaling, values.dtype, shared)
    return grad_x, grad_values


def _use_csr(nnz: int, shape: tuple[int, int]) -> bool:
    return nnz <= _CSR_MAX_DENSITY * shape[0] * shape[1]


def apply_delta(
    x2: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    scaling: float,
    right_transposed: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``x2 @ ΔS^T`` (``right_transposed``) or ``x2 @ ΔS`` for 2-D ``x2``; ``ΔS = scaling * scatter(values)``.

    Sparse matmul at low density, a transient dense ΔS above ``_CSR_MAX_DENSITY``.
    """
    width = shape[0] if right_transposed else shape[1]
    if indices.numel() == 0 or x2.shape[0] == 0:
        return torch.zeros(x2.shape[0], width, dtype=dtype, device=x2.device)
    if _use_csr(indices.numel(), shape):
        work = compute_dtype(dtype)
        delta = _csr(indices, shape, values.detach().to(work) * scaling)
        # (x ΔS^T)^T = ΔS x^T and (x ΔS)^T = ΔS^T x^T: sparse operand on the left, as torch needs it.
        out = (delta if right_transposed else delta.t()) @ x2.to(work).T
        return out.T.to(dtype)
    delta = torch.zeros(shape[0] * shape[1], dtype=dtype, device=x2.device)
    delta.index_add_(0, indices, values.detach().to(dtype), alpha=scaling)
    delta = delta.view(shape)
    return x2.to(dtype) @ (delta.T if right_transposed else delta)


def delta_forward(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    scaling: float,
    transposed: bool,
) -> torch.Tensor:
    """Only the adapter term ``x @ ΔS^T`` (``x @ ΔS`` if ``transposed``), in ``promote_types(x, values)``."""
    dtype = torch.promote_types(x.dtype, values.dtype)
    x2 = x.reshape(-1, x.shape[-1])
    out = apply_delta(x2, values, indices, shape, scaling, not transposed, dtype)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def delta_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
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
        grad_x = apply_delta(g2, values, indices, shape, scaling, transposed, dtype)
        grad_x = grad_x.to(x.dtype).reshape(x.shape)
    if need_values:
        rows_op, cols_op = grad_operands(x.reshape(-1, x.shape[-1]), g2, transposed)
        shared = None if transposed else x
        grad_values = sampled_product(rows_op, cols_op, indices, shape, scaling, values.dtype, shared)
    return grad_x, grad_values
