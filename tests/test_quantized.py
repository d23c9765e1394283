"""Sparse adapters on quantized bases: bitsandbytes 4-bit / 8-bit and torchao int8 weight-only, on CPU.

Every check is against a dense reference built here from the dequantized base weights (bitsandbytes' and
torchao's own dequantization, int8 scaling written out), never from the tuner's code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_is_top_k, lm_batches, set_random_values, sparse_layers, tiny_llama
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM, TorchAoConfig

from peft_sparse import SparseAdapterConfig, calibrate_masks
from peft_sparse.quantized import UnsupportedQuantizationError

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
_convert_weight_packed_for_cpu_inverse = bnb.functional._convert_weight_packed_for_cpu_inverse
torchao_quantization = pytest.importorskip("torchao.quantization", reason="torchao is not installed")

TESTS = Path(__file__).parent
KINDS = ["bnb4", "bnb4_fp4_double", "bnb8", "torchao", "torchao_direct"]
TARGETS = ["q_proj", "k_proj", "up_proj"]  # square, wide (32x64) and tall (128x64) weights
IDS = lm_batches(1, seed=5)[0]["input_ids"]
Q0, K0, UP1 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.1.mlp.up_proj"
# Bound on the requantization error of a merge, as a fraction of the weight's largest magnitude: half the widest
# gap between adjacent codes (NF4: -1 and -0.6962; FP4: 0.6667 and 1; int8: 1/127), plus 2 % slack (double
# quantization stores absmax itself in 8 bits).
MERGE_BOUND = {
    "bnb4": 0.3038 / 2 * 1.02,
    "bnb4_fp4_double": 0.3333 / 2 * 1.02,
    "bnb8": 1 / 254 * 1.02,
    "torchao": 1 / 254 * 1.02,
    "torchao_direct": 1 / 254 * 1.02,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama saved to disk, to be loaded quantized (as users do with from_pretrained)."""
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(hidden=64, intermediate=128).save_pretrained(path)  # bnb CPU 4-bit needs 64-wide blocks
    return path


def load_quantized(kind: str, path: Path, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    configs = {
        "bnb4": lambda: BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype
        ),
        "bnb4_fp4_double": lambda: BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="fp4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        ),
        "bnb8": lambda: BitsAndBytesConfig(load_in_8bit=True),
        "torchao": lambda: TorchAoConfig(torchao_quantization.Int8WeightOnlyConfig()),
    }
    if kind == "torchao_direct":  # quantize_ on a loaded model: no transformers quantizer records the config
        model = LlamaForCausalLM.from_pretrained(path, dtype=compute_dtype)
        torchao_quantization.quantize_(model, torchao_quantization.Int8WeightOnlyConfig())
        return model.eval()
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=configs[kind](), device_map="cpu", dtype=compute_dtype
    )
    return model.eval()


def adapted(kind: str, path: Path, **config) -> nn.Module:
    config.setdefault("target_modules", TARGETS)
    config.setdefault("keep_ratio", 0.05)
    return get_peft_model(load_quantized(kind, path), SparseAdapterConfig(**config))


def dequantized(module: nn.Module) -> torch.Tensor:
    """The logical weight of a (possibly quantized) Linear, from the quantization library's own numbers."""
    weight = module.weight
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):  # bnb's CPU inference layout, if ever repacked
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        out = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    elif type(weight).__name__ == "Int8Params":  # row-wise absmax scaling: W = q * absmax / 127
        row_absmax = module.state.SCB if module.state.SCB is not None else weight.SCB
        out = weight.data.float() * row_absmax.float().view(-1, 1) / 127
    elif type(weight).__module__.startswith("torchao"):
        out = weight.dequantize()
    else:
        out = weight
    return out.detach().float().reshape(module.out_features, module.in_features).clone()


