"""Arrow prototypes and GenKnowSub for sparse experts: pure tensor functions, no modules.

A sparse expert's layer delta ΔW is given by flat storage positions and values in the base weight's own
layout: ``(out, in)`` for ``nn.Linear``, ``(in, out)`` for GPT-2 ``Conv1D`` (``transposed``). Its Arrow
prototype is the top right-singular vector of ΔW viewed as the map ``in -> out``, i.e. a vector in the layer's
INPUT space. It is computed by restarted Lanczos on ``ΔWᵀΔW`` using only sparse matrix-vector products
(O(stored entries) per iteration), in fp32, from a start vector drawn from a ``torch.Generator`` (so the
result is reproducible given the seed), until the eigen-residual meets a tolerance. The sign is fixed so the
largest-magnitude component is positive.

GenKnowSub subtracts the mean of the general experts' deltas from a task expert, exactly, on the union of
their entries, through :func:`peft_sparse.merging.merge_layer` (``linear`` combination).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .merging import merge_layer

DEFAULT_TOL = 1e-5
DEFAULT_MAX_ITER = 3000
KRYLOV_DIM = 32


def entry_coordinates(
    positions: torch.Tensor, shape: tuple[int, int], transposed: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output feature, input feature) of each flat storage position."""
    rows = torch.div(positions, shape[1], rounding_mode="floor")
    cols = positions - rows * shape[1]
    return (cols, rows) if transposed else (rows, cols)


def features(shape: tuple[int, int], transposed: bool) -> tuple[int, int]:
    """(out_features, in_features) of a storage shape."""
    return (shape[1], shape[0]) if transposed else (shape[0], shape[1])


