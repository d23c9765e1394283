"""Sparse adapters through transformers' own PEFT integration (model.add_adapter / load_adapter / set_adapter)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers
from conftest import dense_delta, lm_batches, set_random_values, sparse_layers, tiny_llama
from packaging.version import Version
from peft import PeftModel

from peft_sparse import SparseAdapterConfig

IDS = lm_batches(1, seed=3)[0]["input_ids"]


def adapter_api_needs_newer_peft(transformers_version: str, peft_version: str) -> bool:
    """transformers >= 5.24 (its pre-releases too) refuses its own adapter API with peft < 0.22 (compared like
    transformers' ``check_peft_version``, so a 0.22 dev build is still too old)."""
    transformers_release = Version(Version(transformers_version).base_version)
    return transformers_release >= Version("5.24") and Version(peft_version) < Version("0.22")


requires_adapter_api = pytest.mark.skipif(
    adapter_api_needs_newer_peft(transformers.__version__, peft.__version__),
    reason=f"transformers {transformers.__version__} requires peft >= 0.22 for add_adapter/load_adapter "
    f"(installed: peft {peft.__version__}); PEFT's own API is tested elsewhere",
)


@pytest.mark.parametrize(
    ("transformers_version", "peft_version", "skipped"),
    [
        ("5.23.0", "0.21.2", False),  # the pinned versions (constraints.txt)
        ("4.57.1", "0.21.2", False),
        ("5.24.0", "0.21.2", True),
        ("5.24.0.dev0", "0.21.2", True),
        ("5.30.1", "0.21.9", True),
        ("5.24.0", "0.22.0.dev0", True),
        ("5.24.0", "0.22.0", False),
        ("6.0.0", "0.23.1", False),
    ],
)
def test_adapter_api_tests_skip_exactly_on_transformers_5_24_with_peft_before_0_22(
    transformers_version: str, peft_version: str, skipped: bool
) -> None:
    assert adapter_api_needs_newer_peft(transformers_version, peft_version) is skipped


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def dense_reference_logits(adapted, adapter: str) -> torch.Tensor:
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(adapted).items():
            if adapter in layer.sparse_adapter_values:
                modules[name].weight += dense_delta(layer, adapter)
    return logits(reference)


@requires_adapter_api
def test_add_save_load_set_and_delete_adapters(tmp_path):
    base_logits = logits(tiny_llama())
    model = tiny_llama()
    model.add_adapter(SparseAdapterConfig(target_modules=["q_proj", "v_proj"], mask_init="random", seed=0), "a")
    model.add_adapter(SparseAdapterConfig(target_modules=["o_proj"], block_size=4, keep_ratio=0.1), "b")
    set_random_values(model, std=0.3)
    assert set(sparse_layers(model)) == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj", "o_proj")
    }
    assert model.active_adapters() == ["b"]  # transformers activates the adapter it just added
    torch.testing.assert_close(logits(model), dense_reference_logits(model, "b"), rtol=1e-5, atol=1e-5)
    model.set_adapter("a")
    assert model.active_adapters() == ["a"]
    torch.testing.assert_close(logits(model), dense_reference_logits(model, "a"), rtol=1e-5, atol=1e-5)
    model.disable_adapters()
    assert torch.equal(logits(model), base_logits)
    model.enable_adapters()

    # save: transformers writes the PEFT format of the active adapter
    model.set_adapter("a")
    expected_a = logits(model)
    model.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "SPARSE_ADAPTER" and "import peft_sparse" in config["requires"]
    assert "import peft_sparse" in (tmp_path / "a" / "README.md").read_text()

    # load into a plain model, by transformers and by PEFT
    fresh = tiny_llama()
    fresh.load_adapter(str(tmp_path / "a"), adapter_name="a")
    fresh.set_adapter("a")
    assert torch.equal(logits(fresh), expected_a)
    for name, layer in sparse_layers(fresh).items():
        assert torch.equal(layer.sparse_adapter_indices["a"], sparse_layers(model)[name].sparse_adapter_indices["a"])
    assert torch.equal(logits(PeftModel.from_pretrained(tiny_llama(), tmp_path / "a")), expected_a)

    # delete: the adapter's state leaves every layer
    model.delete_adapter("a")
    assert set(model.peft_config) == {"b"}
    model.set_adapter("b")
    for layer in sparse_layers(model).values():
        assert "a" not in layer.sparse_adapter_values and "a" not in layer.sparse_adapter_indices
    assert not any(key.endswith(".a") for key in model.state_dict())
    torch.testing.assert_close(logits(model), dense_reference_logits(model, "b"), rtol=1e-5, atol=1e-5)


@requires_adapter_api
def test_transformers_load_adapter_refuses_a_corrupt_checkpoint(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    model.add_adapter(SparseAdapterConfig(target_modules=["q_proj"]), "a")
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("layers.1.self_attn.q_proj.sparse_adapter_indices"))
    tensors[key] = tensors[key].flip(0).contiguous()
    save_file(tensors, path)
    # transformers 5 loads adapter weights with its own loader (PEFT's load hooks are not called), so the
    # corrupt mask is refused at the first forward pass, naming the module
    fresh = tiny_llama()
    fresh.load_adapter(str(tmp_path), adapter_name="a")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*sorted"):
        fresh(input_ids=IDS)


@requires_adapter_api
def test_training_through_the_transformers_integration_touches_only_adapter_values():
    model = tiny_llama()
    model.add_adapter(SparseAdapterConfig(target_modules=["q_proj", "down_proj"], keep_ratio=0.05), "a")
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("sparse_adapter_values.a" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for batch in lm_batches(2):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in before:
            assert torch.equal(p.detach(), before[name]), name