def scattered(layer, adapter: str = "default") -> torch.Tensor:
    """Dense ΔW (out, in) written entry by entry from the layer's indices and values (fp32)."""
    rows, cols = layer.out_features, layer.in_features
    delta = torch.zeros(rows * cols)
    values = layer.sparse_adapter_values[adapter].detach().float()
    block = layer.block_size[adapter]
    if block is None:
        delta[layer.sparse_adapter_indices[adapter].long()] = values
        return delta.view(rows, cols) * layer.scaling[adapter]
    delta = delta.view(rows, cols)
    grid_cols = -(-cols // block)
    for k, b in enumerate(layer.sparse_adapter_indices[adapter].tolist()):
        r0, c0 = (b // grid_cols) * block, (b % grid_cols) * block
        h, w = min(block, rows - r0), min(block, cols - c0)
        block_values = values[k * block * block : (k + 1) * block * block].view(block, block)
        delta[r0 : r0 + h, c0 : c0 + w] = block_values[:h, :w]
    return delta * layer.scaling[adapter]


def dense_reference(path: Path, quantized: nn.Module, with_deltas: bool = True) -> nn.Module:
    """The fp32 model whose every Linear is the dequantized quantized weight (+ its sparse delta)."""
    reference = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    modules = dict(reference.named_modules())
    root = quantized.base_model.model if isinstance(quantized, PeftModel) else quantized
    for name, module in root.named_modules():  # a tuner layer's ".base_layer" has no twin in the reference
        if isinstance(module, BaseTunerLayer):
            weight = dequantized(module.get_base_layer())
            if with_deltas:
                weight += sum((scattered(module, a) for a in module.active_adapters), torch.zeros_like(weight))
            modules[name].weight.data = weight
        elif isinstance(module, nn.Linear) and name in modules:
            modules[name].weight.data = dequantized(module)
    return reference


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def tolerance(kind: str) -> float:
    """Agreement of a base kernel with fp32 ``x @ dequant(W)ᵀ``: bitsandbytes' 8-bit matmul quantizes the
    activations to int8 too (LLM.int8()); the others dequantize and multiply in fp32."""
    return 1e-2 if kind == "bnb8" else 2e-4


# --- shapes and masks from the logical weight -------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_weight_shapes_and_magnitude_mask_use_the_logical_weight(model_dir, kind):
    model = adapted(kind, model_dir)
    config = model.peft_config["default"]
    assert config.weight_shapes[Q0] == [64, 64]
    assert config.weight_shapes[K0] == [32, 64]
    assert config.weight_shapes[UP1] == [128, 64]
    for name, layer in sparse_layers(model).items():
        assert layer.quantization_backend is not None
        scores = dequantized(layer.get_base_layer()).abs()
        assert_is_top_k(layer.sparse_adapter_indices["default"], scores, config.entries_pattern[name])
        assert layer.sparse_adapter_values["default"].dtype == torch.float32


@pytest.mark.parametrize("kind", ["bnb4", "bnb8", "torchao"])
@pytest.mark.parametrize("score_kind", ["gradient", "snip", "magnitude"])
def test_calibrated_masks_match_a_dense_dequantized_reference(model_dir, kind, score_kind):
    model = adapted(kind, model_dir, mask_init=score_kind if score_kind != "magnitude" else "snip")
    batches = lm_batches(2, seed=1)
    reference = dense_reference(model_dir, model, with_deltas=False)
    calibrate_masks(model, batches, score_kind=score_kind, progress=False)
    modules = dict(reference.named_modules())
    for p in reference.parameters():
        p.requires_grad_(False)
    for name in sparse_layers(model):
        modules[name].weight.requires_grad_(True)
    for batch in batches:
        reference(**batch).loss.backward()
    for name, layer in sparse_layers(model).items():
        weight = modules[name].weight
        scores = {
            "gradient": lambda w=weight: w.grad.abs(),
            "snip": lambda w=weight: (w.detach() * w.grad).abs(),
            "magnitude": lambda w=weight: w.detach().abs(),
        }[score_kind]()
        k = model.peft_config["default"].entries_pattern[name]
        # bitsandbytes' CPU kernels round (bf16 / fp16 activations), so its gradients differ slightly
        if kind.startswith("bnb") and score_kind != "magnitude":
            chosen = layer.sparse_adapter_indices["default"].long()
            top = torch.topk(scores.flatten(), k).indices
            overlap = len(set(chosen.tolist()) & set(top.tolist())) / k
            assert overlap > 0.9, f"{name}: only {overlap:.0%} of the dense top-k chosen"
        else:
            assert_is_top_k(layer.sparse_adapter_indices["default"], scores, k)
        assert not layer.sparse_adapter_values["default"].any()


def test_warmup_calibration_runs_on_a_quantized_base(model_dir):
    model = adapted("bnb4", model_dir, mask_init="warmup", warmup_steps=2)
    counts = calibrate_masks(model, lm_batches(2, seed=1), progress=False)
    for name, layer in sparse_layers(model).items():
        indices = layer.sparse_adapter_indices["default"]
        assert counts[name] == indices.numel() == model.peft_config["default"].entries_pattern[name]
        assert int(indices.max()) < layer.out_features * layer.in_features
        assert not layer.sparse_adapter_values["default"].any()


# --- forward -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("block_size", [None, 16])
def test_forward_matches_dense_dequantized_reference(model_dir, kind, block_size, monkeypatch):
    model = adapted(kind, model_dir, block_size=block_size, mask_init="random", seed=3)
    set_random_values(model, std=0.05)
    layers = sparse_layers(model)
    layer = layers[K0]
    x = torch.randn(3, 5, 64)
    # the adapter path must never dequantize the whole weight per step: the backend's dequantization is barred
    with monkeypatch.context() as patch:
        for each in layers.values():
            patch.setattr(each.quantization_backend, "get_base_weight", _no_dequantization)
        with torch.no_grad():
            actual = layer(x)
            base_output = layer.get_base_layer()(x)
            actual_logits = logits(model)
    delta = scattered(layer)
    # exactly base(x) + x ΔWᵀ, and the dense dequantized product up to the base kernel's own rounding
    torch.testing.assert_close(actual, base_output + x @ delta.T, atol=1e-5, rtol=1e-5)
    expected = x @ (dequantized(layer.get_base_layer()) + delta).T
    torch.testing.assert_close(actual, expected, atol=tolerance(kind), rtol=1e-3)
    reference = dense_reference(model_dir, model)
    torch.testing.assert_close(actual_logits, logits(reference), atol=5 * tolerance(kind), rtol=1e-3)
    with model.disable_adapter():
        base_only = logits(model)
    assert (base_only - logits(model)).abs().max() > 1e-3  # the delta is visible


def _no_dequantization(*args, **kwargs):
    raise AssertionError("the weight was dequantized in the forward")


def test_bf16_compute_dtype_output_keeps_the_base_dtype_and_fp32_values(model_dir):
    model = get_peft_model(
        load_quantized("bnb4", model_dir, compute_dtype=torch.bfloat16),
        SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05, mask_init="random"),
    )
    set_random_values(model, std=0.05)
    layer = sparse_layers(model)[Q0]
    assert layer.sparse_adapter_values["default"].dtype == torch.float32
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    base = layer.get_base_layer()(x)
    out = layer(x)
    assert out.dtype == base.dtype == torch.bfloat16
    expected = base.float() + x.float() @ scattered(layer).T
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=1e-2)


