"""Sparse adapter kernels (unstructured and block) registered as torch custom ops, and plain reference versions."""

from . import index_cache
from .block_sparse import block_entry_indices
from .reference import (
    block_sparse_delta_reference,
    block_sparse_linear_reference,
    dense_block_delta,
    dense_delta,
    sparse_delta_reference,
    sparse_linear_reference,
)
from .registered import block_sparse_delta, block_sparse_linear, sparse_delta, sparse_linear

__all__ = [
    "block_entry_indices",
    "block_sparse_delta",
    "block_sparse_delta_reference",
    "block_sparse_linear",
    "block_sparse_linear_reference",
    "dense_block_delta",
    "dense_delta",
    "index_cache",
    "sparse_delta",
    "sparse_delta_reference",
    "sparse_linear",
    "sparse_linear_reference",
]