def delta_csr(
    positions: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int],
    transposed: bool,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ΔW as a sparse CSR matrix of shape ``(out_features, in_features)`` (whatever the storage layout)."""
    out_features, in_features = features(shape, transposed)
    out_idx, in_idx = entry_coordinates(positions.long(), shape, transposed)
    keys = out_idx * in_features + in_idx
    if keys.numel() > 1 and not bool((keys[1:] > keys[:-1]).all()):  # Conv1D layout or block order: re-sort
        order = torch.argsort(keys)
        out_idx, in_idx, values = out_idx[order], in_idx[order], values[order]
    bounds = torch.arange(out_features + 1, device=out_idx.device)
    crow = torch.searchsorted(out_idx, bounds)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(
            crow, in_idx, values.to(dtype), (out_features, in_features), check_invariants=False
        )


@dataclass(frozen=True)
class SingularVector:
    """Result of :func:`top_right_singular_vector`."""

    vector: torch.Tensor  # (in_features,), fp32, unit norm (zeros when ΔW is zero), sign-fixed
    value: float  # the top singular value σ1
    residual: float  # ‖ΔWᵀΔW v − σ1² v‖ / σ1² at the end (0 for a zero ΔW)
    matvecs: int  # products with ΔWᵀΔW spent
    converged: bool


def fix_sign(vector: torch.Tensor) -> torch.Tensor:
    """Flip ``vector`` so that its largest-magnitude component (first one on ties) is positive."""
    if vector.numel() == 0:
        return vector
    pivot = int(torch.argmax(vector.abs()))
    return -vector if float(vector[pivot]) < 0 else vector


def top_right_singular_vector(
    delta: torch.Tensor,
    generator: torch.Generator | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
    krylov_dim: int = KRYLOV_DIM,
) -> SingularVector:
    """Top right-singular vector of a sparse ``delta`` ``(out, in)`` (CSR or COO), by restarted Lanczos.

    Each restart builds a Krylov basis of ``ΔWᵀΔW`` (up to ``krylov_dim`` products, fully re-orthogonalized)
    from the current vector and keeps the top Ritz vector. It stops when the relative eigen-residual
    ``‖Mv − θv‖ / θ`` is at most ``tol`` (then ``sin∠(v, v_true) ≤ tol / (1 − σ2²/σ1²)``), or after ``max_iter``
    products with a warning. The start vector is drawn from ``generator`` (torch's global RNG if None).
    """
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol}")
    if max_iter < 1 or krylov_dim < 1:
        raise ValueError(f"max_iter and krylov_dim must be >= 1, got {max_iter}, {krylov_dim}")
    delta = delta.to(torch.float32)
    delta_t = delta.t().to_sparse_csr() if delta.layout == torch.sparse_csr else delta.t()
    n = delta.shape[1]
    device = delta.device

    def apply(v: torch.Tensor) -> torch.Tensor:
        return (delta_t @ (delta @ v[:, None]))[:, 0]

    start = torch.randn(n, generator=generator, dtype=torch.float32, device="cpu").to(device)
    vector = start / start.norm()
    matvecs, theta, residual = 0, 0.0, math.inf
    dim = max(1, min(krylov_dim, n))
    while matvecs < max_iter:
        basis = [vector]
        alphas: list[float] = []
        betas: list[float] = []
        while len(alphas) < dim and matvecs < max_iter:
            w = apply(basis[-1])
            matvecs += 1
            stacked = torch.stack(basis, dim=1)
            alphas.append(float(basis[-1] @ w))
            for _ in range(2):  # full re-orthogonalization, twice ("twice is enough")
                w = w - stacked @ (stacked.T @ w)
            beta = float(w.norm())
            if beta <= 1e-7 * max(abs(alphas[0]), abs(alphas[-1]), 1e-30) or len(basis) == n:
                break  # invariant subspace: the Ritz pairs are exact
            betas.append(beta)
            basis.append(w / beta)
        k = len(alphas)
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if k > 1:
            off = torch.tensor(betas[: k - 1], dtype=torch.float64)
            tri += torch.diag(off, 1) + torch.diag(off, -1)
        _, ritz = torch.linalg.eigh(tri)
        coefficients = ritz[:, -1].to(torch.float32).to(device)
        vector = torch.stack(basis[:k], dim=1) @ coefficients
        norm = float(vector.norm())
        if norm == 0.0:
            break
        vector = vector / norm
        mv = apply(vector)
        matvecs += 1
        theta = float(vector @ mv)
        if theta <= 0.0:  # ΔW is zero (or numerically so): no direction
            return SingularVector(torch.zeros(n, device=device), 0.0, 0.0, matvecs, True)
        residual = float((mv - theta * vector).norm()) / theta
        if residual <= tol:
            return SingularVector(fix_sign(vector), math.sqrt(theta), residual, matvecs, True)
    warnings.warn(
        f"top singular vector did not converge in {matvecs} products (relative residual {residual:.2e} > "
        f"tol {tol:.0e}); raise max_iter",
        RuntimeWarning,
        stacklevel=2,
    )
    return SingularVector(fix_sign(vector), math.sqrt(max(theta, 0.0)), residual, matvecs, False)


def prototype(
    positions: torch.Tensor,
    values: torch.Tensor,
    shape: tuple[int, int],
    transposed: bool,
    seed: int | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int = DEFAULT_MAX_ITER,
) -> SingularVector:
    """Arrow prototype of one expert in one layer: top right-singular vector (input space) of its sparse ΔW.

    ``positions``/``values``: flat storage positions and values of the stored entries (block experts expanded
    with :func:`peft_sparse.similarity.entry_positions`); ``shape``: storage shape; ``transposed``: Conv1D
    layout. ``seed`` seeds the start vector (None: torch's global RNG).
    """
    if positions.numel() == 0 or not bool(values.ne(0).any()):
        _, in_features = features(shape, transposed)
        return SingularVector(torch.zeros(in_features, device=values.device), 0.0, 0.0, 0, True)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    matrix = delta_csr(positions, values.detach(), shape, transposed)
    return top_right_singular_vector(matrix, generator, tol, max_iter)


def subtract_general_knowledge(
    task: tuple[torch.Tensor, torch.Tensor], general: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """GenKnowSub for one layer: ``Δ_task − mean(Δ_general)``, exact on the union of their entries.

    Every expert is ``(indices (n,), values (n, k))`` (entries, or blocks with ``k = block_size**2``); returns
    ``(union_indices (int64, sorted), values (n_union, k))`` in the task expert's dtype.
    """
    if not general:
        raise ValueError("GenKnowSub needs at least one general expert")
    weights = [1.0] + [-1.0 / len(general)] * len(general)
    indices = [task[0]] + [g[0] for g in general]
    values = [task[1]] + [g[1].to(task[1].dtype) for g in general]
    return merge_layer(indices, values, weights, combination_type="linear")


__all__ = [
    "DEFAULT_MAX_ITER",
    "DEFAULT_TOL",
    "SingularVector",
    "delta_csr",
    "entry_coordinates",
    "features",
    "fix_sign",
    "prototype",
    "subtract_general_knowledge",
    "top_right_singular_vector",
]
