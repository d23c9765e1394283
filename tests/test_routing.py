"""Arrow routing over sparse experts, held to a plain dense reference router written here."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import peft
import pytest
import torch
from conftest import VOCAB, base_weights, dense_delta, set_random_values, sparse_layers, tiny_gpt2, tiny_llama
from peft import get_peft_model
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

from peft_sparse import ArrowConfig, SparseAdapterConfig, create_arrow_model, load_arrow_model, prototypes, routing
from peft_sparse.layer import SparseAdapterLayer

ROOT = Path(__file__).resolve().parents[1]
LLAMA_TARGETS = ["q_proj", "v_proj"]


def save_experts(tmp_path, make_model, count, targets, block_size=None, prefix="expert", seed=0, keep_ratio=0.2):
    """``count`` random sparse experts (random masks and values), saved as adapter directories."""
    dirs = []
    for i in range(count):
        config = SparseAdapterConfig(
            target_modules=targets, keep_ratio=keep_ratio, block_size=block_size, mask_init="random", seed=seed + i
        )
        model = get_peft_model(make_model(), config)
        set_random_values(model, seed=seed + i, std=0.3)
        path = tmp_path / f"{prefix}{i}"
        model.save_pretrained(str(path))
        dirs.append(str(path))
    return dirs


def ids(seed=0, batch=2, length=7):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the independent dense reference router ---------------------------------------------------------------------
def math_delta(layer: SparseAdapterLayer, name: str) -> torch.Tensor:
    """Dense ΔW as the map in -> out, shape (out, in), fp64."""
    delta = dense_delta(layer, name).double()
    return delta.T if isinstance(layer.get_base_layer(), Conv1D) else delta


def reference_delta(x: torch.Tensor, deltas: list[torch.Tensor], top_k: int, temperature: float) -> torch.Tensor:
    """Per token: |<x, v_e>| / T with v_e from torch.linalg.svd, explicit top-k, softmax, weighted dense sum."""
    protos = [torch.linalg.svd(d)[2][0] for d in deltas]
    tokens = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros(tokens.shape[0], deltas[0].shape[0], dtype=torch.float64)
    for t, token in enumerate(tokens):
        logits = [abs(float(token @ p)) / temperature for p in protos]
        top = sorted(range(len(deltas)), key=lambda e: -logits[e])[:top_k]
        exps = [math.exp(logits[e] - logits[top[0]]) for e in top]
        for e, weight in zip(top, exps, strict=True):
            out[t] += weight / sum(exps) * (deltas[e] @ token)
    return out.reshape(*x.shape[:-1], -1)


def reference_model(make_model, routed, names, top_k, temperature):
    """A fresh base model whose targeted modules add the dense reference routing to their output."""
    model = make_model()
    modules = dict(model.named_modules())
    for key, layer in sparse_layers(routed).items():
        deltas = [math_delta(layer, name) for name in names]

        def hook(module, args, output, deltas=deltas):
            return output + reference_delta(args[0], deltas, top_k, temperature).to(output.dtype)

        modules[key].register_forward_hook(hook)
    return model


# --- behaviour ---------------------------------------------------------------------------------------------------
def test_arrow_config_defaults_and_names_match_peft():
    ours, theirs = ArrowConfig(), peft.ArrowConfig()
    for field in ("top_k", "router_temperature", "use_gks", "rng_seed"):
        assert getattr(ours, field) == getattr(theirs, field), field


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"top_k": 0}, "top_k"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"router_temperature": 0.0}, "router_temperature"),
        ({"router_temperature": -1.0}, "router_temperature"),
        ({"router_temperature": float("nan")}, "router_temperature"),
        ({"rng_seed": "x"}, "rng_seed"),
        ({"prototype_tol": 0.0}, "prototype_tol"),
        ({"prototype_max_iter": 0}, "prototype_max_iter"),
    ],
)
def test_arrow_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        ArrowConfig(**bad)


@pytest.mark.parametrize("path", ["grouped", "stacked"])
@pytest.mark.parametrize(
    "make_model, targets, block_size",
    [(tiny_llama, LLAMA_TARGETS, None), (tiny_gpt2, ["c_attn"], 4), (tiny_llama, LLAMA_TARGETS, 4)],
    ids=["llama-unstructured", "gpt2-conv1d-blocks", "llama-blocks"],
)
def test_routed_model_matches_dense_reference_router(tmp_path, monkeypatch, make_model, targets, block_size, path):
    # both ways of computing the routed delta: tokens grouped per expert, or one product with all experts
    monkeypatch.setattr(routing, "STACKED_MAX_TOKENS", 0 if path == "grouped" else 10**6)
    dirs = save_experts(tmp_path, make_model, 4, targets, block_size)
    config = ArrowConfig(top_k=2, router_temperature=0.5, rng_seed=0)
    routed = create_arrow_model(make_model(), dirs, config)
    names = ["task_0", "task_1", "task_2", "task_3"]
    assert config.task_adapter_names == names and sorted(routed.active_adapters) == names
    reference = reference_model(make_model, routed, names, top_k=2, temperature=0.5)
    x = ids()
    with torch.no_grad():
        got = routed(input_ids=x).logits
        expected = reference(input_ids=x).logits
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())
    with torch.no_grad(), routed.disable_adapter():
        base = routed(input_ids=x).logits
    assert (got - base).abs().max() > 1e-2  # routing has a visible effect


def test_routed_layer_top_k_equal_to_experts_and_single_expert(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS)
    routed = create_arrow_model(tiny_llama(), dirs, ArrowConfig(top_k=3, router_temperature=2.0, rng_seed=1))
    layer = sparse_layers(routed)["model.layers.1.self_attn.v_proj"]
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        got = layer(x).double()
    deltas = [math_delta(layer, n) for n in ("task_0", "task_1", "task_2")]
    expected = layer.get_base_layer()(x).double() + reference_delta(x, deltas, 3, 2.0)
    assert torch.allclose(got, expected, atol=1e-5)
    # one expert active: that expert alone, plainly; all experts active again: routed again
    routed.set_adapter("task_1")
    with torch.no_grad():
        single = layer(x).double()
    plain = layer.get_base_layer()(x).double() + x.double() @ deltas[1].T
    assert torch.allclose(single, plain, atol=1e-5)
    routed.base_model.set_adapter(["task_0", "task_1", "task_2"])
    with torch.no_grad():
        assert torch.allclose(layer(x).double(), expected, atol=1e-5)


def test_stacked_experts_hold_every_expert_exactly():
    shape = (12, 20)
    generator = torch.Generator().manual_seed(0)
    matrices, dense = [], []
    for count in (30, 0, 55):
        positions = torch.randperm(240, generator=generator)[:count].sort().values
        values = torch.randn(count, generator=generator)
        matrices.append(prototypes.delta_csr(positions, values, shape, transposed=False))
        reference = torch.zeros(240)
        reference[positions] = values
        dense.append(reference.view(shape))
    stack = routing.stack_experts(matrices)
    assert torch.equal(stack.stacked.to_dense(), torch.cat(dense))
    for view, reference in zip(stack.experts, dense, strict=True):
        assert torch.equal(view.to_dense(), reference)
    tokens = torch.randn(40, 20, generator=generator)
    chosen, weights = routing.route_tokens(tokens, torch.randn(3, 20, generator=generator), 2, 0.5)
    expected = sum((chosen == e).float().mul(weights).sum(1, keepdim=True) * (tokens @ dense[e].T) for e in range(3))
    assert torch.allclose(routing.routed_delta(tokens, stack, chosen, weights), expected, atol=1e-5)


def read_dense_expert(path: str, layer: str, shape: tuple[int, int], conv1d: bool) -> torch.Tensor:
    """Dense (out, in) ΔW of one layer straight from a saved adapter's safetensors file."""
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    indices = tensors[f"base_model.model.{layer}.sparse_adapter_indices"].long()
    values = tensors[f"base_model.model.{layer}.sparse_adapter_values"].double()
    dense = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    dense[indices] = values
    dense = dense.view(shape)
    return dense.T if conv1d else dense


