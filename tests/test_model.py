"""Generic PEFT behaviours of the sparse tuner: names, multi-adapter trainability, merge bookkeeping, reporting."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_same_tensors, base_weights, lm_batches, set_random_values, sparse_layers, tiny_llama
from peft import PeftModel, get_peft_model

from peft_sparse import SparseAdapterConfig, SparseAdapterModel

TARGETS = ["q_proj", "v_proj"]


def config(**kwargs) -> SparseAdapterConfig:
    kwargs.setdefault("keep_ratio", 0.05)
    return SparseAdapterConfig(target_modules=TARGETS, **kwargs)


def two_adapters():
    model = get_peft_model(tiny_llama(), config(mask_init="random", seed=0), adapter_name="first")
    model.add_adapter("second", config(mask_init="random", seed=1))
    set_random_values(model)
    return model


def trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_get_peft_model_builds_a_sparse_tuner():
    model = get_peft_model(tiny_llama(), config())
    assert isinstance(model, PeftModel) and isinstance(model.base_model, SparseAdapterModel)
    assert set(sparse_layers(model)) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in TARGETS}


def test_adapter_name_appears_in_parameter_and_buffer_names():
    model = get_peft_model(tiny_llama(), config(), adapter_name="my_task")
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    layer = "base_model.model.model.layers.0.self_attn.q_proj"
    assert f"{layer}.sparse_adapter_values.my_task" in names
    assert f"{layer}.sparse_adapter_indices.my_task" in names
    assert trainable(model) == {n for n in names if n.endswith("sparse_adapter_values.my_task")}


@pytest.mark.parametrize("name", ["values", "copy", "get", "to", "train", "forward"])
def test_names_clashing_with_container_attributes_are_refused(name):
    with pytest.raises(ValueError, match="clashes"):
        get_peft_model(tiny_llama(), config(), adapter_name=name)
    model = two_adapters()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="clashes"):
        model.add_adapter(name, config())
    assert set(model.peft_config) == {"first", "second"}
    assert set(model.state_dict()) == set(before)
    assert all(name not in layer.block_size for layer in sparse_layers(model).values())
    with pytest.raises(ValueError, match="clashes"):
        model.add_weighted_adapter(["first", "second"], [1.0, 1.0], name)
    assert set(model.peft_config) == {"first", "second"}


def test_only_the_active_adapter_is_trainable():
    model = two_adapters()
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.endswith("sparse_adapter_values.first")}
    model.set_adapter("second")
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.endswith("sparse_adapter_values.second")}
    model.set_adapter("first", inference_mode=True)
    assert trainable(model) == set()
    model.base_model.set_adapter(["first", "second"])
    assert trainable(model) == {n for n, _ in model.named_parameters() if "sparse_adapter_values" in n}
    assert all(not p.requires_grad for n, p in model.named_parameters() if "sparse_adapter" not in n)


def test_adding_an_adapter_keeps_the_existing_trainability():
    model = get_peft_model(tiny_llama(), config(), adapter_name="first")
    before = trainable(model)
    model.add_adapter("second", config())
    assert trainable(model) == before


def test_print_trainable_parameters_is_consistent(capsys):
    model = get_peft_model(tiny_llama(), config(num_params=300))
    expected_trainable = 300
    total = sum(p.numel() for p in model.parameters())
    assert model.get_nb_trainable_parameters() == (expected_trainable, total)
    model.print_trainable_parameters()
    out = capsys.readouterr().out
    assert f"trainable params: {expected_trainable:,}" in out
    assert f"all params: {total:,}" in out
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected_trainable


def test_merge_twice_warns_and_does_not_add_twice():
    model = two_adapters()
    model.merge_adapter()
    merged = base_weights(model)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()
    assert_same_tensors(base_weights(model), merged)


def test_unmerge_when_not_merged_warns():
    model = two_adapters()
    with pytest.warns(UserWarning, match="unmerged"):
        model.unmerge_adapter()


def test_merged_adapter_cannot_be_deleted():
    model = two_adapters()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        model.delete_adapter("first")
    assert set(model.peft_config) == {"first", "second"}
    model.unmerge_adapter()
    model.delete_adapter("first")
    assert set(model.peft_config) == {"second"}


def test_disabled_model_output_equals_the_base_model():
    base = tiny_llama()
    ids = lm_batches(1)[0]["input_ids"]
    expected = base(input_ids=ids).logits
    model = two_adapters()
    assert not torch.allclose(model(input_ids=ids).logits, expected)
    with model.disable_adapter():
        assert torch.equal(model(input_ids=ids).logits, expected)
        assert trainable(model) == set()
    assert trainable(model) == {n for n, _ in model.named_parameters() if n.endswith("sparse_adapter_values.first")}


def test_disable_adapter_while_merged_unmerges_first():
    base = tiny_llama()
    ids = lm_batches(1)[0]["input_ids"]
    expected = base(input_ids=ids).logits
    model = two_adapters()
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_add_adapter_errors_leave_the_model_unchanged():
    model = two_adapters()
    keys_before = set(model.state_dict())
    with pytest.raises(ValueError):
        model.add_adapter("third", SparseAdapterConfig(target_modules=["missing"]))
    assert set(model.peft_config) == {"first", "second"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert set(model.state_dict()) == keys_before
    assert all("third" not in layer.sparse_adapter_values for layer in sparse_layers(model).values())


def test_entries_pattern_and_weight_shapes_are_recorded():
    model = get_peft_model(tiny_llama(), config(lora_rank=1))
    cfg = model.peft_config["default"]
    for name, layer in sparse_layers(model).items():
        rows, cols = layer.get_base_layer().weight.shape
        assert cfg.entries_pattern[name] == rows + cols
        assert cfg.weight_shapes[name] == [rows, cols]
