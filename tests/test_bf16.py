"""Half-precision bases: fp32 adapter values, the delta is added to the output (never rounded into a bf16/fp16
copy of W), so a 1e-5 delta changes the output as in fp32; merging still rounds W + ΔW once."""

from __future__ import annotations

import pytest
import torch
from conftest import dense_delta, lm_batches, sparse_layers, tiny_llama
from peft import get_peft_model
from torch import nn

from peft_sparse import SparseAdapterConfig

HALF = [torch.bfloat16, torch.float16]


class Cancelling(nn.Module):
    """``y = x @ W^T`` with ``W = [B, -B]`` and ``x = [z, z]``: the base output is exactly 0 in any precision,
    while ``|W| ~ 1`` so a 1e-5 change of an entry is far below half a bf16/fp16 ulp of W (2^-8 / 2^-11)."""

    def __init__(self, features: int = 16) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        half = (torch.rand(features, features, generator=generator) + 0.5) * torch.sign(
            torch.randn(features, features, generator=generator)
        )
        self.proj = nn.Linear(2 * features, features, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.cat([half, -half], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _cancelling_inputs(dtype: torch.dtype, features: int = 16) -> torch.Tensor:
    z = torch.randn(8, features, generator=torch.Generator().manual_seed(1)).to(dtype)
    return torch.cat([z, z], dim=-1)


def _model(dtype: torch.dtype, delta: float, block_size: int | None):
    config = SparseAdapterConfig(
        target_modules=["proj"], keep_ratio=0.25, mask_init="random", seed=0, block_size=block_size
    )
    model = get_peft_model(Cancelling().to(dtype), config)
    layer = next(iter(sparse_layers(model).values()))
    values = layer.sparse_adapter_values["default"]
    signs = torch.sign(torch.randn(values.shape, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        values.copy_(delta * signs)
    return model, layer


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("block_size", [None, 4], ids=["unstructured", "block4"])
def test_small_delta_changes_a_half_precision_output_as_in_fp32(dtype, block_size) -> None:
    x = _cancelling_inputs(dtype)
    model, layer = _model(dtype, 1e-5, block_size)
    assert layer.get_base_layer().weight.dtype == dtype
    assert layer.sparse_adapter_values["default"].dtype == torch.float32  # PEFT's autocast_adapter_dtype default
    with torch.no_grad():
        changed = model(x)
        with model.disable_adapter():
            base = model(x)
    want = x.double() @ dense_delta(layer, "default").double().T  # the exact adapter term, in fp64
    assert changed.dtype == dtype
    assert float(base.abs().max()) < 1e-6  # the base output cancels (up to GEMM summation order)
    assert float(want.abs().max()) > 1e-5
    diff = (changed - base).double()
    # the delta survives with the relative precision of the half type (roundings of the delta and of the output)
    assert float((diff - want).norm() / want.norm()) < 1e-2
    torch.testing.assert_close(diff, want, rtol=2e-2, atol=2e-7)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_adapter_values_of_a_half_precision_model_are_fp32_and_trainable(dtype) -> None:
    model = get_peft_model(tiny_llama(dtype=dtype), SparseAdapterConfig(target_modules=["q_proj", "v_proj"]))
    layers = sparse_layers(model)
    assert all(layer.sparse_adapter_values["default"].dtype == torch.float32 for layer in layers.values())
    batch = lm_batches(1)[0]
    model(**batch).loss.backward()
    for name, layer in layers.items():
        grad = layer.sparse_adapter_values["default"].grad
        assert grad is not None and grad.dtype == torch.float32 and torch.isfinite(grad).all(), name
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("block_size", [None, 4], ids=["unstructured", "block4"])
def test_merging_small_deltas_into_a_half_precision_weight_rounds_once(dtype, block_size) -> None:
    model, layer = _model(dtype, 1e-5, block_size)
    with torch.no_grad():
        layer.sparse_adapter_values["default"].mul_(
            torch.logspace(-2, 3, layer.sparse_adapter_values["default"].numel())  # 1e-7 .. 1e-2
        )
    weight = layer.get_base_layer().weight
    before = weight.detach().clone()
    dense = layer.get_delta_weight("default").float()
    model.merge_adapter()
    expected = (before.float() + dense).to(dtype)  # W + ΔW computed exactly, rounded once
    assert torch.equal(weight.detach(), expected)
    assert not torch.equal(weight.detach(), before)  # the larger deltas do move the weight


@pytest.mark.parametrize("block_size", [None, 4], ids=["unstructured", "block4"])
def test_autocast_runs_the_fused_layer_like_a_dense_merged_linear(block_size) -> None:
    """Under ``torch.autocast`` (Trainer's ``bf16=True``) on fp32 weights, the fused op composes ``W + ΔW`` in fp32,
    rounds it once and runs a bf16 GEMM, exactly what ``F.linear`` does for a dense merged weight; compiled too."""
    model, layer = _model(torch.float32, 1e-3, block_size)
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(3))
    merged = layer.get_base_layer().weight.detach() + dense_delta(layer, "default")
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = torch.nn.functional.linear(x, merged)
        got = model(x)
        got_compiled = compiled(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_compiled, want, rtol=0, atol=0)


def test_autocast_delta_path_stays_fp32_and_compiles() -> None:
    """Two active adapters take ``base(x) + delta``: under autocast the delta op still runs in fp32 (its fake and
    real outputs agree, so the compiled graph matches eager)."""
    model, layer = _model(torch.float32, 1e-3, None)
    model.add_adapter("second", SparseAdapterConfig(target_modules=["proj"], keep_ratio=0.1, mask_init="random"))
    model.base_model.set_adapter(["default", "second"])
    x = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        delta = layer.delta_output("default", x)
        eager = model(x)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert delta.dtype == torch.float32
    torch.testing.assert_close(delta.double(), x.double() @ dense_delta(layer, "default").double().T)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
