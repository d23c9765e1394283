"""Autograd kernels for sparse adapters (unstructured and block) and their plain reference versions."""

from .block_sparse import block_entry_indices, block_sparse_delta, block_sparse_linear
from .reference import (
    block_sparse_delta_reference,
    block_sparse_linear_reference,
    dense_block_delta,
    dense_delta,
    sparse_delta_reference,
    sparse_linear_reference,
)
from .sparse_linear import sparse_delta, sparse_linear

__all__ = [
    "block_entry_indices",
    "block_sparse_delta",
    "block_sparse_delta_reference",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "dense_block_delta",
    "dense_delta",
    "sparse_delta",
    "sparse_delta_reference",
    "sparse_linear",
    "sparse_linear_reference",
]
