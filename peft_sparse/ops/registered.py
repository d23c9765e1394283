"""The sparse kernels as ``torch.library`` custom ops: one opaque node per adapter layer under ``torch.compile``.

Four ops in the ``peft_sparse`` namespace, each with a fake (meta) implementation so the compiler knows output
shapes and dtypes without running it, and a registered autograd formula whose backward is itself an op:

- ``peft_sparse::linear(x, weight, bias, values, indices, block_size, scaling, transposed)``: ``x @ S_eff`` with
  ``S_eff = W + scaling * ΔS`` composed transiently (the fused single-adapter forward);
- ``peft_sparse::delta(x, values, indices, block_size, rows, cols, scaling, transposed)``: only ``x @ ΔS``
  (the term added to ``base(x)`` when the base layer must run itself: several adapters, hooks, quantized bases);
- ``linear_backward`` / ``delta_backward``: gradients for ``x`` and ``values`` (empty tensors where not needed).

``block_size = 0`` selects the unstructured kernels (``sparse_linear.py``), ``> 0`` the block kernels
(``block_sparse.py``). CSR tensors and data-dependent sizes stay inside the ops, so dynamo never sees them.
"""

from __future__ import annotations

import torch

from . import block_sparse as _block
from . import sparse_linear as _flat

_LIB = "peft_sparse"


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """Kernels run at their documented dtypes whatever autocast says, so the fake implementations stay exact."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """Under autocast the fused ops take ``x`` in the autocast dtype, as ``F.linear`` would."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def _out_width(rows: int, cols: int, transposed: bool) -> int:
    """Output features of ``x @ ΔS^T`` (Linear layout, ``(out, in)``) or ``x @ ΔS`` (Conv1D, ``(in, out)``)."""
    return cols if transposed else rows


def _empty_like_if(needed: bool, like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like, memory_format=torch.contiguous_format) if needed else like.new_empty(0)


# --- fused forward: x @ (W + ΔS) ---------------------------------------------------------------------------
@torch.library.custom_op(
    f"{_LIB}::linear",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor values, Tensor indices, int block_size, float scaling, "
    "bool transposed) -> Tensor",
)
def _linear_op(x, weight, bias, values, indices, block_size, scaling, transposed):  # noqa: ANN001, ANN202
    with _no_autocast(x):
        if block_size:
            out = _block.linear_forward(x, weight, bias, values, indices, block_size, scaling, transposed)
        else:
            out = _flat.linear_forward(x, weight, bias, values, indices, scaling, transposed)
        return out.contiguous()


@_linear_op.register_fake
def _(x, weight, bias, values, indices, block_size, scaling, transposed):  # noqa: ANN001, ANN202
    return x.new_empty(*x.shape[:-1], _out_width(weight.shape[0], weight.shape[1], transposed))


@torch.library.custom_op(
    f"{_LIB}::linear_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor weight, Tensor values, Tensor indices, int block_size, float scaling, "
    "bool transposed, bool need_x, bool need_values) -> (Tensor, Tensor)",
)
def _linear_backward_op(g, x, weight, values, indices, block_size, scaling, transposed, need_x, need_values):  # noqa: ANN001, ANN202
    with _no_autocast(x):
        if block_size:
            grads = _block.linear_backward(
                g, x, weight, values, indices, block_size, scaling, transposed, need_x, need_values
            )
        else:
            grads = _flat.linear_backward(g, x, weight, values, indices, scaling, transposed, need_x, need_values)
        return _materialize(grads, x, values)


@_linear_backward_op.register_fake
def _(g, x, weight, values, indices, block_size, scaling, transposed, need_x, need_values):  # noqa: ANN001, ANN202
    return _empty_like_if(need_x, x), _empty_like_if(need_values, values)


def _linear_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight, _bias, values, indices, block_size, scaling, transposed = inputs
    ctx.save_for_backward(x, weight, values, indices)
    ctx.args = (block_size, scaling, transposed)


def _linear_grad(ctx, g):  # noqa: ANN001, ANN202
    x, weight, values, indices = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_x, grad_values = torch.ops.peft_sparse.linear_backward(
        g, x, weight, values, indices, *ctx.args, need_x, need_values
    )
    return (grad_x if need_x else None), None, None, (grad_values if need_values else None), None, None, None, None


_linear_op.register_autograd(_linear_grad, setup_context=_linear_setup)


# --- delta only: x @ ΔS --------------------------------------------------------------------------------------
@torch.library.custom_op(
    f"{_LIB}::delta",
    mutates_args=(),
    schema="(Tensor x, Tensor values, Tensor indices, int block_size, int rows, int cols, float scaling, "
    "bool transposed) -> Tensor",
)
def _delta_op(x, values, indices, block_size, rows, cols, scaling, transposed):  # noqa: ANN001, ANN202
    with _no_autocast(x):
        if block_size:
            out = _block.delta_forward(x, values, indices, block_size, (rows, cols), scaling, transposed)
        else:
            out = _flat.delta_forward(x, values, indices, (rows, cols), scaling, transposed)
        return out.contiguous()