# --- training ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_training_step_gives_gradients_to_values_only(model_dir, kind):
    base = load_quantized(kind, model_dir)
    if kind.startswith("bnb"):
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    model = get_peft_model(base, SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05, init_weights=False))
    model.eval()
    logits(model)  # an eval forward first: bnb 4-bit repacks its weights for CPU inference
    model.train()
    layer = sparse_layers(model)[UP1]
    x = torch.randn(4, 64, requires_grad=True)
    r = torch.randn(4, 128)
    (layer(x) * r).sum().backward()
    # reference gradient of the values: autograd through a dense W + scatter(values) written here
    values = layer.sparse_adapter_values["default"].detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    delta = torch.zeros(128 * 64).index_put((layer.sparse_adapter_indices["default"].long(),), values).view(128, 64)
    (F.linear(x_ref, dequantized(layer.get_base_layer()) + delta) * r).sum().backward()
    torch.testing.assert_close(layer.sparse_adapter_values["default"].grad, values.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=10 * tolerance(kind), rtol=1e-3)

    model.zero_grad(set_to_none=True)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sparse_adapter_values" in n for n in trainable)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in trainable.items()}
    model(**lm_batches(1, seed=2)[0]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(trainable)
    # every layer's values get a gradient, also the first layer's q/k, whose only path runs through o_proj
    assert all(float(p.grad.abs().sum()) > 0 for p in trainable.values())
    optimizer.step()
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trainable.items())


@pytest.mark.parametrize("kind", ["bnb4", "torchao"])
def test_weighted_combination_of_two_adapters_on_a_quantized_base(model_dir, kind):
    model = adapted(kind, model_dir, mask_init="random", seed=1)
    model.add_adapter("second", SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05, mask_init="random"))
    set_random_values(model, std=0.05)
    model.add_weighted_adapter(["default", "second"], [0.5, 2.0], "combined", combination_type="linear")
    model.set_adapter("combined")
    layer = sparse_layers(model)[UP1]
    assert layer.sparse_adapter_indices["combined"].numel() > layer.sparse_adapter_indices["default"].numel()
    expected_delta = 0.5 * scattered(layer, "default") + 2.0 * scattered(layer, "second")
    torch.testing.assert_close(scattered(layer, "combined"), expected_delta)
    x = torch.randn(2, 64)
    with torch.no_grad():
        out = layer(x)
    expected = x @ (dequantized(layer.get_base_layer()) + expected_delta).T
    torch.testing.assert_close(out, expected, atol=tolerance(kind), rtol=1e-3)