def test_gen_know_sub_subtracts_the_general_mean_exactly(tmp_path):
    tasks = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS, prefix="task")
    general = save_experts(tmp_path, tiny_llama, 2, LLAMA_TARGETS, prefix="general", seed=100)
    config = ArrowConfig(top_k=2, use_gks=True, rng_seed=0)
    routed = create_arrow_model(tiny_llama(), tasks, config, general_adapter_paths=general)
    names = ["task_0", "task_1", "task_2"]
    for key, layer in sparse_layers(routed).items():
        shape = tuple(layer.get_base_layer().weight.shape)
        mean = sum(read_dense_expert(g, key, shape, False) for g in general) / 2
        for name, path in zip(names, tasks, strict=True):
            expected = read_dense_expert(path, key, shape, False) - mean
            assert torch.allclose(math_delta(layer, name), expected, atol=1e-6), (key, name)
    reference = reference_model(tiny_llama, routed, names, top_k=2, temperature=1.0)
    x = ids(1)
    with torch.no_grad():
        assert torch.allclose(routed(input_ids=x).logits, reference(input_ids=x).logits, atol=1e-4)


def test_disable_adapter_gives_the_base_output_and_generate_matches_greedy_forward(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS)
    routed = create_arrow_model(tiny_llama(), dirs, ArrowConfig(top_k=1, rng_seed=0))
    x = ids(2, batch=1, length=5)
    with torch.no_grad():
        with routed.disable_adapter():
            disabled = routed(input_ids=x).logits
        base = tiny_llama()(input_ids=x).logits
        assert torch.equal(disabled, base)
        generated = routed.generate(input_ids=x, max_new_tokens=4, do_sample=False, pad_token_id=0)
        sequence = x
        for _ in range(4):  # greedy decoding without a cache, one full forward per token
            next_token = routed(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


RELOAD_SCRIPT = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[3])
from conftest import tiny_llama
from peft_sparse import load_arrow_model
model = load_arrow_model(tiny_llama(), sys.argv[1])
x = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    save_file({"logits": model(input_ids=x).logits.contiguous()}, sys.argv[2])
"""


@pytest.mark.parametrize("use_gks", [False, True], ids=["plain", "gks"])
def test_save_and_reload_in_a_fresh_process_gives_identical_outputs(tmp_path, use_gks):
    tasks = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS, prefix="task")
    general = save_experts(tmp_path, tiny_llama, 2, LLAMA_TARGETS, prefix="general", seed=50) if use_gks else None
    config = ArrowConfig(top_k=2, router_temperature=0.7, use_gks=use_gks)  # rng_seed None: saved prototypes
    routed = create_arrow_model(tiny_llama(), tasks, config, general_adapter_paths=general)
    out_dir = tmp_path / "routed"
    routed.save_pretrained(str(out_dir))
    record = json.loads((out_dir / "arrow_config.json").read_text())
    assert record["arrow_config"]["top_k"] == 2 and record["expert_names"] == ["task_0", "task_1", "task_2"]
    assert record["gks_applied"] is use_gks
    result_file = tmp_path / "logits.safetensors"
    command = [sys.executable, "-c", RELOAD_SCRIPT, str(out_dir), str(result_file), str(ROOT / "tests")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    with torch.no_grad():
        expected = routed(input_ids=ids()).logits
    assert torch.equal(load_file(str(result_file))["logits"], expected)


def test_merging_a_routed_model_is_refused_and_changes_nothing(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS)
    routed = create_arrow_model(tiny_llama(), dirs, ArrowConfig(top_k=2, rng_seed=0))
    x = ids()
    with torch.no_grad():
        before = routed(input_ids=x).logits
    weights = base_weights(routed)
    with pytest.raises(RuntimeError, match="cannot merge Arrow-routed experts"):
        routed.merge_and_unload()
    with pytest.raises(RuntimeError, match="cannot merge Arrow-routed experts"):
        routed.merge_adapter()
    with pytest.raises(RuntimeError, match="cannot merge Arrow-routed experts"):
        next(iter(sparse_layers(routed).values())).merge()
    assert all(not layer.merged for layer in sparse_layers(routed).values())
    after = base_weights(routed)
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    with torch.no_grad():
        assert torch.equal(routed(input_ids=x).logits, before)


class StandInLibrary:
    """Minimal ExpertLibrary stand-in: names -> adapter dirs, and a dict cache that records computations."""

    def __init__(self, experts: dict[str, str]):
        self.experts = experts
        self.store: dict[tuple, dict[str, torch.Tensor]] = {}
        self.computed = 0

    def __contains__(self, name):
        return name in self.experts

    def adapter_dir(self, name):
        return Path(self.experts[name])

    def cached(self, kind, names, params, compute):
        key = (kind, tuple(names), json.dumps(params, sort_keys=True))
        if key not in self.store:
            self.computed += 1
            self.store[key] = compute()
        return self.store[key]


def test_library_names_resolve_and_prototypes_are_cached(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS)
    library = StandInLibrary({"a": dirs[0], "b": dirs[1], "c": dirs[2]})
    config = ArrowConfig(top_k=2, rng_seed=3)
    first = create_arrow_model(tiny_llama(), ["a", "b", "c"], config, library=library)
    second = create_arrow_model(tiny_llama(), ["a", "b", "c"], ArrowConfig(top_k=2, rng_seed=3), library=library)
    by_path = create_arrow_model(tiny_llama(), dirs, ArrowConfig(top_k=2, rng_seed=3))
    assert library.computed == 1
    x = ids()
    with torch.no_grad():
        out = first(input_ids=x).logits
        assert torch.equal(second(input_ids=x).logits, out)
        assert torch.equal(by_path(input_ids=x).logits, out)
    with pytest.raises(ValueError, match="not a saved sparse adapter directory"):
        create_arrow_model(tiny_llama(), ["a", "zzz"], ArrowConfig(top_k=1), library=library)


# --- bad input: clear error, nothing changed ---------------------------------------------------------------------
def assert_untouched(model, weights):
    assert not any(isinstance(m, SparseAdapterLayer) for m in model.modules())
    after = {k: v for k, v in model.state_dict().items()}
    assert after.keys() == weights.keys()
    assert all(torch.equal(weights[k], after[k]) for k in weights)


def test_bad_experts_are_refused_and_the_base_model_is_untouched(tmp_path):
    plain = save_experts(tmp_path, tiny_llama, 2, LLAMA_TARGETS, prefix="plain")
    blocks = save_experts(tmp_path, tiny_llama, 1, LLAMA_TARGETS, block_size=4, prefix="blocks")
    only_q = save_experts(tmp_path, tiny_llama, 1, ["q_proj"], prefix="q")
    gpt2 = save_experts(tmp_path, tiny_gpt2, 1, ["c_attn"], prefix="gpt2")

    def wider_llama():
        model = tiny_llama()
        model.model.layers[0].self_attn.q_proj = torch.nn.Linear(32, 48, bias=False)
        return model

    wide = save_experts(tmp_path, wider_llama, 1, LLAMA_TARGETS, prefix="wide")
    cases = [
        ([], ArrowConfig(top_k=1), None, "at least one expert"),
        (plain, ArrowConfig(top_k=3), None, "top_k=3 exceeds the number of task experts"),
        (plain + blocks, ArrowConfig(top_k=1), None, "block_size differs"),
        (plain + only_q, ArrowConfig(top_k=1), None, "target layers differ"),
        (plain + wide, ArrowConfig(top_k=1), None, "weight_shapes"),
        (gpt2, ArrowConfig(top_k=1), None, "does not have"),
        (wide, ArrowConfig(top_k=1), None, "weight shape"),
        (plain, ArrowConfig(top_k=1, use_gks=True), None, "needs general_adapter_paths"),
        (plain, ArrowConfig(top_k=1, use_gks=True), blocks, "block_size differs"),
        (plain + [str(tmp_path)], ArrowConfig(top_k=1), None, "not a saved sparse adapter directory"),
    ]
    for paths, config, general, match in cases:
        base = tiny_llama()
        weights = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(ValueError, match=match):
            create_arrow_model(base, paths, config, general_adapter_paths=general)
        assert_untouched(base, weights)
        assert config.task_adapter_names is None


def test_a_base_model_with_adapters_is_refused(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 2, LLAMA_TARGETS)
    peft_model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already carries adapters"):
        create_arrow_model(peft_model, dirs, ArrowConfig(top_k=1))


def test_load_arrow_model_refuses_a_directory_without_router_files(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 1, LLAMA_TARGETS)
    base = tiny_llama()
    with pytest.raises(ValueError, match="not a saved Arrow model"):
        load_arrow_model(base, dirs[0])
    assert not any(isinstance(m, SparseAdapterLayer) for m in base.modules())


def test_with_the_real_expert_library(tmp_path, monkeypatch):
    library_module = pytest.importorskip("peft_sparse.library")  # ExpertLibrary is built on another branch
    dirs = save_experts(tmp_path, tiny_llama, 3, LLAMA_TARGETS)
    general = save_experts(tmp_path, tiny_llama, 1, LLAMA_TARGETS, prefix="general", seed=40)
    library = library_module.ExpertLibrary(tmp_path / "lib", create=True)
    for name, path in zip(["a", "b", "c", "g"], dirs + general, strict=True):
        library.add(path, name)

    def config():
        return ArrowConfig(top_k=2, use_gks=True, rng_seed=0)

    by_name = create_arrow_model(tiny_llama(), ["a", "b", "c"], config(), ["g"], library=library)
    cached = [p for p in (tmp_path / "lib").rglob("*.safetensors") if "arrow_prototypes" in p.parts]
    assert len(cached) == 1
    by_path = create_arrow_model(tiny_llama(), dirs, config(), general)

    def no_compute(*args, **kwargs):
        raise AssertionError("prototypes recomputed despite the cache")

    monkeypatch.setattr(routing, "compute_prototypes", no_compute)
    again = create_arrow_model(tiny_llama(), ["a", "b", "c"], config(), ["g"], library=library)
    x = ids()
    with torch.no_grad():
        out = by_name(input_ids=x).logits
        assert torch.equal(by_path(input_ids=x).logits, out)
        assert torch.equal(again(input_ids=x).logits, out)


def test_routing_on_a_bitsandbytes_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def llama64():  # bitsandbytes' CPU 4-bit kernels need 64-wide blocks
        return tiny_llama(hidden=64, intermediate=128)

    llama64().save_pretrained(tmp_path / "base")

    def quantized_llama():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        return AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=config, device_map="cpu", dtype=torch.float32
        ).eval()

    dirs = save_experts(tmp_path, llama64, 3, LLAMA_TARGETS)
    routed = create_arrow_model(quantized_llama(), dirs, ArrowConfig(top_k=2, rng_seed=0))
    seen = {}
    for key, layer in sparse_layers(routed).items():  # every routed layer against the dense reference router
        layer.register_forward_hook(lambda module, args, output, key=key: seen.__setitem__(key, (args[0], output)))
    with torch.no_grad():
        routed(input_ids=ids())
        for key, layer in sparse_layers(routed).items():
            x, output = seen[key]
            deltas = [read_dense_expert(d, key, tuple(layer.shape), False) for d in dirs]
            expected = layer.get_base_layer()(x).double() + reference_delta(x, deltas, 2, 1.0)
            assert torch.allclose(output.double(), expected, atol=1e-4), key
            assert (output.double() - layer.get_base_layer()(x).double()).abs().max() > 1e-2


def test_load_arrow_model_refuses_damaged_router_files(tmp_path):
    dirs = save_experts(tmp_path, tiny_llama, 2, LLAMA_TARGETS)
    routed = create_arrow_model(tiny_llama(), dirs, ArrowConfig(top_k=1, rng_seed=0))
    saved = tmp_path / "routed"
    routed.save_pretrained(str(saved))
    record_path = saved / "arrow_config.json"
    good = record_path.read_text()
    record = json.loads(good)
    record["arrow_config"]["top_k"] = 3
    damages = [
        (lambda: record_path.write_text(json.dumps(record)), "top_k=3 exceeds"),
        (lambda: record_path.write_text("{not json"), "not valid JSON"),
        (lambda: (saved / "arrow_prototypes.safetensors").write_bytes(b"garbage"), "cannot read prototypes"),
    ]
    for damage, match in damages:
        record_path.write_text(good)
        damage()
        base = tiny_llama()
        with pytest.raises(ValueError, match=match):
            load_arrow_model(base, saved)
        assert not any(isinstance(m, SparseAdapterLayer) for m in base.modules())