@_delta_op.register_fake
def _(x, values, indices, block_size, rows, cols, scaling, transposed):  # noqa: ANN001, ANN202
    dtype = torch.promote_types(x.dtype, values.dtype)
    return x.new_empty(*x.shape[:-1], _out_width(rows, cols, transposed), dtype=dtype)


@torch.library.custom_op(
    f"{_LIB}::delta_backward",
    mutates_args=(),
    schema="(Tensor grad, Tensor x, Tensor values, Tensor indices, int block_size, int rows, int cols, "
    "float scaling, bool transposed, bool need_x, bool need_values) -> (Tensor, Tensor)",
)
def _delta_backward_op(g, x, values, indices, block_size, rows, cols, scaling, transposed, need_x, need_values):  # noqa: ANN001, ANN202
    with _no_autocast(x):
        shape = (rows, cols)
        if block_size:
            grads = _block.delta_backward(
                g, x, values, indices, block_size, shape, scaling, transposed, need_x, need_values
            )
        else:
            grads = _flat.delta_backward(g, x, values, indices, shape, scaling, transposed, need_x, need_values)
        return _materialize(grads, x, values)


@_delta_backward_op.register_fake
def _(g, x, values, indices, block_size, rows, cols, scaling, transposed, need_x, need_values):  # noqa: ANN001, ANN202
    return _empty_like_if(need_x, x), _empty_like_if(need_values, values)


def _delta_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    x, values, indices, block_size, rows, cols, scaling, transposed = inputs
    ctx.save_for_backward(x, values, indices)
    ctx.args = (block_size, rows, cols, scaling, transposed)


def _delta_grad(ctx, g):  # noqa: ANN001, ANN202
    x, values, indices = ctx.saved_tensors
    need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_values = torch.ops.peft_sparse.delta_backward(g, x, values, indices, *ctx.args, need_x, need_values)
    return (grad_x if need_x else None), (grad_values if need_values else None), None, None, None, None, None, None


_delta_op.register_autograd(_delta_grad, setup_context=_delta_setup)


def _materialize(
    grads: tuple[torch.Tensor | None, torch.Tensor | None], x: torch.Tensor, values: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom ops return tensors, not ``None``, and never alias an input: empty tensors stand in for skipped grads."""
    grad_x, grad_values = grads
    grad_x = x.new_empty(0) if grad_x is None else grad_x.contiguous()
    grad_values = values.new_empty(0) if grad_values is None else grad_values.contiguous()
    return grad_x, grad_values


# --- public entry points -------------------------------------------------------------------------------------
def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Adapted layer output ``x @ S_eff^T + b`` (``x @ S_eff + b`` if ``transposed``), one GEMM.

    ``S_eff = weight + scaling * scatter(values at indices)``, composed in ``promote_types(weight, values)``,
    multiplied in ``x``'s dtype (the autocast dtype under autocast). Gradients flow to ``x`` and ``values`` only.
    """
    x = _autocast_input(x)
    return torch.ops.peft_sparse.linear(x, weight, bias, values, indices, 0, float(scaling), bool(transposed))


def block_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Adapted output ``x @ S_eff^T + b`` (``x @ S_eff + b`` if ``transposed``), block-sparse ΔS, one GEMM."""
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    x = _autocast_input(x)
    return torch.ops.peft_sparse.linear(
        x, weight, bias, values, block_indices, int(block_size), float(scaling), bool(transposed)
    )


def sparse_delta(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    shape: tuple[int, int],
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Only the adapter term ``x @ ΔS^T`` (``x @ ΔS`` if ``transposed``) for a storage shape ``shape``.

    The result dtype is ``promote_types(x.dtype, values.dtype)``; gradients flow to ``x`` and ``values``.
    """
    rows, cols = int(shape[0]), int(shape[1])
    return torch.ops.peft_sparse.delta(x, values, indices, 0, rows, cols, float(scaling), bool(transposed))


def block_sparse_delta(
    x: torch.Tensor,
    values: torch.Tensor,
    block_indices: torch.Tensor,
    block_size: int,
    shape: tuple[int, int],
    scaling: float = 1.0,
    transposed: bool = False,
) -> torch.Tensor:
    """Only the block adapter term ``x @ ΔS^T`` (``x @ ΔS`` if ``transposed``); dtype as ``sparse_delta``."""
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    rows, cols = int(shape[0]), int(shape[1])
    return torch.ops.peft_sparse.delta(
        x, values, block_indices, int(block_size), rows, cols, float(scaling), bool(transposed)
    )