# --- merging -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_merge_requantizes_the_exact_sum_and_matches_the_dense_reference(model_dir, kind):
    model = adapted(kind, model_dir, mask_init="random", seed=1)
    set_random_values(model, std=0.05)
    layers = sparse_layers(model)
    exact = {name: dequantized(layer.get_base_layer()) + scattered(layer) for name, layer in layers.items()}
    types = {name: (type(m.get_base_layer()), type(m.get_base_layer().weight)) for name, m in layers.items()}
    before = logits(model)
    merged = model.merge_and_unload()
    modules = dict(merged.named_modules())
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    for name, target in exact.items():
        module = modules[name]
        assert (type(module), type(module.weight)) == types[name]  # requantized into the same type
        error = (dequantized(module) - target).abs().max() / target.abs().max()
        assert error < MERGE_BOUND[kind], f"{name}: requantization error {error:.4f}"
    # the merged model is what the adapter computed, up to that rounding
    assert (logits(merged) - before).abs().max() < 0.05
    reference = dense_reference(model_dir, merged, with_deltas=False)
    torch.testing.assert_close(logits(merged), logits(reference), atol=10 * tolerance(kind), rtol=1e-3)


@pytest.mark.parametrize("kind", ["bnb4", "bnb8", "torchao"])
def test_merge_equals_quantizing_the_dense_sum_directly(model_dir, kind):
    """The merged weight is exactly what the quantization library makes of dequant(W) + ΔW."""
    model = adapted(kind, model_dir, target_modules=["q_proj"], mask_init="random", seed=2)
    set_random_values(model, std=0.05)
    layer = sparse_layers(model)[Q0]
    target = dequantized(layer.get_base_layer()) + scattered(layer)
    model.merge_adapter()
    merged = dequantized(layer.get_base_layer())
    fresh = load_quantized(kind, model_dir).model.layers[0].self_attn.q_proj
    if kind.startswith("bnb"):
        params = layer.get_base_layer().weight
        cls = type(params)
        kwargs = (
            {"quant_type": params.quant_type, "blocksize": params.blocksize, "compress_statistics": False}
            if kind == "bnb4"
            else {"has_fp16_weights": False}
        )
        fresh.weight = cls(target.clone(), requires_grad=False, **kwargs).to("cpu")
        if kind == "bnb8":
            fresh.state.SCB = None
    else:
        fresh.weight = nn.Parameter(target.clone(), requires_grad=False)
        torchao_quantization.quantize_(fresh, torchao_quantization.Int8WeightOnlyConfig())
    assert torch.equal(merged, dequantized(fresh))


def test_merging_two_adapters_rounds_once(model_dir):
    model = adapted("torchao", model_dir, target_modules=["q_proj"], mask_init="random", seed=2)
    model.add_adapter("second", SparseAdapterConfig(target_modules=["q_proj"], keep_ratio=0.05, mask_init="random"))
    set_random_values(model, std=0.05)
    layer = sparse_layers(model)[Q0]
    target = dequantized(layer.get_base_layer()) + scattered(layer, "default") + scattered(layer, "second")
    model.base_model.merge_adapter(["default", "second"])
    assert layer.merged_adapters == ["default", "second"]
    fresh = nn.Linear(64, 64, bias=False)
    fresh.weight = nn.Parameter(target.clone(), requires_grad=False)
    torchao_quantization.quantize_(fresh, torchao_quantization.Int8WeightOnlyConfig())
    assert torch.equal(dequantized(layer.get_base_layer()), dequantized(fresh))


