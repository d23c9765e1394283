"""Arrow prototypes and GenKnowSub math against dense references (torch.linalg.svd, explicit dense sums)."""

from __future__ import annotations

import math

import pytest
import torch

from peft_sparse import prototypes, similarity


def random_sparse(shape: tuple[int, int], density: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    numel = shape[0] * shape[1]
    positions = torch.randperm(numel, generator=generator)[: int(density * numel)].sort().values
    return positions, torch.randn(positions.numel(), generator=generator)


def dense_from_entries(positions: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Storage-layout dense matrix, filled entry by entry (fp64)."""
    dense = torch.zeros(shape, dtype=torch.float64)
    for p, v in zip(positions.tolist(), values.tolist(), strict=True):
        dense[p // shape[1], p % shape[1]] += v
    return dense


def dense_from_blocks(blocks: torch.Tensor, values: torch.Tensor, block: int, shape: tuple[int, int]) -> torch.Tensor:
    """Storage-layout dense matrix from block indices and (n, block²) values; ragged slots dropped."""
    dense = torch.zeros(shape, dtype=torch.float64)
    grid_cols = math.ceil(shape[1] / block)
    for b, row in zip(blocks.tolist(), values.view(-1, block, block), strict=True):
        r0, c0 = (b // grid_cols) * block, (b % grid_cols) * block
        h, w = min(block, shape[0] - r0), min(block, shape[1] - c0)
        dense[r0 : r0 + h, c0 : c0 + w] += row[:h, :w].double()
    return dense


def top_right_singular(dense_out_in: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svd(dense_out_in.double())[2][0]


def abs_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return abs(float(a @ b)) / float(a.norm() * b.norm())


def test_unstructured_linear_prototype_matches_svd():
    shape = (24, 40)  # (out, in)
    positions, values = random_sparse(shape, 0.3, seed=1)
    found = prototypes.prototype(positions, values, shape, transposed=False, seed=0)
    assert found.converged and found.vector.shape == (40,)
    assert abs_cos(found.vector, top_right_singular(dense_from_entries(positions, values, shape))) > 1 - 1e-8
    dense = dense_from_entries(positions, values, shape)
    assert found.value == pytest.approx(float(torch.linalg.svdvals(dense)[0]), rel=1e-5)


def test_conv1d_prototype_lives_in_input_space():
    storage = (40, 24)  # Conv1D stores (in, out)
    positions, values = random_sparse(storage, 0.3, seed=2)
    found = prototypes.prototype(positions, values, storage, transposed=True, seed=0)
    assert found.vector.shape == (40,)
    dense_out_in = dense_from_entries(positions, values, storage).T
    assert abs_cos(found.vector, top_right_singular(dense_out_in)) > 1 - 1e-8


@pytest.mark.parametrize("transposed", [False, True])
def test_block_prototype_matches_svd_with_ragged_edges(transposed):
    shape, block = (22, 30), 4  # 6 x 8 block grid, ragged last block row and column
    generator = torch.Generator().manual_seed(3)
    blocks = torch.randperm(48, generator=generator)[:14].sort().values
    values = torch.randn(14, block * block, generator=generator)
    positions, flat = similarity.entry_positions(blocks, values, shape, block)
    dense = dense_from_blocks(blocks, values, block, shape)
    assert torch.equal(dense_from_entries(positions, flat, shape), dense)  # padding dropped, nothing else
    found = prototypes.prototype(positions, flat, shape, transposed=transposed, seed=0)
    reference = top_right_singular(dense.T if transposed else dense)
    assert abs_cos(found.vector, reference) > 1 - 1e-8


def small_gap_matrix(out: int = 80, inp: int = 96, ratio: float = 1.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (out, in) matrix with σ1/σ2 = ``ratio`` and its true top right-singular vector."""
    generator = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=generator, dtype=torch.float64))
    sigma = torch.linspace(0.98, 0.05, out, dtype=torch.float64)
    sigma[0], sigma[1] = ratio, 1.0
    return (u * sigma) @ v[:, :out].T, v[:, 0]


