"""torch.compile: the kernels are custom ops (one opaque node per adapter op), a training loop compiles like LoRA's
(no graph breaks, no recompiles between steps, one new graph on set_adapter), compiled = eager = reference."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch._dynamo
from conftest import lm_batches, set_random_values, sparse_layers, tiny_llama
from peft import LoraConfig, get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from peft_sparse import SparseAdapterConfig
from peft_sparse.ops import (
    block_sparse_delta,
    block_sparse_delta_reference,
    block_sparse_linear,
    block_sparse_linear_reference,
    sparse_delta,
    sparse_delta_reference,
    sparse_linear,
    sparse_linear_reference,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# --- the ops themselves ----------------------------------------------------------------------------------------
def _op_inputs(transposed: bool, block: int | None, dtype=F64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    shape = (12, 10)
    weight = torch.randn(shape, generator=generator, dtype=dtype)
    bias = torch.randn(shape[1] if transposed else shape[0], generator=generator, dtype=dtype)
    x = torch.randn(2, 5, shape[0] if transposed else shape[1], generator=generator, dtype=dtype).requires_grad_()
    if block is None:
        indices = torch.randperm(120, generator=generator)[:30].sort().values.to(torch.int32)
        values = torch.randn(30, generator=generator, dtype=dtype)
    else:
        grid = math.ceil(shape[0] / block) * math.ceil(shape[1] / block)
        count = min(4, grid)
        indices = torch.randperm(grid, generator=generator)[:count].sort().values.to(torch.int32)
        values = torch.randn(count * block * block, generator=generator, dtype=dtype)
    return shape, weight, bias, x, values.requires_grad_(), indices


def _fast_and_reference(kind: str, block: int | None):
    if kind == "linear" and block is None:
        return (
            lambda x, w, b, v, i, s, t, shape: sparse_linear(x, w, b, v, i, s, t),
            lambda x, w, b, v, i, s, t, shape: sparse_linear_reference(x, w, b, v, i, s, t),
        )
    if kind == "linear":
        return (
            lambda x, w, b, v, i, s, t, shape: block_sparse_linear(x, w, b, v, i, block, s, t),
            lambda x, w, b, v, i, s, t, shape: block_sparse_linear_reference(x, w, b, v, i, block, s, t),
        )
    if block is None:
        return (
            lambda x, w, b, v, i, s, t, shape: sparse_delta(x, v, i, shape, s, t),
            lambda x, w, b, v, i, s, t, shape: sparse_delta_reference(x, v, i, shape, s, t),
        )
    return (
        lambda x, w, b, v, i, s, t, shape: block_sparse_delta(x, v, i, block, shape, s, t),
        lambda x, w, b, v, i, s, t, shape: block_sparse_delta_reference(x, v, i, block, shape, s, t),
    )


@pytest.mark.parametrize("kind", ["linear", "delta"])
@pytest.mark.parametrize("block", [None, 2, 16], ids=["unstructured", "block2", "block16"])
@pytest.mark.parametrize("transposed", [False, True], ids=["linear_layout", "conv1d_layout"])
def test_compiled_ops_match_eager_and_reference_without_graph_breaks(kind, block, transposed) -> None:
    shape, weight, bias, x, values, indices = _op_inputs(transposed, block)
    fast, reference = _fast_and_reference(kind, block)

    def step(x, values):
        return fast(x, weight, bias, values, indices, 0.7, transposed, shape)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)  # fullgraph: any graph break raises
    g = torch.randn(*x.shape[:-1], shape[1] if transposed else shape[0], dtype=F64)
    results = []
    for fn in (compiled, step, lambda x, v: reference(x, weight, bias, v, indices, 0.7, transposed, shape)):
        out = fn(x, values)
        results.append((out, *torch.autograd.grad(out, (x, values), g)))
    for got_compiled, got_eager, want in zip(*results, strict=True):
        torch.testing.assert_close(got_compiled, got_eager, rtol=0, atol=0)
        torch.testing.assert_close(got_compiled, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("block", [0, 2], ids=["unstructured", "block2"])
def test_opcheck_schema_fake_and_autograd_registrations(block) -> None:
    shape, weight, bias, x, values, indices = _op_inputs(False, block or None)
    torch.library.opcheck(torch.ops.peft_sparse.linear.default, (x, weight, bias, values, indices, block, 0.5, False))
    torch.library.opcheck(
        torch.ops.peft_sparse.delta.default, (x, values, indices, block, shape[0], shape[1], 0.5, False)
    )


def test_values_without_grad_skip_the_value_gradient() -> None:
    shape, weight, bias, x, values, indices = _op_inputs(False, None)
    values.requires_grad_(False)
    out = torch.compile(lambda x: sparse_linear(x, weight, bias, values, indices), backend="aot_eager")(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x)
    want = torch.autograd.grad(sparse_linear_reference(x, weight, bias, values, indices).sum(), x)[0]
    torch.testing.assert_close(grad_x, want)


# --- a training loop on a tiny Llama, against LoRA on the same model --------------------------------------------
def _train_and_swap(config_fn, backend: CompileCounterWithBackend) -> dict[str, int]:
    """3 compiled training steps then ``set_adapter`` to a second adapter and one more step; dynamo's counts."""
    model = get_peft_model(tiny_llama(), config_fn())
    model.add_adapter("other", config_fn())
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    frames = []
    for batch in lm_batches(3):
        compiled(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        frames.append(backend.frame_count)
    model.set_adapter("other")
    compiled(**lm_batches(1)[0]).loss.backward()
    return {
        "graph_breaks": sum(counters["graph_break"].values()),
        "graphs_step1": frames[0],
        "graphs_step3": frames[-1],
        "graphs_after_swap": backend.frame_count,
    }


@pytest.mark.parametrize("block_size", [None, 4], ids=["unstructured", "block4"])
def test_training_compiles_like_lora(block_size) -> None:
    targets = ["q_proj", "v_proj"]
    lora = _train_and_swap(lambda: LoraConfig(r=2, target_modules=targets), CompileCounterWithBackend("aot_eager"))
    torch._dynamo.reset()
    counters.clear()
    sparse = _train_and_swap(
        lambda: SparseAdapterConfig(target_modules=targets, keep_ratio=0.1, block_size=block_size),
        CompileCounterWithBackend("aot_eager"),
    )
    assert sparse["graph_breaks"] == 0 == lora["graph_breaks"], (sparse, lora)
    assert sparse["graphs_step3"] == sparse["graphs_step1"], f"recompiled between training steps: {sparse}"
    assert sparse["graphs_after_swap"] - sparse["graphs_step3"] <= 1, f"set_adapter added >1 graph: {sparse}"
    assert sparse["graphs_after_swap"] <= lora["graphs_after_swap"], (sparse, lora)


@pytest.mark.parametrize("block_size", [None, 4], ids=["unstructured", "block4"])
def test_compiled_training_step_matches_eager(block_size) -> None:
    config = SparseAdapterConfig(
        target_modules=["q_proj", "v_proj", "down_proj"], keep_ratio=0.1, block_size=block_size
    )
    models = []
    for _ in range(2):
        model = get_peft_model(tiny_llama(), config)
        set_random_values(model, seed=3)
        models.append(model)
    eager, to_compile = models
    compiled = torch.compile(to_compile, backend="aot_eager")
    batch = lm_batches(1)[0]
    losses = []
    for run in (eager, compiled):
        loss = run(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    eager_layers, compiled_layers = sparse_layers(eager), sparse_layers(to_compile)
    for name, layer in eager_layers.items():
        want = layer.sparse_adapter_values["default"].grad
        got = compiled_layers[name].sparse_adapter_values["default"].grad
        assert want is not None and want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


# --- validation happens when state is set, not in the forward -------------------------------------------------
def test_bad_mask_is_refused_when_set_and_changes_nothing() -> None:
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"], keep_ratio=0.1))
    layer = next(iter(sparse_layers(model).values()))
    before = layer.sparse_adapter_indices["default"].clone()
    values = layer.sparse_adapter_values["default"]
    with torch.no_grad():
        values.fill_(0.5)
    bad = before.flip(0).contiguous()
    with pytest.raises(ValueError, match=r"q_proj.*sorted"):
        layer.set_mask("default", bad)
    assert torch.equal(layer.sparse_adapter_indices["default"], before)
    assert torch.equal(values, torch.full_like(values, 0.5))


@pytest.mark.parametrize("how", ["unsorted", "out_of_range", "values_count"])
def test_load_state_dict_with_corrupt_state_is_refused_before_the_layer_changes(how) -> None:
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"], keep_ratio=0.1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = {k: v.clone() for k, v in state.items() if "sparse_adapter" in k}
    key = next(k for k in state if k.endswith("layers.1.self_attn.q_proj.sparse_adapter_indices.default"))
    if how == "unsorted":
        state[key] = state[key].flip(0).contiguous()
    elif how == "out_of_range":
        state[key][-1] = 10**6
    else:
        value_key = key.replace("indices", "values")
        state[value_key] = torch.cat([state[value_key], torch.ones(1)])
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.q_proj"):
        model.load_state_dict(state)
    after = model.state_dict()
    for k in before:
        if "layers.1." in k:
            assert torch.equal(after[k], before[k]), k


def test_compiled_forward_has_no_validation_guards() -> None:
    """Writing new (valid) values between steps must not recompile: the forward reads no id()/_version cache."""
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj", "v_proj"], keep_ratio=0.1))
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    batch = lm_batches(1)[0]
    with torch.no_grad():
        compiled(**batch)
        first = backend.frame_count
        for layer in sparse_layers(model).values():
            indices = layer.sparse_adapter_indices["default"]
            layer.set_mask("default", indices.clone())  # same mask, new tensor object
            layer.sparse_adapter_values["default"].add_(0.01)  # in-place write: bumps _version
        compiled(**batch)
    assert backend.frame_count == first


@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++")), reason="inductor needs a C++ compiler")
def test_inductor_training_step_matches_eager() -> None:
    """The default backend (inductor) runs the custom ops as extern kernels: loss and value grads match eager."""
    config = SparseAdapterConfig(target_modules=["q_proj", "down_proj"], keep_ratio=0.1)
    eager, compiled = (get_peft_model(tiny_llama(), config) for _ in range(2))
    for model in (eager, compiled):
        set_random_values(model, seed=4)
    batch = lm_batches(1)[0]
    want = eager(**batch).loss
    want.backward()
    got = torch.compile(compiled)(**batch).loss
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for name, layer in sparse_layers(eager).items():
        torch.testing.assert_close(
            sparse_layers(compiled)[name].sparse_adapter_values["default"].grad,
            layer.sparse_adapter_values["default"].grad,
            rtol=1e-5,
            atol=1e-7,
        )