@pytest.mark.parametrize("kind", ["bnb4", "bnb8", "torchao"])
def test_unmerge_returns_close_to_the_original_weight(model_dir, kind):
    model = adapted(kind, model_dir, mask_init="random", seed=4)
    set_random_values(model, std=0.05)
    layers = sparse_layers(model)
    original = {name: dequantized(layer.get_base_layer()) for name, layer in layers.items()}
    before = logits(model)
    model.merge_adapter()
    assert all(layer.merged for layer in layers.values())
    merged_max = {name: dequantized(layer.get_base_layer()).abs().max() for name, layer in layers.items()}
    model.unmerge_adapter()
    assert not any(layer.merged for layer in layers.values())
    for name, layer in layers.items():
        # two roundings: the merge's (at the merged weight's scale) and the unmerge's (at the restored one)
        error = (dequantized(layer.get_base_layer()) - original[name]).abs().max()
        assert error <= MERGE_BOUND[kind] * (merged_max[name] + original[name].abs().max())
        assert error > 0  # requantization does round: unmerge is not an exact inverse (documented)
    assert (logits(model) - before).abs().max() < 0.1


def test_safe_merge_refuses_non_finite_values_and_changes_nothing(model_dir):
    model = adapted("bnb4", model_dir, mask_init="random")
    layer = sparse_layers(model)[Q0]
    with torch.no_grad():
        layer.sparse_adapter_values["default"][0] = float("nan")
    packed = layer.get_base_layer().weight.data.clone()
    with pytest.raises(ValueError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight.data, packed)
    assert not layer.merged


# --- save / load --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bnb4", "bnb8", "torchao"])
def test_save_and_reload_in_a_fresh_process(model_dir, kind, tmp_path):
    model = adapted(kind, model_dir, mask_init="random", seed=5)
    set_random_values(model, std=0.05)
    adapter_dir = tmp_path / "adapter"
    model.save_pretrained(adapter_dir)
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert saved["weight_shapes"][K0] == [32, 64]
    expected = logits(model)
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(TESTS)!r})
        from pathlib import Path
        from peft import PeftModel
        from safetensors.torch import save_file
        from test_quantized import load_quantized, IDS
        model = PeftModel.from_pretrained(load_quantized({kind!r}, Path({str(model_dir)!r})), {str(adapter_dir)!r})
        with torch.no_grad():
            save_file({{"logits": model(input_ids=IDS).logits.float()}}, {str(tmp_path / "logits.safetensors")!r})
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    torch.testing.assert_close(load_file(tmp_path / "logits.safetensors")["logits"], expected, atol=1e-5, rtol=1e-5)


# --- refused quantizations ------------------------------------------------------------------------------------------
class GPTQLikeLinear(nn.Module):
    """Stands in for a GPTQ/AWQ ``QuantLinear`` (packed ``qweight``, not an nn.Linear), whose library isn't here."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(*x.shape[:-1], self.out_features)


def _float8(model):
    torchao_quantization.quantize_(model, torchao_quantization.Float8WeightOnlyConfig())


def _dynamic_int8_direct(model):
    torchao_quantization.quantize_(model, torchao_quantization.Int8DynamicActivationInt8WeightConfig())


def _gptq_like(model):
    model.model.layers[0].self_attn.q_proj = GPTQLikeLinear(64, 64)


def _bnb8_fp16_weights(model):
    old = model.model.layers[0].self_attn.q_proj
    layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=True)
    layer.weight = bnb.nn.Int8Params(old.weight.data.clone(), requires_grad=True, has_fp16_weights=True)
    model.model.layers[0].self_attn.q_proj = layer


@pytest.mark.parametrize(
    ("quantize", "named"),
    [
        (_float8, "Float8Tensor"),
        (_dynamic_int8_direct, "requantization config is unknown"),
        (_gptq_like, "GPTQLikeLinear"),
        (_bnb8_fp16_weights, "has_fp16_weights=True"),
    ],
)
def test_unsupported_quantization_is_refused_and_the_model_unchanged(model_dir, quantize, named):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    quantize(model)
    modules = [(name, type(m)) for name, m in model.named_modules()]
    with pytest.raises(UnsupportedQuantizationError, match=named) as info:
        get_peft_model(model, SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05))
    assert Q0 in str(info.value)
    assert [(name, type(m)) for name, m in model.named_modules()] == modules
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_excluding_the_unsupported_layer_lets_the_rest_train(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _gptq_like(model)
    peft_model = get_peft_model(
        model, SparseAdapterConfig(target_modules=TARGETS, exclude_modules=[Q0], keep_ratio=0.05)
    )
    assert Q0 not in peft_model.peft_config["default"].weight_shapes
    assert "model.layers.1.self_attn.q_proj" in peft_model.peft_config["default"].weight_shapes


def test_save_state_dict_has_only_adapter_tensors(model_dir, tmp_path):
    model = adapted("bnb4", model_dir)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors").keys()
    assert keys and all("sparse_adapter_" in k for k in keys)
