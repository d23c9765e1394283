"""merge_layer / align_on_union against dense references computed independently here."""

from __future__ import annotations

import math

import pytest
import torch
from peft.utils import merge_utils

from peft_sparse.merging import COMBINATION_TYPES, align_on_union, merge_layer

NUM_POSITIONS = 60
DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
RANDOM_METHODS = ("dare_linear", "dare_ties")


def make_expert(seed: int, count: int, width: int, num_positions: int = NUM_POSITIONS):
    """Random sorted unique indices (int32) and non-zero values of shape (count, width)."""
    gen = torch.Generator().manual_seed(seed)
    indices = torch.sort(torch.randperm(num_positions, generator=gen)[:count]).values.to(torch.int32)
    values = torch.randn(count, width, generator=gen, dtype=torch.float64)
    values = values + torch.sign(values) * 0.1  # keep clear of exact zeros
    return indices, values


def dense(indices: torch.Tensor, values: torch.Tensor, num_positions: int = NUM_POSITIONS) -> torch.Tensor:
    """Dense delta of one expert: (num_positions, k) with zeros off the mask."""
    out = torch.zeros(num_positions, values.shape[1], dtype=values.dtype)
    for row, position in enumerate(indices.tolist()):
        out[position] = values[row]
    return out


def dense_reference(indices, values, weights, method, density=None, seed=None):
    """(union positions, merged rows) computed on dense deltas with plain formulas / PEFT utilities."""
    deltas = torch.stack([dense(i, v) for i, v in zip(indices, values, strict=True)])  # (E, P, k)
    presence = torch.zeros(len(indices), NUM_POSITIONS, dtype=torch.bool)
    for e, idx in enumerate(indices):
        presence[e, idx.long()] = True
    union = [p for p in range(NUM_POSITIONS) if presence[:, p].any()]
    w = torch.tensor(weights, dtype=deltas.dtype)
    if method in ("linear", "task_arithmetic"):
        merged = sum(w[e] * deltas[e] for e in range(len(indices)))
        return union, merged[union]
    if method == "sparse_average":
        rows = []
        for p in union:
            present = [e for e in range(len(indices)) if presence[e, p]]
            rows.append(sum(w[e] * deltas[e, p] for e in present) / sum(w[e] for e in present))
        return union, torch.stack(rows)
    restricted = [deltas[e, union].flatten() for e in range(len(indices))]
    fn = {
        "ties": lambda: merge_utils.ties(restricted, w, density),
        "dare_linear": lambda: merge_utils.dare_linear(restricted, w, density),
        "dare_ties": lambda: merge_utils.dare_ties(restricted, w, density),
        "magnitude_prune": lambda: merge_utils.magnitude_prune(restricted, w, density),
    }[method]
    if seed is not None:
        torch.manual_seed(seed)
    return union, fn().reshape(len(union), -1)


def experts(layout: str, width: int):
    """Three experts with overlapping or disjoint masks."""
    if layout == "overlapping":
        return [make_expert(s, c, width) for s, c in ((1, 25), (2, 30), (3, 12))]
    perm = torch.randperm(NUM_POSITIONS, generator=torch.Generator().manual_seed(0))
    out = []
    for e, chunk in enumerate((perm[:15], perm[15:35], perm[35:45])):
        idx = torch.sort(chunk).values
        vals = torch.randn(
            idx.numel(), width, dtype=torch.float64, generator=torch.Generator().manual_seed(e)
        )
        out.append((idx, vals + torch.sign(vals) * 0.1))
    return out


def test_registry_lists_all_methods():
    expected = {"linear", "task_arithmetic", "sparse_average", *DENSITY_METHODS}
    assert set(COMBINATION_TYPES) == expected


@pytest.mark.parametrize("width", [1, 4])
@pytest.mark.parametrize("layout", ["overlapping", "disjoint"])
@pytest.mark.parametrize("method", COMBINATION_TYPES)
def test_matches_dense_reference(method, layout, width):
    pairs = experts(layout, width)
    indices, values = [p[0] for p in pairs], [p[1] for p in pairs]
    weights = [0.7, -0.4, 1.3]
    density = 0.4 if method in DENSITY_METHODS else None
    union_ref, merged_ref = dense_reference(indices, values, weights, method, density, seed=11)
    union, merged = merge_layer(
        indices, values, weights, method, density=density, generator=torch.Generator().manual_seed(11)
    )
    assert union.dtype == torch.int64
    assert union.tolist() == union_ref
    assert merged.shape == (len(union_ref), width)
    torch.testing.assert_close(merged, merged_ref.to(merged.dtype))


def test_sparse_average_default_weights_is_mean_over_present():
    indices = [torch.tensor([0, 2]), torch.tensor([2, 5]), torch.tensor([2])]
    values = [torch.tensor([[1.0], [3.0]]), torch.tensor([[6.0], [8.0]]), torch.tensor([[-3.0]])]
    union, merged = merge_layer(indices, values, combination_type="sparse_average")
    assert union.tolist() == [0, 2, 5]
    assert merged.flatten().tolist() == [1.0, 2.0, 8.0]


def test_linear_is_exact_weighted_sum():
    indices = [torch.tensor([1, 4]), torch.tensor([4, 9])]
    values = [torch.tensor([[2.0], [3.0]]), torch.tensor([[5.0], [7.0]])]
    union, merged = merge_layer(indices, values, [0.5, 2.0], "linear")
    assert union.tolist() == [1, 4, 9]
    assert merged.flatten().tolist() == [1.0, 11.5, 14.0]