def test_small_spectral_gap_converges_where_15_power_iterations_do_not():
    dense, truth = small_gap_matrix()
    positions = torch.arange(dense.numel())
    values = dense.flatten().float()
    found = prototypes.prototype(positions, values, tuple(dense.shape), transposed=False, seed=0)
    assert found.converged
    assert abs_cos(found.vector, truth) > 1 - 1e-7
    assert abs_cos(found.vector, top_right_singular(dense)) > 1 - 1e-7
    # PEFT's LoRA Arrow: 15 power iterations from a random start; here they are far from the answer
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(dense.shape[1], generator=generator, dtype=torch.float64)
    for _ in range(15):
        v = dense.T @ (dense @ v)
        v = v / v.norm()
    assert abs_cos(v, truth) < 0.999


def test_prototype_is_deterministic_given_the_seed():
    shape = (30, 50)
    positions, values = random_sparse(shape, 0.2, seed=4)
    a = prototypes.prototype(positions, values, shape, False, seed=11)
    b = prototypes.prototype(positions, values, shape, False, seed=11)
    c = prototypes.prototype(positions, values, shape, False, seed=12)
    assert torch.equal(a.vector, b.vector)
    assert abs_cos(a.vector, c.vector) > 1 - 1e-8  # another start converges to the same direction
    assert float(a.vector[torch.argmax(a.vector.abs())]) > 0  # sign fixed


def test_iteration_cap_warns_and_reports_not_converged():
    dense, _ = small_gap_matrix()
    positions = torch.arange(dense.numel())
    with pytest.warns(RuntimeWarning, match="did not converge"):
        found = prototypes.prototype(positions, dense.flatten().float(), tuple(dense.shape), False, seed=0, max_iter=3)
    assert not found.converged and found.matvecs <= 4


def test_zero_delta_gives_a_zero_prototype():
    positions = torch.tensor([1, 5, 9])
    found = prototypes.prototype(positions, torch.zeros(3), (4, 6), False, seed=0)
    assert torch.equal(found.vector, torch.zeros(6)) and found.value == 0.0
    empty = prototypes.prototype(torch.zeros(0, dtype=torch.long), torch.zeros(0), (4, 6), True, seed=0)
    assert torch.equal(empty.vector, torch.zeros(4))


def test_rank_one_delta_converges_immediately():
    u = torch.randn(12, dtype=torch.float64)
    v = torch.randn(20, dtype=torch.float64)
    dense = torch.outer(u, v)
    found = prototypes.prototype(torch.arange(240), dense.flatten().float(), (12, 20), False, seed=0)
    assert found.converged and found.matvecs <= 4
    assert abs_cos(found.vector, v) > 1 - 1e-10


@pytest.mark.parametrize("block", [None, 4])
def test_gen_know_sub_equals_dense_subtraction(block):
    shape = (16, 20)
    generator = torch.Generator().manual_seed(5)
    slots = shape[0] * shape[1] if block is None else 4 * 5
    width = 1 if block is None else block * block
    experts = []
    for count in (30, 25, 40) if block is None else (6, 5, 8):
        indices = torch.randperm(slots, generator=generator)[:count].sort().values.to(torch.int32)
        experts.append((indices, torch.randn(count, width, generator=generator)))
    task, general = experts[0], experts[1:]
    union, values = prototypes.subtract_general_knowledge(task, general)

    def dense(indices, vals):
        if block is None:
            return dense_from_entries(indices.long(), vals.reshape(-1), shape)
        return dense_from_blocks(indices.long(), vals, block, shape)

    expected = dense(*task) - (dense(*general[0]) + dense(*general[1])) / 2
    assert torch.allclose(dense(union, values), expected, atol=1e-6)
    assert set(union.tolist()) == set().union(*(set(e[0].tolist()) for e in experts))
    with pytest.raises(ValueError, match="at least one general expert"):
        prototypes.subtract_general_knowledge(task, [])
