"""SparseAdapterLayer: stored state, forward vs a dense reference, several adapters, merge/unmerge, dtypes, training."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    assert_same_tensors,
    base_weights,
    dense_delta,
    dense_forward,
    lm_batches,
    set_random_values,
    sparse_layers,
    tiny_gpt2,
    tiny_llama,
)
from peft import get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_sparse import SparseAdapterConfig
from peft_sparse.layer import SparseAdapterLayer


class Net(nn.Module):
    """Linear with bias, ragged shapes, Linear without bias and a GPT-2 Conv1D."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin1 = nn.Linear(10, 7)
        self.lin2 = nn.Linear(7, 5, bias=False)
        self.conv = Conv1D(6, 5)  # weight (5, 6): (in, out)
        with torch.no_grad():
            self.conv.weight.normal_(std=0.3)
            self.conv.bias.normal_(std=0.3)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.relu(self.lin2(torch.relu(self.lin1(x)))))


TARGETS = ["lin1", "lin2", "conv"]


def net_config(**kwargs) -> SparseAdapterConfig:
    kwargs.setdefault("keep_ratio", 0.3)
    kwargs.setdefault("mask_init", "random")
    kwargs.setdefault("seed", 0)
    return SparseAdapterConfig(target_modules=TARGETS, **kwargs)


def make(block_size: int | None = None, dtype: torch.dtype = torch.float32, adapters=("default",), **kwargs):
    model = get_peft_model(Net(dtype), net_config(block_size=block_size, **kwargs), adapter_name=adapters[0])
    for i, name in enumerate(adapters[1:], start=1):
        model.add_adapter(name, net_config(block_size=block_size, seed=i, **kwargs))
    for i, name in enumerate(adapters):
        set_random_values(model, name, seed=10 + i)
    return model


