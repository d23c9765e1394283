"""Mask choice: seeded random masks, magnitude top-k, deterministic ties, block selection by block sums."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import sparse_layers, tiny_gpt2, tiny_llama
from peft import get_peft_model

from peft_sparse import SparseAdapterConfig, masks


def reference_top_k(flat_scores: torch.Tensor, k: int) -> list[int]:
    """Top-k positions by a plain Python sort: larger score first, lower position on ties."""
    order = sorted(range(flat_scores.numel()), key=lambda i: (-float(flat_scores[i]), i))
    return sorted(order[:k])


def reference_block_sums(scores: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = scores.shape
    grid_rows, grid_cols = math.ceil(rows / block), math.ceil(cols / block)
    sums = torch.zeros(grid_rows * grid_cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            sums[(r // block) * grid_cols + c // block] += float(scores[r, c])
    return sums


def masks_of(model, adapter: str = "default") -> dict[str, torch.Tensor]:
    return {name: layer.sparse_adapter_indices[adapter].clone() for name, layer in sparse_layers(model).items()}


def random_config(seed: int | None, **kwargs) -> SparseAdapterConfig:
    return SparseAdapterConfig(target_modules=["q_proj", "up_proj"], mask_init="random", seed=seed, **kwargs)


# --- random masks ---------------------------------------------------------------------------------------------
def test_random_masks_are_deterministic_for_a_seed():
    first = masks_of(get_peft_model(tiny_llama(), random_config(3)))
    second = masks_of(get_peft_model(tiny_llama(seed=1), random_config(3)))  # other weights, same seed
    other = masks_of(get_peft_model(tiny_llama(), random_config(4)))
    assert first.keys() == second.keys() == other.keys()
    for name in first:
        assert torch.equal(first[name], second[name])
        assert not torch.equal(first[name], other[name])
    # layers of the same shape get different masks from one seed
    q0, q1 = first["model.layers.0.self_attn.q_proj"], first["model.layers.1.self_attn.q_proj"]
    assert not torch.equal(q0, q1)


def test_random_masks_are_sorted_distinct_int32_and_in_range():
    model = get_peft_model(tiny_llama(), random_config(0, keep_ratio=0.3))
    for layer in sparse_layers(model).values():
        indices = layer.sparse_adapter_indices["default"]
        assert indices.dtype == torch.int32
        assert bool((indices[1:] > indices[:-1]).all())
        assert 0 <= int(indices.min()) and int(indices.max()) < layer.get_base_layer().weight.numel()
        assert indices.numel() == round(0.3 * layer.get_base_layer().weight.numel())


def test_two_adapters_with_seed_none_get_different_masks_and_equal_seeds_share_one():
    model = get_peft_model(tiny_llama(), random_config(None), adapter_name="a")
    model.add_adapter("b", random_config(None))
    model.add_adapter("c", random_config(11))
    model.add_adapter("d", random_config(11))
    for layer in sparse_layers(model).values():
        idx = layer.sparse_adapter_indices
        assert not torch.equal(idx["a"], idx["b"])
        assert torch.equal(idx["c"], idx["d"])
    # seed=None is still reproducible: same adapter name, same mask
    again = get_peft_model(tiny_llama(), random_config(None), adapter_name="a")
    for name, indices in masks_of(again, "a").items():
        assert torch.equal(indices, sparse_layers(model)[name].sparse_adapter_indices["a"])


def test_random_block_masks_are_seeded():
    model = get_peft_model(tiny_llama(), random_config(5, block_size=4, keep_ratio=0.25))
    first = masks_of(model)
    second = masks_of(get_peft_model(tiny_llama(), random_config(5, block_size=4, keep_ratio=0.25)))
    for name, layer in sparse_layers(model).items():
        assert torch.equal(first[name], second[name])
        grid = layer.num_positions("default")  # 8 x 8 blocks for q_proj, 12 x 8 for up_proj
        assert grid == (64 if "q_proj" in name else 96)
        assert first[name].numel() == round(0.25 * grid) and int(first[name].max()) < grid


# --- magnitude ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_magnitude_mask_is_the_true_top_k(factory):
    target = ["q_proj", "down_proj"] if factory is tiny_llama else ["c_attn", "c_fc"]
    model = get_peft_model(factory(), SparseAdapterConfig(target_modules=target, keep_ratio=0.07))
    for layer in sparse_layers(model).values():
        weight = layer.get_base_layer().weight.detach()  # storage layout: (out, in) Linear, (in, out) Conv1D
        k = round(0.07 * weight.numel())
        expected = torch.sort(torch.argsort(weight.abs().flatten(), descending=True)[:k]).values
        assert torch.equal(layer.sparse_adapter_indices["default"].long(), expected)


def test_magnitude_ties_go_to_the_lower_position():
    model = tiny_llama(layers=1)
    with torch.no_grad():
        weight = model.model.layers[0].self_attn.q_proj.weight
        weight.fill_(0.5)
        weight[3, 7] = 2.0  # flat position 3 * 32 + 7
    peft_model = get_peft_model(model, SparseAdapterConfig(target_modules=["q_proj"], num_params=5))
    (layer,) = sparse_layers(peft_model).values()
    assert layer.sparse_adapter_indices["default"].tolist() == [0, 1, 2, 3, 3 * 32 + 7]


def test_top_k_indices_tie_breaking_is_deterministic():
    scores = torch.tensor([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0, 3.0])
    for k in range(scores.numel() + 1):
        assert masks.top_k_indices(scores, k).tolist() == reference_top_k(scores, k)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (300,), generator=generator).float()
    assert masks.top_k_indices(scores, 77).tolist() == reference_top_k(scores, 77)
    with pytest.raises(ValueError):
        masks.top_k_indices(scores, 301)


# --- blocks ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 8), (7, 10), (5, 3)])
def test_block_selection_uses_block_sums_with_ragged_edges(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    scores = torch.rand(shape, generator=generator)
    block = 3
    sums = reference_block_sums(scores, block)
    assert torch.allclose(masks.block_scores(scores, block).double(), sums)
    for k in range(1, sums.numel() + 1):
        assert masks.select(scores, k, block).tolist() == reference_top_k(sums, k)


def test_block_sum_beats_a_single_large_entry():
    scores = torch.zeros(4, 4)
    scores[0, 0] = 10.0  # block 0: one large entry, sum 10
    scores[2:, 2:] = 3.0  # block 3: four medium entries, sum 12
    assert masks.select(scores, 1, 2).tolist() == [3]


def test_magnitude_block_mask_in_a_model():
    model = tiny_llama(layers=1)
    peft_model = get_peft_model(model, SparseAdapterConfig(target_modules=["up_proj"], block_size=5, keep_ratio=0.2))
    (layer,) = sparse_layers(peft_model).values()
    weight = layer.get_base_layer().weight.detach()  # (48, 32): ragged 5x5 grid of 10 x 7 blocks
    rows = layer.sparse_adapter_indices["default"].numel()
    assert rows == round(0.2 * weight.numel() / 25)
    assert layer.sparse_adapter_indices["default"].tolist() == reference_top_k(
        reference_block_sums(weight.abs(), 5), rows
    )
    assert layer.sparse_adapter_values["default"].numel() == rows * 25


# --- pure helpers ---------------------------------------------------------------------------------------------
def test_split_budget_sums_exactly():
    sizes = {"a": 1000, "b": 333, "c": 7, "d": 1}
    for total in (0, 1, 5, 17, 999, 1341):
        counts = masks.split_budget(total, sizes)
        assert sum(counts.values()) == total
        assert all(abs(counts[n] - total * s / 1341) < 1 for n, s in sizes.items())
    with pytest.raises(ValueError):
        masks.split_budget(1342, sizes)


def test_select_global_picks_the_top_over_all_layers():
    generator = torch.Generator().manual_seed(1)
    scores = {"a": torch.rand(4, 5, generator=generator), "b": torch.rand(3, 3, generator=generator) * 2}
    chosen = masks.select_global(scores, 12, None)
    flat = torch.cat([scores["a"].flatten(), scores["b"].flatten()])
    expected = reference_top_k(flat, 12)
    assert chosen["a"].tolist() == [i for i in expected if i < 20]
    assert chosen["b"].tolist() == [i - 20 for i in expected if i >= 20]
    assert sum(c.numel() for c in chosen.values()) == 12


def test_index_dtype_and_check_indices():
    assert masks.index_dtype(2**31 - 1) == torch.int32
    assert masks.index_dtype(2**31) == torch.int64
    good = torch.tensor([0, 3, 9], dtype=torch.int32)
    masks.check_indices(good, 10, 3, "layer")
    for bad, expected in [
        (torch.tensor([0, 3, 10]), 3),
        (torch.tensor([-1, 3, 9]), 3),
        (torch.tensor([3, 0, 9]), 3),
        (torch.tensor([0, 3, 3]), 3),
        (torch.tensor([0, 3]), 3),
        (torch.tensor([0.0, 3.0, 9.0]), 3),
    ]:
        with pytest.raises(ValueError, match="my.layer"):
            masks.check_indices(bad, 10, expected, "my.layer")
