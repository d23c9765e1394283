"""The per-mask index cache of the kernels (CSR structure, block slot positions): never stale, never leaked.

Every check compares the kernels' output and gradients with the dense references after the mask changed in a
way the cache must notice: a new index tensor (set_mask, .to), an in-place write (load_state_dict copies into
the existing buffer, copy_), eagerly and under torch.compile.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
import torch._dynamo
from conftest import lm_batches, set_random_values, sparse_layers, tiny_llama
from peft import get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend

from peft_sparse import SparseAdapterConfig
from peft_sparse.ops import (
    block_sparse_delta,
    block_sparse_delta_reference,
    block_sparse_linear,
    block_sparse_linear_reference,
    index_cache,
    sparse_delta,
    sparse_delta_reference,
    sparse_linear,
    sparse_linear_reference,
)

F64 = torch.float64
SHAPE = (40, 24)


def _random_indices(num_positions: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(num_positions, generator=generator)[:count].sort().values.to(torch.int32)


def _mask(block: int, seed: int) -> torch.Tensor:
    if not block:
        return _random_indices(SHAPE[0] * SHAPE[1], 90, seed)
    grid = math.ceil(SHAPE[0] / block) * math.ceil(SHAPE[1] / block)
    return _random_indices(grid, min(3, grid), seed)


def _run(kind: str, block: int, indices: torch.Tensor, seed: int = 0, reference: bool = False):
    """Output, grad of x and grad of values of one op (or its dense reference) on fixed inputs."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(SHAPE, generator=generator, dtype=F64)
    x = torch.randn(3, 7, SHAPE[1], generator=generator, dtype=F64).requires_grad_()
    width = block * block if block else 1
    values = torch.randn(indices.numel() * width, generator=generator, dtype=F64).requires_grad_()
    if kind == "linear" and not block:
        fn = sparse_linear_reference if reference else sparse_linear
        out = fn(x, weight, None, values, indices, 0.5)
    elif kind == "linear":
        fn = block_sparse_linear_reference if reference else block_sparse_linear
        out = fn(x, weight, None, values, indices, block, 0.5)
    elif not block:
        fn = sparse_delta_reference if reference else sparse_delta
        out = fn(x, values, indices, SHAPE, 0.5)
    else:
        fn = block_sparse_delta_reference if reference else block_sparse_delta
        out = fn(x, values, indices, block, SHAPE, 0.5)
    g = torch.randn(out.shape, generator=generator, dtype=F64)
    out.backward(g)
    return out.detach(), x.grad, values.grad


def _assert_matches_reference(kind: str, block: int, indices: torch.Tensor) -> None:
    got = _run(kind, block, indices)
    want = _run(kind, block, indices.clone(), reference=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


CASES = [(kind, block) for kind in ("linear", "delta") for block in (0, 4, 16)]
IDS = [f"{kind}-{'flat' if not block else f'b{block}'}" for kind, block in CASES]


@pytest.mark.parametrize(("kind", "block"), CASES, ids=IDS)
def test_in_place_change_of_the_indices_is_seen(kind, block) -> None:
    index_cache.clear()
    indices = _mask(block, seed=0)
    _assert_matches_reference(kind, block, indices)  # fills the cache for this tensor
    if not (kind == "delta" and block >= 16):  # the bmm delta path needs no derived structure
        assert index_cache.cache_size() >= 1
    with torch.no_grad():
        indices.copy_(_mask(block, seed=1))  # same tensor, same size, new positions
    _assert_matches_reference(kind, block, indices)


@pytest.mark.parametrize(("kind", "block"), CASES, ids=IDS)
def test_a_new_index_tensor_gets_its_own_entry(kind, block) -> None:
    first, second = _mask(block, seed=0), _mask(block, seed=2)
    _assert_matches_reference(kind, block, first)
    _assert_matches_reference(kind, block, second)
    _assert_matches_reference(kind, block, first)


def test_entries_die_with_their_index_tensor() -> None:
    index_cache.clear()
    indices = _mask(0, seed=0)
    _run("linear", 0, indices)
    assert index_cache.cache_size() == 1
    del indices
    gc.collect()
    assert index_cache.cache_size() == 0


def test_inference_mode_indices_are_not_cached_and_still_exact() -> None:
    index_cache.clear()
    with torch.inference_mode():
        indices = _mask(0, seed=0)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, SHAPE[1], generator=generator, dtype=F64)
    weight = torch.randn(SHAPE, generator=generator, dtype=F64)
    values = torch.randn(indices.numel(), generator=generator, dtype=F64)
    with torch.inference_mode():
        got = sparse_delta(x, values, indices, SHAPE, 0.5)
        fused = sparse_linear(x, weight, None, values, indices, 0.5)
    torch.testing.assert_close(got, sparse_delta_reference(x, values, indices.clone(), SHAPE, 0.5))
    torch.testing.assert_close(fused, sparse_linear_reference(x, weight, None, values, indices.clone(), 0.5))
    assert index_cache.cache_size() == 0