def net_reference(model, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """The whole Net evaluated with dense W + ΔW per layer (fp64)."""
    layers = sparse_layers(model)
    h = torch.relu(dense_forward(layers["lin1"], x, adapters))
    h = torch.relu(dense_forward(layers["lin2"], h, adapters))
    return dense_forward(layers["conv"], h, adapters)


X = torch.randn(4, 3, 10, generator=torch.Generator().manual_seed(0))


# --- stored state ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 3])
def test_only_values_and_int32_indices_are_stored(block_size):
    model = make(block_size, adapters=("a", "b"))
    for layer in sparse_layers(model).values():
        base = layer.get_base_layer()
        base_keys = {f"base_layer.{k}" for k in base.state_dict()}
        expected = {f"sparse_adapter_{kind}.{a}" for kind in ("values", "indices") for a in ("a", "b")}
        assert set(layer.state_dict()) == base_keys | expected
        buffers = dict(layer.named_buffers())
        assert set(buffers) == {"sparse_adapter_indices.a", "sparse_adapter_indices.b"}
        own_params = {n for n, _ in layer.named_parameters() if not n.startswith("base_layer.")}
        assert own_params == {"sparse_adapter_values.a", "sparse_adapter_values.b"}
        width = 1 if block_size is None else block_size**2
        for name in ("a", "b"):
            indices, values = layer.sparse_adapter_indices[name], layer.sparse_adapter_values[name]
            assert indices.dtype == torch.int32 and indices.dim() == 1
            assert isinstance(values, nn.Parameter) and values.dim() == 1
            assert values.numel() == indices.numel() * width
        # no dense mask / delta hiding in plain attributes
        dense_numel = base.weight.numel()
        for attr, value in vars(layer).items():
            if isinstance(value, torch.Tensor):
                assert value.numel() < dense_numel, attr


def test_optimizer_state_is_the_size_of_the_values():
    model = make()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model(X).pow(2).mean().backward()
    optimizer.step()
    for p in params:
        state = optimizer.state[p]
        assert state["exp_avg"].shape == p.shape == state["exp_avg_sq"].shape
    assert sum(p.numel() for p in params) == sum(
        layer.sparse_adapter_values["default"].numel() for layer in sparse_layers(model).values()
    )


# --- forward --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 2, 3, 4])
def test_forward_matches_dense_reference(block_size):
    model = make(block_size)
    layers = sparse_layers(model)
    for name, layer in layers.items():
        in_features = layer.get_base_layer().weight.shape[0 if name == "conv" else 1]
        x = torch.randn(2, 3, in_features)
        torch.testing.assert_close(layer(x).double(), dense_forward(layer, x, ["default"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(X).double(), net_reference(model, X, ["default"]), rtol=1e-5, atol=1e-5)


def test_block_padding_is_inert():
    """lin1 is (7, 10) with 3x3 blocks: edge blocks are cut; their padding slots have no effect and no gradient."""
    model = make(block_size=3, keep_ratio=1.0)
    layer = sparse_layers(model)["lin1"]
    values = layer.sparse_adapter_values["default"]
    out_before = model(X)
    rows = values.detach().view(-1, 3, 3)
    padding = torch.zeros_like(rows, dtype=torch.bool)
    indices = layer.sparse_adapter_indices["default"].tolist()
    for k, b in enumerate(indices):
        r0, c0 = (b // 4) * 3, (b % 4) * 3  # grid of 3 x 4 blocks
        for i in range(3):
            for j in range(3):
                padding[k, i, j] = r0 + i >= 7 or c0 + j >= 10
    assert padding.any()
    with torch.no_grad():
        values.view(-1, 3, 3)[padding] = 123.0
    torch.testing.assert_close(model(X), out_before)
    model.train()
    model(X).sum().backward()
    assert torch.all(values.grad.view(-1, 3, 3)[padding] == 0)
    assert values.grad.view(-1, 3, 3)[~padding].abs().sum() > 0
    merged = copy.deepcopy(model).merge_and_unload()
    expected = layer.get_base_layer().weight.detach() + dense_delta(layer, "default")
    torch.testing.assert_close(merged.lin1.weight.detach(), expected, rtol=0, atol=1e-6)


def test_gpt2_conv1d_layout_matches_dense_model():
    base = tiny_gpt2()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, SparseAdapterConfig(target_modules=["c_attn", "c_fc", "c_proj"], keep_ratio=0.1))
    set_random_values(model, std=0.2)
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(model).items():
            ref_modules[name].weight += dense_delta(layer, "default")
    ids = lm_batches(1)[0]["input_ids"]
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(input_ids=ids).logits, base_model_logits(model, ids))


def base_model_logits(model, ids):
    with model.disable_adapter():
        return model(input_ids=ids).logits


def test_llama_logits_match_dense_model():
    base = tiny_llama()
    reference = copy.deepcopy(base)
    model = get_peft_model(base, SparseAdapterConfig(target_modules="all-linear", keep_ratio=0.05, block_size=4))
    set_random_values(model, std=0.2)
    ref_modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(model).items():
            ref_modules[name].weight += dense_delta(layer, "default")
    ids = lm_batches(1)[0]["input_ids"]
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


# --- several adapters -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 2])
def test_set_adapter_several_active_and_disable(block_size):
    model = make(block_size, adapters=("a", "b"))
    plain = Net()
    tol = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(model(X).double(), net_reference(model, X, ["a"]), **tol)
    model.set_adapter("b")
    torch.testing.assert_close(model(X).double(), net_reference(model, X, ["b"]), **tol)
    model.base_model.set_adapter(["a", "b"])
    assert sparse_layers(model)["lin1"].active_adapters == ["a", "b"]
    both = net_reference(model, X, ["a", "b"])
    torch.testing.assert_close(model(X).double(), both, **tol)
    assert not torch.allclose(both, net_reference(model, X, ["a"]))
    with model.disable_adapter():
        torch.testing.assert_close(model(X), plain(X), rtol=0, atol=0)
    torch.testing.assert_close(model(X).double(), both, **tol)


def test_block_and_unstructured_adapters_active_together():
    model = get_peft_model(Net(), net_config(), adapter_name="entries")
    model.add_adapter("blocks", net_config(block_size=2, seed=5))
    set_random_values(model)
    model.base_model.set_adapter(["entries", "blocks"])
    reference = net_reference(model, X, ["entries", "blocks"])
    torch.testing.assert_close(model(X).double(), reference, rtol=1e-5, atol=1e-5)
    model.merge_adapter()
    torch.testing.assert_close(model(X).double(), reference, rtol=1e-5, atol=1e-5)


def test_init_weights_false_starts_from_random_values_with_zero_padding():
    model = get_peft_model(Net(), net_config(block_size=3, keep_ratio=1.0, init_weights=False))
    layer = sparse_layers(model)["lin1"]  # (7, 10): ragged 3x3 blocks
    values = layer.sparse_adapter_values["default"].detach().view(-1, 3, 3)
    assert values.abs().sum() > 0
    for k, b in enumerate(layer.sparse_adapter_indices["default"].tolist()):
        r0, c0 = (b // 4) * 3, (b % 4) * 3
        for i in range(3):
            for j in range(3):
                if r0 + i >= 7 or c0 + j >= 10:
                    assert values[k, i, j] == 0
    torch.testing.assert_close(model(X).double(), net_reference(model, X, ["default"]), rtol=1e-5, atol=1e-5)


def test_casting_the_model_keeps_int32_indices():
    model = make()
    model.to(torch.bfloat16)
    for layer in sparse_layers(model).values():
        assert layer.sparse_adapter_indices["default"].dtype == torch.int32
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
    reference = net_reference(model, X.to(torch.bfloat16), ["default"])
    torch.testing.assert_close(model(X.to(torch.bfloat16)).double(), reference, rtol=3e-2, atol=3e-2)


def test_adapters_on_different_modules():
    model = get_peft_model(Net(), SparseAdapterConfig(target_modules=["lin1"], keep_ratio=0.5), adapter_name="a")
    model.add_adapter("b", SparseAdapterConfig(target_modules=["conv"], keep_ratio=0.5))
    set_random_values(model)
    model.base_model.set_adapter(["a", "b"])
    layers = sparse_layers(model)
    assert set(layers["lin1"].sparse_adapter_values) == {"a"} and set(layers["conv"].sparse_adapter_values) == {"b"}
    h = torch.relu(dense_forward(layers["lin1"], X, ["a"]))
    lin2 = model.base_model.model.lin2
    h = torch.relu(h @ lin2.weight.detach().double().T)
    torch.testing.assert_close(model(X).double(), dense_forward(layers["conv"], h, ["b"]), rtol=1e-5, atol=1e-5)


# --- merging --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 3])
def test_merge_and_unmerge_are_exact_index_add_and_subtract(block_size):
    model = make(block_size, adapters=("a", "b"))
    model.base_model.set_adapter(["a", "b"])
    layers = sparse_layers(model)
    before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    expected_out = model(X)
    model.merge_adapter()
    for name, layer in layers.items():
        assert layer.merged and layer.merged_adapters == ["a", "b"]
        merged = layer.get_base_layer().weight.detach()
        expected = before[name] + dense_delta(layer, "a") + dense_delta(layer, "b")
        torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)
        touched = (dense_delta(layer, "a") != 0) | (dense_delta(layer, "b") != 0)
        assert torch.equal(merged[~touched], before[name][~touched])  # untouched entries bit-identical
    torch.testing.assert_close(model(X), expected_out, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    for name, layer in layers.items():
        assert not layer.merged
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(X), expected_out, rtol=1e-5, atol=1e-6)


def test_merge_only_named_adapters():
    model = make(adapters=("a", "b"))
    layers = sparse_layers(model)
    before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    model.merge_adapter(adapter_names=["b"])
    for name, layer in layers.items():
        expected = before[name] + dense_delta(layer, "b")
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("how", ["merge_adapter", "merge_and_unload"])
def test_safe_merge_refuses_non_finite_and_leaves_every_base_weight_untouched(bad, how):
    model = make(adapters=("a",))
    set_random_values(model)
    with torch.no_grad():
        sparse_layers(model)["conv"].sparse_adapter_values["a"][0] = bad  # the last layer visited is broken
    before = base_weights(model)
    with pytest.raises(ValueError, match="NaN"):
        if how == "merge_adapter":
            model.merge_adapter(safe_merge=True)
        else:
            model.merge_and_unload(safe_merge=True)
    assert_same_tensors(base_weights(model), before)
    for layer in sparse_layers(model).values():
        assert not layer.merged
    assert set(sparse_layers(model)) == set(TARGETS)  # nothing unloaded


def test_layer_safe_merge_refuses_nan():
    model = make()
    layer = sparse_layers(model)["lin1"]
    with torch.no_grad():
        layer.sparse_adapter_values["default"][-1] = float("nan")
    weight = layer.get_base_layer().weight.detach().clone()
    with pytest.raises(ValueError):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight.detach(), weight) and not layer.merged


def test_merge_and_unload_gives_the_dense_merged_base_model():
    model = make(block_size=2)
    layers = sparse_layers(model)
    expected = {
        n: layer.get_base_layer().weight.detach() + dense_delta(layer, "default") for n, layer in layers.items()
    }
    out = model(X)
    merged = model.merge_and_unload(safe_merge=True)
    assert isinstance(merged, Net) and not any(isinstance(m, SparseAdapterLayer) for m in merged.modules())
    for name, weight in expected.items():
        torch.testing.assert_close(getattr(merged, name).weight.detach(), weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(merged(X), out, rtol=1e-5, atol=1e-6)


def test_unload_restores_the_base_model():
    plain = Net()
    model = make()
    unloaded = model.unload()
    assert isinstance(unloaded, Net) and not any(isinstance(m, SparseAdapterLayer) for m in unloaded.modules())
    assert_same_tensors(dict(unloaded.state_dict()), dict(plain.state_dict()))


def test_delete_adapter():
    model = make(adapters=("a", "b"))
    model.delete_adapter("a")
    assert set(model.peft_config) == {"b"}
    assert model.active_adapters == ["b"]
    for layer in sparse_layers(model).values():
        assert set(layer.sparse_adapter_values) == set(layer.sparse_adapter_indices) == {"b"}
        assert set(layer.block_size) == set(layer.scaling) == {"b"}
    assert not any(key.endswith(".a") for key in model.state_dict())
    torch.testing.assert_close(model(X).double(), net_reference(model, X, ["b"]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        model.delete_adapter("a")


# --- dtypes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 3e-3)], ids=str
)
@pytest.mark.parametrize("block_size", [None, 3])
def test_dtypes_forward_merge_and_unmerge(dtype, tol, block_size):
    model = make(block_size, dtype=dtype)
    x = X.to(dtype)
    layers = sparse_layers(model)
    for layer in layers.values():
        assert layer.get_base_layer().weight.dtype == dtype
        assert layer.sparse_adapter_values["default"].dtype.is_floating_point
    out = model(x)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), net_reference(model, x, ["default"]), rtol=tol, atol=tol)
    before = {n: layer.get_base_layer().weight.detach().clone() for n, layer in layers.items()}
    model.merge_adapter(safe_merge=True)
    for name, layer in layers.items():
        merged = layer.get_base_layer().weight.detach()
        assert merged.dtype == dtype
        expected = (before[name].float() + dense_delta(layer, "default")).to(dtype)
        torch.testing.assert_close(merged, expected, rtol=0, atol=0)  # one rounding of W + Δ, same as dense
    torch.testing.assert_close(model(x).double(), out.double(), rtol=tol, atol=tol)
    model.unmerge_adapter()
    for name, layer in layers.items():
        torch.testing.assert_close(layer.get_base_layer().weight.detach(), before[name], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_training_step(dtype):
    model = make(dtype=dtype)
    model.train()
    before = base_weights(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(X.to(dtype)).float().pow(2).mean().backward()
    optimizer.step()
    assert_same_tensors(base_weights(model), before)
    for layer in sparse_layers(model).values():
        assert torch.isfinite(layer.sparse_adapter_values["default"]).all()


# --- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [None, 2])
def test_gradients_reach_only_the_active_values_and_match_dense(block_size):
    model = make(block_size, adapters=("a", "b"))
    model.train()
    model(X).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == {f"base_model.model.{m}.sparse_adapter_values.a" for m in TARGETS}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "sparse_adapter_values.a" not in n)

    # dense reference: gradient wrt a dense ΔW, read at the stored positions
    layers = sparse_layers(model)
    deltas = {n: dense_delta(layer, "a").double().requires_grad_(True) for n, layer in layers.items()}

    def lin(name, h):
        base = layers[name].get_base_layer()
        w = base.weight.detach().double() + deltas[name]
        out = h @ w if name == "conv" else h @ w.T
        return out + base.bias.detach().double() if base.bias is not None else out

    lin("conv", torch.relu(lin("lin2", torch.relu(lin("lin1", X.double()))))).pow(2).sum().backward()
    for name, layer in layers.items():
        grad = layer.sparse_adapter_values["a"].grad.double()
        reference = gathered(layer, "a", deltas[name].grad)
        torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)


def gathered(layer: SparseAdapterLayer, adapter: str, dense: torch.Tensor) -> torch.Tensor:
    """Dense gradient read at the adapter's value slots (zero for block padding)."""
    rows, cols = dense.shape
    block = layer.block_size[adapter]
    out = []
    for b in layer.sparse_adapter_indices[adapter].tolist():
        if block is None:
            out.append(dense[b // cols, b % cols])
            continue
        grid_cols = -(-cols // block)
        r0, c0 = (b // grid_cols) * block, (b % grid_cols) * block
        for i in range(block):
            for j in range(block):
                inside = r0 + i < rows and c0 + j < cols
                out.append(dense[r0 + i, c0 + j] if inside else torch.zeros((), dtype=dense.dtype))
    return torch.stack(out)


def test_training_changes_only_adapter_values():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules="all-linear", keep_ratio=0.05))
    model.train()
    before = base_weights(model)
    values_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(3):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_same_tensors(base_weights(model), before)
    assert set(values_before) == {n for n, _ in model.named_parameters() if "sparse_adapter_values" in n}
    for name, value in model.named_parameters():
        if name in values_before:
            assert not torch.equal(value.detach(), values_before[name]), name
