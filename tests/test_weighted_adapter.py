"""peft_model.add_weighted_adapter end to end: dense references, save/reload, merge_and_unload, error cases."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import dense_delta, lm_batches, set_random_values, sparse_layers, tiny_llama
from peft import PeftModel, get_peft_model

from peft_sparse import SparseAdapterConfig

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = lm_batches(1, seed=9)[0]["input_ids"]


def experts(block_size: int | None = None, names=("a", "b", "c")):
    """Three adapters with overlapping random masks of different sizes and random values."""
    model = None
    for i, name in enumerate(names):
        config = SparseAdapterConfig(
            target_modules=TARGETS, mask_init="random", seed=i, keep_ratio=0.1 + 0.1 * i, block_size=block_size
        )
        if model is None:
            model = get_peft_model(tiny_llama(), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for i, name in enumerate(names):
        set_random_values(model, name, seed=20 + i, std=0.2)
    return model


def presence(layer, adapter: str) -> torch.Tensor:
    """Dense bool map of the weight entries an adapter stores (blocks cut at the weight's edge)."""
    rows, cols = layer.get_base_layer().weight.shape
    present = torch.zeros(rows, cols, dtype=torch.bool)
    block = layer.block_size[adapter]
    for b in layer.sparse_adapter_indices[adapter].tolist():
        if block is None:
            present[b // cols, b % cols] = True
        else:
            grid_cols = math.ceil(cols / block)
            r0, c0 = (b // grid_cols) * block, (b % grid_cols) * block
            present[r0 : r0 + block, c0 : c0 + block] = True
    return present


def reference_merge(layer, adapters, weights, combination_type: str) -> torch.Tensor:
    total = sum(w * dense_delta(layer, a) for a, w in zip(adapters, weights, strict=True))
    if combination_type == "linear":
        return total
    denominator = sum(w * presence(layer, a).float() for a, w in zip(adapters, weights, strict=True))
    return torch.where(denominator != 0, total / torch.where(denominator != 0, denominator, 1.0), 0.0)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def snapshot(model) -> tuple[list[str], dict[str, torch.Tensor], dict[str, bool]]:
    return (
        sorted(model.peft_config),
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
    )


@pytest.mark.parametrize("block_size", [None, 3])
@pytest.mark.parametrize(
    ("combination_type", "weights"), [("linear", [0.7, 1.3, -0.4]), ("sparse_average", [1.0, 2.0, 0.5])]
)
def test_merge_matches_the_dense_reference(combination_type, weights, block_size, tmp_path):
    model = experts(block_size)
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    adapters = ["a", "b", "c"]
    model.add_weighted_adapter(adapters, weights, "merged", combination_type=combination_type)
    assert model.active_adapters == ["a"]
    assert {n: p.requires_grad for n, p in model.named_parameters() if n in trainable_before} == trainable_before
    counts = {}
    for name, layer in sparse_layers(model).items():
        union = sorted(set().union(*(layer.sparse_adapter_indices[a].tolist() for a in adapters)))
        assert layer.sparse_adapter_indices["merged"].tolist() == union
        assert layer.sparse_adapter_indices["merged"].dtype == torch.int32
        torch.testing.assert_close(
            dense_delta(layer, "merged"),
            reference_merge(layer, adapters, weights, combination_type),
            rtol=1e-5,
            atol=1e-6,
        )
        counts[name] = len(union)
    assert model.peft_config["merged"].entries_pattern == counts
    assert len(set(counts.values())) > 1  # unequal per-module counts

    # forward with the merged adapter equals the dense merged model
    model.set_adapter("merged")
    reference = tiny_llama()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(model).items():
            modules[name].weight += reference_merge(layer, adapters, weights, combination_type)
    expected = logits(reference)
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

    # save the merged adapter alone, reload it from its config, then merge it into the base
    model.save_pretrained(tmp_path, selected_adapters=["merged"])
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "merged", adapter_name="merged")
    assert torch.equal(logits(loaded), logits(model))
    merged_base = loaded.merge_and_unload()
    merged_modules = dict(merged_base.named_modules())
    for name, module in modules.items():
        if hasattr(module, "weight") and isinstance(module.weight, torch.Tensor):
            torch.testing.assert_close(merged_modules[name].weight, module.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(merged_base), expected, rtol=1e-5, atol=1e-5)


def test_drop_zeros_and_weight_one_reproduces_a_single_expert():
    model = experts(names=("a", "b"))
    model.add_weighted_adapter(["a"], [1.0], "single", combination_type="linear")
    for layer in sparse_layers(model).values():
        assert torch.equal(layer.sparse_adapter_indices["single"], layer.sparse_adapter_indices["a"])
        assert torch.equal(layer.sparse_adapter_values["single"].detach(), layer.sparse_adapter_values["a"].detach())
    model.add_weighted_adapter(["a", "b"], [1.0, 0.0], "dropped", combination_type="linear", drop_zeros=True)
    for layer in sparse_layers(model).values():
        assert torch.equal(layer.sparse_adapter_indices["dropped"], layer.sparse_adapter_indices["a"])


def test_other_combination_types_run_and_stay_on_the_union():
    model = experts()
    for kind in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        model.add_weighted_adapter(["a", "b", "c"], [1.0, 1.0, 1.0], kind, combination_type=kind, density=0.5)
        for layer in sparse_layers(model).values():
            union = set().union(*(layer.sparse_adapter_indices[a].tolist() for a in "abc"))
            assert set(layer.sparse_adapter_indices[kind].tolist()) == union
            assert torch.isfinite(layer.sparse_adapter_values[kind]).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapters": ["a", "b"], "weights": [1.0, 1.0], "adapter_name": "a"}, "already exists"),
        ({"adapters": ["a", "zzz"], "weights": [1.0, 1.0]}, "unknown"),
        ({"adapters": [], "weights": []}, "empty"),
        ({"adapters": ["a", "b"], "weights": [1.0]}, "weights"),
        ({"adapters": ["a", "b"], "weights": [1.0, float("nan")]}, "finite"),
        ({"adapters": ["a", "b"], "weights": [float("inf"), 1.0]}, "finite"),
        ({"adapters": ["a", "blocks"], "weights": [1.0, 1.0]}, "block_size"),
        ({"adapters": ["a", "other_targets"], "weights": [1.0, 1.0]}, "target"),
        ({"adapters": ["a", "b"], "weights": [1.0, 1.0], "combination_type": "bogus"}, "combination_type"),
        ({"adapters": ["a", "b"], "weights": [1.0, 1.0], "combination_type": "ties"}, "density"),
        ({"adapters": ["a", "b"], "weights": [1.0, -1.0], "combination_type": "sparse_average"}, "sum to 0"),
    ],
)
def test_errors_change_nothing(kwargs, match):
    model = experts(names=("a", "b"))
    model.add_adapter("blocks", SparseAdapterConfig(target_modules=TARGETS, block_size=2))
    model.add_adapter("other_targets", SparseAdapterConfig(target_modules=["q_proj"]))
    before = snapshot(model)
    kwargs.setdefault("adapter_name", "new")
    with pytest.raises(ValueError, match=match):
        model.add_weighted_adapter(**kwargs)
    after = snapshot(model)
    assert after[0] == before[0]
    assert after[1].keys() == before[1].keys()
    assert all(torch.equal(after[1][k], before[1][k]) for k in before[1])
    assert after[2] == before[2]
    assert model.active_adapters == ["a"]
    assert all("new" not in layer.sparse_adapter_values for layer in sparse_layers(model).values())


def test_adapters_with_trainable_tokens_are_refused():
    """Trainable embedding rows (e.g. set by TRL's chat_template_path) are dense and cannot be index-merged."""
    model = experts(names=("a",))
    model.add_adapter("tokens", SparseAdapterConfig(target_modules=TARGETS, trainable_token_indices=[3, 4]))
    before = snapshot(model)
    with pytest.raises(ValueError, match="trainable_token_indices"):
        model.add_weighted_adapter(["a", "tokens"], [1.0, 1.0], "new")
    assert "new" not in model.peft_config and snapshot(model)[0] == before[0]
