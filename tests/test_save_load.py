"""save_pretrained / PeftModel.from_pretrained / load_adapter: format, fresh-process reload, corrupt checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, set_random_values, sparse_layers, tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from peft_sparse import SparseAdapterConfig, calibrate_masks

TESTS = Path(__file__).parent
IDS = lm_batches(1, seed=5)[0]["input_ids"]
Q0 = "model.layers.0.self_attn.q_proj"


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained_model(adapter_name: str = "default", **kwargs):
    kwargs.setdefault("target_modules", ["q_proj", "v_proj", "down_proj"])
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(**kwargs), adapter_name=adapter_name)
    set_random_values(model, std=0.3)
    return model


def global_calibrated_model():
    model = trained_model(mask_init="gradient", budget_scope="global")
    calibrate_masks(model, lm_batches(2), progress=False)
    set_random_values(model, std=0.3)
    counts = [layer.sparse_adapter_indices["default"].numel() for layer in sparse_layers(model).values()]
    assert len(set(counts)) > 1
    return model


def assert_same_adapter(a, b, adapter_a: str = "default", adapter_b: str = "default") -> None:
    layers_a, layers_b = sparse_layers(a), sparse_layers(b)
    assert layers_a.keys() == layers_b.keys()
    for name, layer in layers_a.items():
        other = layers_b[name]
        assert torch.equal(layer.sparse_adapter_indices[adapter_a], other.sparse_adapter_indices[adapter_b])
        assert torch.equal(
            layer.sparse_adapter_values[adapter_a].detach(), other.sparse_adapter_values[adapter_b].detach()
        )


# --- format ---------------------------------------------------------------------------------------------------
def test_saved_format(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = sparse_layers(model)
    expected = {f"base_model.model.{n}.sparse_adapter_{kind}" for n in layers for kind in ("values", "indices")}
    assert set(tensors) == expected
    for name, layer in layers.items():
        indices = tensors[f"base_model.model.{name}.sparse_adapter_indices"]
        values = tensors[f"base_model.model.{name}.sparse_adapter_values"]
        assert indices.dtype == torch.int32 and indices.dim() == values.dim() == 1
        assert torch.equal(indices, layer.sparse_adapter_indices["default"])
        assert torch.equal(values, layer.sparse_adapter_values["default"].detach())
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE_ADAPTER"
    assert config["entries_pattern"] == {
        n: layer.sparse_adapter_indices["default"].numel() for n, layer in layers.items()
    }
    assert config["weight_shapes"] == {n: list(layer.get_base_layer().weight.shape) for n, layer in layers.items()}
    assert "pip install peft-sparse" in config["requires"] and "import peft_sparse" in config["requires"]
    readme = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in readme  # PEFT's own model card is kept
    assert "pip install peft-sparse" in readme and "import peft_sparse" in readme


def test_several_adapters_save_to_subdirectories_each_with_the_install_note(tmp_path):
    model = trained_model()
    model.add_adapter("other", SparseAdapterConfig(target_modules=["q_proj"], mask_init="random"))
    model.save_pretrained(tmp_path)
    for directory in (tmp_path, tmp_path / "other"):
        assert (directory / "adapter_model.safetensors").exists()
        assert "import peft_sparse" in (directory / "README.md").read_text()
        assert "import peft_sparse" in json.loads((directory / "adapter_config.json").read_text())["requires"]


# --- round trips ----------------------------------------------------------------------------------------------
def test_fresh_process_reload_gives_identical_logits(tmp_path):
    """Also checks that registration from scratch survives a reload in a new interpreter."""
    model = global_calibrated_model()  # unequal per-module counts: must reload from the config alone
    model.save_pretrained(tmp_path / "adapter")
    expected = logits(model)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import importlib
        import torch
        import peft_sparse
        importlib.reload(peft_sparse)  # importing twice / reloading is harmless
        peft_sparse.registration.register()
        from peft import PeftModel, PeftType
        from conftest import tiny_llama
        from test_save_load import IDS
        assert PeftType._member_names_.count("SPARSE_ADAPTER") == 1
        model = PeftModel.from_pretrained(tiny_llama(), {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.save(model(input_ids=IDS).logits, {str(tmp_path / "logits.pt")!r})
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("block_size", [None, 3])
def test_from_pretrained_round_trip(tmp_path, low_cpu_mem_usage, block_size):
    model = trained_model(block_size=block_size, mask_init="random")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    assert_same_adapter(model, loaded)
    for layer in sparse_layers(loaded).values():
        assert layer.sparse_adapter_values["default"].device.type == "cpu"
        assert not layer.sparse_adapter_values["default"].requires_grad  # inference mode by default
    assert torch.equal(logits(loaded), logits(model))


def test_calibrated_mask_with_unequal_counts_reloads_from_config(tmp_path):
    model = global_calibrated_model()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    assert_same_adapter(model, loaded)
    assert torch.equal(logits(loaded), logits(model))
    assert all(layer.sparse_adapter_values["default"].requires_grad for layer in sparse_layers(loaded).values())


def test_modules_to_save_round_trip(tmp_path):
    model = trained_model(modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.5)
    model.save_pretrained(tmp_path)
    assert any("lm_head" in key for key in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert_same_adapter(model, loaded)
    assert torch.equal(logits(loaded), logits(model))


def test_conv1d_round_trip(tmp_path):
    model = get_peft_model(tiny_gpt2(), SparseAdapterConfig(target_modules=["c_attn", "c_fc"], block_size=4))
    set_random_values(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_gpt2(), tmp_path)
    assert_same_adapter(model, loaded)
    assert torch.equal(logits(loaded), logits(model))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_adapter_adds_a_second_adapter(tmp_path, low_cpu_mem_usage):
    source = trained_model(mask_init="random", seed=3)
    source.save_pretrained(tmp_path)
    model = trained_model(adapter_name="mine")
    mine = logits(model)
    model.load_adapter(tmp_path, adapter_name="loaded", low_cpu_mem_usage=low_cpu_mem_usage)
    assert model.active_adapters == ["mine"]
    assert torch.equal(logits(model), mine)
    model.set_adapter("loaded")
    assert_same_adapter(source, model, "default", "loaded")
    assert torch.equal(logits(model), logits(source))


# --- corrupt checkpoints --------------------------------------------------------------------------------------
def corrupt(tensors: dict[str, torch.Tensor], how: str) -> None:
    ikey = f"base_model.model.{Q0}.sparse_adapter_indices"
    vkey = f"base_model.model.{Q0}.sparse_adapter_values"
    indices = tensors[ikey].clone()
    if how == "out_of_range":
        indices[-1] = 32 * 32
    elif how == "negative":
        indices[0] = -1
    elif how == "unsorted":
        indices[[0, 1]] = indices[[1, 0]]
    elif how == "duplicated":
        indices[1] = indices[0]
    elif how == "fewer_entries":
        indices, tensors[vkey] = indices[:-1].clone(), tensors[vkey][:-1].clone()
    elif how == "values_count":
        tensors[vkey] = tensors[vkey][:-1].clone()
    elif how == "float_indices":
        indices = indices.float()
    elif how == "missing_indices":
        del tensors[ikey]
        return
    tensors[ikey] = indices


@pytest.mark.parametrize(
    "how",
    [
        "out_of_range",
        "negative",
        "unsorted",
        "duplicated",
        "fewer_entries",
        "values_count",
        "float_indices",
        "missing_indices",
    ],
)
def test_corrupt_checkpoints_are_refused_naming_the_module(tmp_path, how):
    trained_model(keep_ratio=0.05).save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    corrupt(tensors, how)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=Q0.replace(".", r"\.")):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
    # loading it as an extra adapter leaves the existing adapter working as before
    model = trained_model(adapter_name="mine")
    expected = logits(model)
    with pytest.raises(ValueError, match=Q0.replace(".", r"\.")):
        model.load_adapter(tmp_path, adapter_name="bad")
    assert model.active_adapters == ["mine"]
    assert torch.equal(logits(model), expected)


def test_checkpoint_for_other_weight_shapes_is_refused(tmp_path):
    trained_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["weight_shapes"][Q0] = [16, 32]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)