def test_align_on_union_zeros_and_mask():
    indices = [torch.tensor([3, 7], dtype=torch.int32), torch.tensor([7, 8])]
    values = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])]
    union, aligned, present = align_on_union(indices, values)
    assert union.tolist() == [3, 7, 8] and union.dtype == torch.int64
    assert aligned.shape == (2, 3, 2)
    assert aligned[0].tolist() == [[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]]
    assert aligned[1].tolist() == [[0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]
    assert present.tolist() == [[True, True, False], [False, True, True]]


def test_cost_independent_of_dense_size():
    # positions of a (conceptually) enormous weight: a dense intermediate would not fit in memory
    indices = [torch.tensor([5, 10**12]), torch.tensor([10**12, 3 * 10**12])]
    values = [torch.tensor([[1.0], [2.0]]), torch.tensor([[4.0], [8.0]])]
    union, merged = merge_layer(indices, values, combination_type="sparse_average")
    assert union.tolist() == [5, 10**12, 3 * 10**12]
    assert merged.flatten().tolist() == [1.0, 3.0, 8.0]


def test_dare_reproducible_and_global_rng_untouched():
    pairs = experts("overlapping", 1)
    indices, values = [p[0] for p in pairs], [p[1] for p in pairs]
    state = torch.get_rng_state()
    a = merge_layer(indices, values, None, "dare_ties", 0.5, generator=torch.Generator().manual_seed(3))
    b = merge_layer(indices, values, None, "dare_ties", 0.5, generator=torch.Generator().manual_seed(3))
    c = merge_layer(indices, values, None, "dare_ties", 0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_density_one_keeps_everything():
    pairs = experts("overlapping", 1)
    indices, values = [p[0] for p in pairs], [p[1] for p in pairs]
    lin = merge_layer(indices, values, None, "linear")
    pruned = merge_layer(indices, values, None, "magnitude_prune", density=1.0)
    torch.testing.assert_close(lin[1], pruned[1])


def test_drop_zeros_unstructured():
    indices = [torch.tensor([0, 1, 2]), torch.tensor([1, 2])]
    values = [torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[-2.0], [1.0]])]
    union, merged = merge_layer(indices, values, None, "linear", drop_zeros=True)
    assert union.tolist() == [0, 2]
    assert merged.flatten().tolist() == [1.0, 4.0]
    union_all, _ = merge_layer(indices, values, None, "linear")
    assert union_all.tolist() == [0, 1, 2]


def test_drop_zeros_blocks_only_all_zero_rows():
    indices = [torch.tensor([0, 1]), torch.tensor([0, 1])]
    values = [torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.tensor([[-1.0, 5.0], [-1.0, -2.0]])]
    union, merged = merge_layer(indices, values, None, "linear", drop_zeros=True)
    assert union.tolist() == [0]
    assert merged.tolist() == [[0.0, 7.0]]


def test_empty_experts_and_dtype_kept():
    indices = [torch.zeros(0, dtype=torch.int64), torch.tensor([2])]
    values = [torch.zeros(0, 1, dtype=torch.bfloat16), torch.tensor([[1.5]], dtype=torch.bfloat16)]
    union, merged = merge_layer(indices, values, None, "sparse_average")
    assert union.tolist() == [2] and merged.dtype == torch.bfloat16 and merged.item() == 1.5
    none = merge_layer([indices[0]], [values[0]], None, "ties", density=0.5)
    assert none[0].numel() == 0 and none[1].shape == (0, 1)


GOOD_I = [torch.tensor([0, 1]), torch.tensor([1, 2])]
GOOD_V = [torch.ones(2, 1), torch.ones(2, 1)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"indices": [], "values": []}, "at least one expert"),
        ({"values": GOOD_V[:1]}, "2 index tensors but 1 value"),
        ({"values": [torch.ones(3, 1), torch.ones(2, 1)]}, "2 indices but 3 value rows"),
        ({"values": [torch.ones(2, 1), torch.ones(2, 4)]}, "k=4"),
        ({"values": [torch.ones(2), torch.ones(2)]}, "2-D float"),
        ({"indices": [torch.tensor([1, 0]), GOOD_I[1]]}, "sorted"),
        ({"indices": [torch.tensor([1, 1]), GOOD_I[1]]}, "duplicates"),
        ({"indices": [torch.tensor([0.0, 1.0]), GOOD_I[1]]}, "integers"),
        ({"weights": [1.0, math.nan]}, "finite"),
        ({"weights": [1.0, math.inf]}, "finite"),
        ({"weights": [1.0]}, "1 weights for 2 experts"),
        ({"combination_type": "mean"}, "valid: linear, task_arithmetic, sparse_average, ties"),
        ({"combination_type": "ties"}, "needs density"),
        ({"combination_type": "dare_linear", "density": 0.0}, r"\(0, 1\]"),
        ({"combination_type": "magnitude_prune", "density": 1.5}, r"\(0, 1\]"),
        ({"combination_type": "linear", "density": 0.5}, "not used"),
        (
            {"combination_type": "ties", "density": 0.5, "majority_sign_method": "vote"},
            "majority_sign_method",
        ),
        ({"weights": [1.0, -1.0]}, "sum to 0"),
    ],
)
def test_errors(kwargs, message):
    args = {"indices": GOOD_I, "values": GOOD_V, "weights": None, "combination_type": "sparse_average"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        merge_layer(**args)


@pytest.mark.parametrize("method", DENSITY_METHODS)
def test_every_density_method_requires_density(method):
    with pytest.raises(ValueError, match="needs density"):
        merge_layer(GOOD_I, GOOD_V, None, method)
