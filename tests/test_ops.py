"""The sparse autograd ops against their plain dense references (values, grad_x, grad_values)."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

from peft_sparse.ops import (
    block_entry_indices,
    block_sparse_delta,
    block_sparse_delta_reference,
    block_sparse_linear,
    block_sparse_linear_reference,
    sparse_delta,
    sparse_delta_reference,
    sparse_linear,
    sparse_linear_reference,
)

# The package re-exports a function named like the module, so fetch the modules themselves.
sparse_module = importlib.import_module("peft_sparse.ops.sparse_linear")
block_module = importlib.import_module("peft_sparse.ops.block_sparse")
F64 = torch.float64


def _mask(shape: tuple[int, int], count: int, seed: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(shape[0] * shape[1], generator=generator)[:count].sort().values.to(dtype)


def _block_mask(shape: tuple[int, int], block: int, count: int, seed: int) -> torch.Tensor:
    grid = math.ceil(shape[0] / block) * math.ceil(shape[1] / block)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(grid, generator=generator)[:count].sort().values


def _inputs(
    shape: tuple[int, int], lead: tuple[int, ...], transposed: bool, n_values: int, seed: int, dtype=F64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    rows, cols = shape
    weight = torch.randn(rows, cols, generator=generator, dtype=dtype)
    bias = torch.randn(cols if transposed else rows, generator=generator, dtype=dtype)
    x = torch.randn(*lead, rows if transposed else cols, generator=generator, dtype=dtype)
    x.requires_grad_(True)
    values = torch.randn(n_values, generator=generator, dtype=dtype).requires_grad_(True)
    return x, weight, bias, values


def _outputs_and_grads(fn, x: torch.Tensor, values: torch.Tensor, args: tuple, seed: int = 7):
    out = fn(*args)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    grad_x, grad_values = torch.autograd.grad(out, (x, values), g)
    return out, grad_x, grad_values


def _assert_match(fast, ref, x, values, args, atol=1e-10, rtol=1e-10) -> None:
    out, grad_x, grad_values = _outputs_and_grads(fast, x, values, args)
    out_r, grad_x_r, grad_values_r = _outputs_and_grads(ref, x, values, args)
    torch.testing.assert_close(out, out_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_x, grad_x_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_values, grad_values_r, atol=atol, rtol=rtol)
    assert grad_values.dtype == values.dtype and grad_x.dtype == x.dtype


CASES = [((10, 7), (5,)), ((7, 10), (2, 3)), ((48, 64), (3, 9)), ((16, 16), (4,))]


# --- unstructured -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,lead", CASES)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("density", [0.01, 0.3])
def test_sparse_ops_match_reference(shape, lead, transposed, density) -> None:
    count = max(1, int(density * shape[0] * shape[1]))
    indices = _mask(shape, count, seed=1)
    x, weight, bias, values = _inputs(shape, lead, transposed, count, seed=2)
    args = (x, weight, bias, values, indices, 0.75, transposed)
    _assert_match(sparse_linear, sparse_linear_reference, x, values, args)
    args = (x, values, indices, shape, 0.75, transposed)
    _assert_match(sparse_delta, sparse_delta_reference, x, values, args)


@pytest.mark.parametrize("max_density", [0.0, 1.0])
@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_delta_both_kernels(monkeypatch, max_density, transposed) -> None:
    monkeypatch.setattr(sparse_module, "_CSR_MAX_DENSITY", max_density)  # dense-ΔS path / CSR path
    shape = (12, 9)
    indices = _mask(shape, 20, seed=3)
    x, _, _, values = _inputs(shape, (2, 4), transposed, 20, seed=4)
    args = (x, values, indices, shape, 1.5, transposed)
    _assert_match(sparse_delta, sparse_delta_reference, x, values, args)


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_gradcheck(transposed) -> None:
    shape = (6, 5)
    indices = _mask(shape, 9, seed=5, dtype=torch.int32)
    x, weight, bias, values = _inputs(shape, (2, 3), transposed, 9, seed=6)
    fn = lambda x, v: sparse_linear(x, weight, bias, v, indices, 0.5, transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values))
    fn = lambda x, v: sparse_delta(x, v, indices, shape, 0.5, transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values))


def test_sampled_product_accumulates_token_chunks(monkeypatch) -> None:
    monkeypatch.setattr(sparse_module, "_TOKEN_CHUNK", 3)
    shape = (9, 11)
    indices = _mask(shape, 15, seed=7)
    for transposed in (False, True):
        x, weight, bias, values = _inputs(shape, (4, 5), transposed, 15, seed=8)
        args = (x, weight, bias, values, indices, 2.0, transposed)
        _assert_match(sparse_linear, sparse_linear_reference, x, values, args)


def test_int32_indices_match_int64() -> None:
    shape = (20, 30)
    idx64 = _mask(shape, 40, seed=9)
    idx32 = idx64.to(torch.int32)
    for transposed in (False, True):
        x, weight, bias, values = _inputs(shape, (6,), transposed, 40, seed=10)
        for fn, extra in ((sparse_linear, (weight, bias)), (sparse_delta, ())):
            tail = (0.5, transposed) if extra else (shape, 0.5, transposed)
            a = _outputs_and_grads(fn, x, values, (x, *extra, values, idx64, *tail))
            b = _outputs_and_grads(fn, x, values, (x, *extra, values, idx32, *tail))
            for left, right in zip(a, b, strict=True):
                torch.testing.assert_close(left, right, atol=1e-12, rtol=1e-12)
    assert idx32.dtype == torch.int32


@pytest.mark.parametrize("transposed", [False, True])
def test_linear_equals_delta_plus_base(transposed) -> None:
    shape = (24, 20)
    indices = _mask(shape, 30, seed=11)
    x, weight, bias, values = _inputs(shape, (3, 4), transposed, 30, seed=12)
    base = x @ weight + bias if transposed else x @ weight.T + bias
    fused = sparse_linear(x, weight, bias, values, indices, 0.3, transposed)
    split = sparse_delta(x, values, indices, shape, 0.3, transposed) + base
    torch.testing.assert_close(fused, split, atol=1e-12, rtol=1e-12)
    blocks = _block_mask(shape, 8, 4, seed=13)
    block_values = torch.randn(4 * 64, dtype=F64)
    fused = block_sparse_linear(x, weight, bias, block_values, blocks, 8, 0.3, transposed)
    split = block_sparse_delta(x, block_values, blocks, 8, shape, 0.3, transposed) + base
    torch.testing.assert_close(fused, split, atol=1e-12, rtol=1e-12)


# --- block --------------------------------------------------------------------------------------------------
BLOCK_CASES = [
    ((10, 7), 4, (5,)),
    ((7, 10), 4, (2, 3)),
    ((9, 13), 3, (4,)),
    ((16, 8), 4, (3, 2)),
    ((5, 6), 8, (3,)),
]


@pytest.fixture(params=["bmm", "entries"])
def block_kernel(request, monkeypatch) -> str:
    """Run a block test once through the bmm kernels and once through the per-entry (CSR) kernels."""
    monkeypatch.setattr(block_module, "_MIN_BMM_BLOCK", 1 if request.param == "bmm" else 10**6)
    return request.param


@pytest.mark.parametrize("shape,block,lead", BLOCK_CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_block_ops_match_reference(shape, block, lead, transposed, block_kernel) -> None:
    grid = math.ceil(shape[0] / block) * math.ceil(shape[1] / block)
    count = max(1, grid // 2)
    blocks = _block_mask(shape, block, count, seed=14)
    x, weight, bias, values = _inputs(shape, lead, transposed, count * block * block, seed=15)
    args = (x, weight, bias, values, blocks, block, 1.25, transposed)
    _assert_match(block_sparse_linear, block_sparse_linear_reference, x, values, args)
    args = (x, values, blocks, block, shape, 1.25, transposed)
    _assert_match(block_sparse_delta, block_sparse_delta_reference, x, values, args)


@pytest.mark.parametrize("transposed", [False, True])
def test_block_gradcheck(transposed, block_kernel) -> None:
    shape, block = (5, 7), 3
    blocks = torch.tensor([0, 2, 5], dtype=torch.int32)
    x, weight, bias, values = _inputs(shape, (2, 2), transposed, 3 * 9, seed=16)
    fn = lambda x, v: block_sparse_linear(x, weight, bias, v, blocks, block, 0.5, transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values))
    fn = lambda x, v: block_sparse_delta(x, v, blocks, block, shape, 0.5, transposed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, values))


def test_block_size_one_equals_unstructured(block_kernel) -> None:
    shape = (9, 6)
    indices = _mask(shape, 12, seed=17)
    for transposed in (False, True):
        x, weight, bias, values = _inputs(shape, (7,), transposed, 12, seed=18)
        a = _outputs_and_grads(sparse_linear, x, values, (x, weight, bias, values, indices, 0.5, transposed))
        args = (x, weight, bias, values, indices, 1, 0.5, transposed)
        b = _outputs_and_grads(block_sparse_linear, x, values, args)
        for left, right in zip(a, b, strict=True):
            torch.testing.assert_close(left, right, atol=1e-12, rtol=1e-12)


def test_block_entry_indices_ragged() -> None:
    shape, block = (10, 7), 4  # grid 3 x 2
    blocks = torch.tensor([1, 4, 5], dtype=torch.int32)
    flat, valid = block_entry_indices(blocks, block, shape)
    assert flat.shape == valid.shape == (3 * 16,)
    expected, mask = [], []
    for b in blocks.tolist():
        r0, c0 = (b // 2) * block, (b % 2) * block
        for u in range(block):
            for v in range(block):
                inside = r0 + u < shape[0] and c0 + v < shape[1]
                expected.append((r0 + u) * shape[1] + c0 + v if inside else -1)
                mask.append(inside)
    assert flat.tolist() == expected
    assert valid.tolist() == mask
    assert len(set(flat[valid].tolist())) == int(valid.sum())


@pytest.mark.parametrize("transposed", [False, True])
def test_block_padding_is_inert(transposed, block_kernel) -> None:
    shape, block = (10, 7), 4
    blocks = torch.tensor([1, 3, 4, 5])
    x, weight, bias, values = _inputs(shape, (2, 5), transposed, 4 * 16, seed=19)
    _, valid = block_entry_indices(blocks, block, shape)
    noisy = values.detach().clone()
    noisy[~valid] = 1e3
    clean = values.detach().clone()
    clean[~valid] = 0.0
    for fn, args in (
        (block_sparse_linear, lambda v: (x, weight, bias, v, blocks, block, 2.0, transposed)),
        (block_sparse_delta, lambda v: (x, v, blocks, block, shape, 2.0, transposed)),
    ):
        noisy_v, clean_v = noisy.clone().requires_grad_(True), clean.clone().requires_grad_(True)
        out_noisy, gx_noisy, gv_noisy = _outputs_and_grads(fn, x, noisy_v, args(noisy_v))
        out_clean, gx_clean, gv_clean = _outputs_and_grads(fn, x, clean_v, args(clean_v))
        torch.testing.assert_close(out_noisy, out_clean, atol=1e-12, rtol=0)
        torch.testing.assert_close(gx_noisy, gx_clean, atol=1e-12, rtol=0)
        assert torch.equal(gv_noisy[~valid], torch.zeros(int((~valid).sum()), dtype=F64))
        assert gv_noisy[valid].abs().min() > 0


def test_block_gather_chunks(monkeypatch) -> None:
    monkeypatch.setattr(block_module, "_MIN_BMM_BLOCK", 1)
    monkeypatch.setattr(block_module, "_GATHER_BUDGET", 1)  # one block per bmm
    shape, block = (13, 11), 4
    blocks = _block_mask(shape, block, 7, seed=20)
    for transposed in (False, True):
        x, weight, bias, values = _inputs(shape, (3, 2), transposed, 7 * 16, seed=21)
        args = (x, values, blocks, block, shape, 0.5, transposed)
        _assert_match(block_sparse_delta, block_sparse_delta_reference, x, values, args)
        args = (x, weight, bias, values, blocks, block, 0.5, transposed)
        _assert_match(block_sparse_linear, block_sparse_linear_reference, x, values, args)


# --- all four ops -------------------------------------------------------------------------------------------
def _four_ops(shape, transposed, x, weight, bias, values, indices, blocks, block_values, scaling=1.0):
    """(name, callable of values, values tensor) for each fast op."""
    return [
        ("sparse_linear", lambda v: sparse_linear(x, weight, bias, v, indices, scaling, transposed), values),
        ("sparse_delta", lambda v: sparse_delta(x, v, indices, shape, scaling, transposed), values),
        (
            "block_sparse_linear",
            lambda v: block_sparse_linear(x, weight, bias, v, blocks, 4, scaling, transposed),
            block_values,
        ),
        (
            "block_sparse_delta",
            lambda v: block_sparse_delta(x, v, blocks, 4, shape, scaling, transposed),
            block_values,
        ),
    ]


@pytest.mark.parametrize("transposed", [False, True])
def test_empty_masks(transposed, block_kernel) -> None:
    shape = (10, 7)
    x, weight, bias, _ = _inputs(shape, (2, 3), transposed, 0, seed=22)
    empty = torch.zeros(0, dtype=torch.int64)
    values = torch.zeros(0, dtype=F64, requires_grad=True)
    base = (x @ weight + bias if transposed else x @ weight.T + bias).detach()
    base_grad_x = (torch.ones_like(base) @ (weight.T if transposed else weight)).expand_as(x)
    for name, fn, v in _four_ops(shape, transposed, x, weight, bias, values, empty, empty, values):
        out = fn(v)
        grad_x, grad_v = torch.autograd.grad(out.sum(), (x, v))
        expected = torch.zeros_like(base) if "delta" in name else base
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)
        assert grad_v.shape == (0,), name
        expected_gx = torch.zeros_like(x) if "delta" in name else base_grad_x
        torch.testing.assert_close(grad_x, expected_gx, atol=1e-12, rtol=0)


@pytest.mark.parametrize("transposed", [False, True])
def test_base_weight_and_bias_get_no_grad(transposed, block_kernel) -> None:
    shape = (10, 7)
    x, weight, bias, values = _inputs(shape, (4,), transposed, 8, seed=23)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    indices = _mask(shape, 8, seed=24)
    blocks = torch.tensor([0, 5])
    block_values = torch.randn(2 * 16, dtype=F64, requires_grad=True)
    for name, fn, v in _four_ops(shape, transposed, x, weight, bias, values, indices, blocks, block_values):
        fn(v).sum().backward()
        assert weight.grad is None and bias.grad is None, name
        assert v.grad is not None and x.grad is not None, name


@pytest.mark.parametrize("transposed", [False, True])
def test_no_bias_and_values_only_grad(transposed) -> None:
    shape = (8, 12)
    indices = _mask(shape, 10, seed=25)
    x, weight, _, values = _inputs(shape, (5,), transposed, 10, seed=26)
    x = x.detach()  # grad for values only
    out = sparse_linear(x, weight, None, values, indices, 1.0, transposed)
    ref = sparse_linear_reference(x, weight, None, values, indices, 1.0, transposed)
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out.sum(), values)
    (grad_ref,) = torch.autograd.grad(ref.sum(), values)
    torch.testing.assert_close(grad, grad_ref)


@pytest.mark.parametrize("transposed", [False, True])
def test_fp32_close_to_fp64_reference(transposed, block_kernel) -> None:
    shape = (96, 64)
    indices = _mask(shape, 60, seed=27)
    blocks = _block_mask(shape, 4, 12, seed=28)
    x, weight, bias, values = _inputs(shape, (6, 50), transposed, 60, seed=29)
    block_values = torch.randn(12 * 16, dtype=F64, requires_grad=True)
    ops64 = _four_ops(shape, transposed, x, weight, bias, values, indices, blocks, block_values, 0.5)
    x32, w32, b32 = x.detach().float().requires_grad_(True), weight.float(), bias.float()
    v32 = values.detach().float().requires_grad_(True)
    bv32 = block_values.detach().float().requires_grad_(True)
    ops32 = _four_ops(shape, transposed, x32, w32, b32, v32, indices, blocks, bv32, 0.5)
    for (name, fn64, v64), (_, fn32, v32_) in zip(ops64, ops32, strict=True):
        out64, out32 = fn64(v64), fn32(v32_)
        g = torch.randn(out64.shape, generator=torch.Generator().manual_seed(30), dtype=F64)
        gx64, gv64 = torch.autograd.grad(out64, (x, v64), g)
        gx32, gv32 = torch.autograd.grad(out32, (x32, v32_), g.float())
        assert out32.dtype == gx32.dtype == gv32.dtype == torch.float32, name
        torch.testing.assert_close(out32.double(), out64, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gx32.double(), gx64, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(gv32.double(), gv64, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_and_keeps_value_dtype(dtype, block_kernel) -> None:
    shape = (32, 24)
    indices = _mask(shape, 20, seed=31, dtype=torch.int32)
    blocks = _block_mask(shape, 4, 6, seed=32)
    x, weight, bias, values = _inputs(shape, (4, 8), False, 20, seed=33)
    block_values = torch.randn(6 * 16, dtype=F64, requires_grad=True)
    ref = _four_ops(shape, False, x, weight, bias, values, indices, blocks, block_values)
    xh = x.detach().to(dtype).requires_grad_(True)
    wh, bh = weight.to(dtype), bias.to(dtype)
    vh = values.detach().to(dtype).requires_grad_(True)
    bvh = block_values.detach().float().requires_grad_(True)  # fp32 values next to a half model
    half = _four_ops(shape, False, xh, wh, bh, vh, indices, blocks, bvh)
    for (name, fn_ref, v_ref), (_, fn_half, v_half) in zip(ref, half, strict=True):
        out_ref, out_half = fn_ref(v_ref), fn_half(v_half)
        g = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(34), dtype=F64)
        gx_ref, gv_ref = torch.autograd.grad(out_ref, (x, v_ref), g)
        gx, gv = torch.autograd.grad(out_half, (xh, v_half), g.to(out_half.dtype))
        assert gx.dtype == dtype and gv.dtype == v_half.dtype, name
        for got, want in ((out_half, out_ref), (gx, gx_ref), (gv, gv_ref)):
            atol = 0.02 * float(want.detach().abs().max())
            torch.testing.assert_close(got.double(), want.detach(), atol=atol, rtol=0.02)


def test_zero_tokens(block_kernel) -> None:
    shape = (10, 7)
    indices = _mask(shape, 5, seed=35)
    x, weight, bias, values = _inputs(shape, (0,), False, 5, seed=36)
    blocks = torch.tensor([0, 3])
    block_values = torch.randn(2 * 16, dtype=F64, requires_grad=True)
    for name, fn, v in _four_ops(shape, False, x, weight, bias, values, indices, blocks, block_values):
        out = fn(v)
        assert out.shape == (0, 10), name
        (grad,) = torch.autograd.grad(out.sum(), v)
        assert torch.equal(grad, torch.zeros_like(v)), name