# --- through the layer: set_mask, load_state_dict, .to() ---------------------------------------------------------
def _model(block_size: int | None):
    config = SparseAdapterConfig(target_modules=["q_proj", "v_proj"], keep_ratio=0.1, block_size=block_size)
    model = get_peft_model(tiny_llama(), config)
    set_random_values(model, seed=3)
    return model


def _value_grads(model, batch) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    return {name: layer.sparse_adapter_values["default"].grad.clone() for name, layer in sparse_layers(model).items()}


def _fresh_copy(model, block_size: int | None):
    """A model with the same state built anew (nothing cached for its index tensors yet)."""
    twin = _model(block_size)
    twin.load_state_dict(model.state_dict(), assign=True)
    return twin


@pytest.mark.parametrize("block_size", [None, 4, 16], ids=["flat", "block4", "block16"])
def test_layer_state_changes_keep_gradients_exact(block_size) -> None:
    model = _model(block_size)
    batch = lm_batches(1)[0]
    _value_grads(model, batch)  # cache filled for the current masks
    layers = sparse_layers(model)
    generator = torch.Generator().manual_seed(7)
    # set_mask: a new mask of the same size for every layer.
    for layer in layers.values():
        count = layer.sparse_adapter_indices["default"].numel()
        chosen = torch.randperm(layer.num_positions("default"), generator=generator)[:count].sort().values
        layer.set_mask("default", chosen.to(torch.int32))
    set_random_values(model, seed=4)
    torch.testing.assert_close(_value_grads(model, batch), _value_grads(_fresh_copy(model, block_size), batch))
    # load_state_dict copies new masks into the existing index buffers (in place).
    donor = _model(block_size)
    for layer in sparse_layers(donor).values():
        count = layer.sparse_adapter_indices["default"].numel()
        chosen = torch.randperm(layer.num_positions("default"), generator=generator)[:count].sort().values
        layer.set_mask("default", chosen.to(torch.int32))
    set_random_values(donor, seed=5)
    buffers = {name: layer.sparse_adapter_indices["default"] for name, layer in layers.items()}
    model.load_state_dict(donor.state_dict())
    assert all(layers[name].sparse_adapter_indices["default"] is buf for name, buf in buffers.items())
    torch.testing.assert_close(_value_grads(model, batch), _value_grads(_fresh_copy(donor, block_size), batch))
    # .to(): a dtype change of the module, then back.
    model.to(F64)
    model.to(torch.float32)
    torch.testing.assert_close(_value_grads(model, batch), _value_grads(_fresh_copy(donor, block_size), batch))


@pytest.mark.parametrize("block_size", [None, 4], ids=["flat", "block4"])
def test_compiled_steps_do_not_recompile_and_see_mask_writes(block_size) -> None:
    torch._dynamo.reset()
    model = _model(block_size)
    eager = _fresh_copy(model, block_size)
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    batches = lm_batches(3)
    for batch in batches:
        torch.testing.assert_close(_value_grads(compiled, batch), _value_grads(eager, batch))
    assert backend.frame_count == 1, f"recompiled between steps: {backend.frame_count} graphs"
    # An in-place mask write between compiled steps (same shapes: no recompile needed) must be seen: compare with
    # a model built afresh from the new state, whose index tensors were never cached.
    for layer in sparse_layers(model).values():
        indices = layer.sparse_adapter_indices["default"]
        chosen = torch.randperm(layer.num_positions("default"), generator=torch.Generator().manual_seed(9))
        with torch.no_grad():
            indices.copy_(chosen[: indices.numel()].sort().values.to(indices.dtype))
    fresh = _fresh_copy(model, block_size)
    torch.testing.assert_close(_value_grads(compiled, batches[0]), _value_grads(fresh, batches[0]))
    torch._dynamo.reset()


# --- the token-major copy of a shared input (q/k/v read the same x) ----------------------------------------------
@pytest.mark.parametrize("dtype", [F64, torch.bfloat16], ids=["f64", "bf16"])
def test_projections_sharing_an_input_get_exact_value_gradients(dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, SHAPE[1], generator=generator, dtype=F64).to(dtype).requires_grad_()
    outs, grads, params = [], [], []
    for rows, seed in ((SHAPE[0], 0), (SHAPE[0] // 2, 1), (SHAPE[0] // 2, 2)):  # like q, k, v
        weight = torch.randn(rows, SHAPE[1], generator=generator, dtype=F64)
        indices = _random_indices(rows * SHAPE[1], 50, seed)
        values = torch.randn(50, generator=generator, dtype=F64).requires_grad_()
        outs.append(sparse_linear(x, weight, None, values, indices, 0.5))
        grads.append(torch.randn(outs[-1].shape, generator=generator, dtype=F64).to(outs[-1].dtype))
        params.append((weight, indices, values))
    torch.autograd.backward(outs, grads)
    x_ref = x.detach().double()
    for (_weight, indices, values), g in zip(params, grads, strict=True):
        # dense reference: d loss / d ΔW = g^T x (scaled), read at the mask
        want = 0.5 * (g.double().reshape(-1, g.shape[-1]).T @ x_ref.reshape(-1, SHAPE[1])).reshape(-1)[indices.long()]
        tol = 1e-10 if dtype == F64 else 2e-2
        torch.testing.assert_close(values.grad, want, rtol=tol, atol=tol)
