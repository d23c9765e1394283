"""calibrate_masks against masks computed independently from a trainable copy of the base weights."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    assert_is_top_k,
    assert_same_tensors,
    base_weights,
    block_sums,
    lm_batches,
    reference_scores,
    set_random_values,
    sparse_layers,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)
from peft import get_peft_model

from peft_sparse import SparseAdapterConfig, calibrate_masks


def masks_of(model, adapter="default") -> dict[str, torch.Tensor]:
    return {n: layer.sparse_adapter_indices[adapter].clone() for n, layer in sparse_layers(model).items()}


def values_of(model, adapter="default") -> dict[str, torch.Tensor]:
    return {n: layer.sparse_adapter_values[adapter].detach().clone() for n, layer in sparse_layers(model).items()}


# --- gradient and snip masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gradient", "snip"])
@pytest.mark.parametrize(
    ("factory", "targets"), [(tiny_llama, ["q_proj", "v_proj", "down_proj"]), (tiny_gpt2, ["c_attn", "c_fc"])]
)
def test_masks_are_the_top_k_of_the_weight_saliency(kind, factory, targets):
    base = factory()
    batches = lm_batches(3)
    model = get_peft_model(copy.deepcopy(base), SparseAdapterConfig(target_modules=targets, mask_init=kind))
    names = list(sparse_layers(model))
    magnitude = masks_of(model)
    counts = calibrate_masks(model, batches, progress=False)
    scores = reference_scores(base, names, batches, kind)
    for name, layer in sparse_layers(model).items():
        k = model.peft_config["default"].entries_pattern[name]
        assert counts[name] == k == layer.sparse_adapter_indices["default"].numel()
        assert layer.sparse_adapter_indices["default"].dtype == torch.int32
        assert_is_top_k(layer.sparse_adapter_indices["default"], scores[name], k)
    assert any(not torch.equal(magnitude[n], m) for n, m in masks_of(model).items())


def test_num_batches_limits_the_batches_used():
    base = tiny_llama()
    batches = lm_batches(4)
    model = get_peft_model(copy.deepcopy(base), SparseAdapterConfig(target_modules=["q_proj"], mask_init="gradient"))
    calibrate_masks(model, iter(batches), num_batches=2, progress=False)
    scores = reference_scores(base, list(sparse_layers(model)), batches[:2], "gradient")
    for name, layer in sparse_layers(model).items():
        assert_is_top_k(
            layer.sparse_adapter_indices["default"], scores[name], layer.sparse_adapter_values["default"].numel()
        )


def test_block_masks_pick_whole_blocks_by_block_sums():
    base = tiny_llama(layers=1)
    batches = lm_batches(2)
    config = SparseAdapterConfig(target_modules=["up_proj", "q_proj"], mask_init="snip", block_size=5, keep_ratio=0.2)
    model = get_peft_model(copy.deepcopy(base), config)
    calibrate_masks(model, batches, progress=False)
    scores = reference_scores(base, list(sparse_layers(model)), batches, "snip")
    for name, layer in sparse_layers(model).items():  # (48, 32) and (32, 32): ragged 5x5 grids
        rows = layer.sparse_adapter_indices["default"].numel()
        assert_is_top_k(layer.sparse_adapter_indices["default"], block_sums(scores[name], 5), rows)
        assert layer.sparse_adapter_values["default"].numel() == rows * 25


@pytest.mark.parametrize("block_size", [None, 4])
def test_global_budget_keeps_the_total_and_picks_the_top_over_all_layers(block_size):
    base = tiny_llama()
    batches = lm_batches(2)
    config = SparseAdapterConfig(
        target_modules="all-linear", mask_init="gradient", budget_scope="global", block_size=block_size
    )
    model = get_peft_model(copy.deepcopy(base), config)
    layers = sparse_layers(model)
    total = sum(layer.sparse_adapter_indices["default"].numel() for layer in layers.values())
    counts = calibrate_masks(model, batches, progress=False)
    assert sum(counts.values()) == total
    assert len(set(counts.values())) > 1  # unequal per-layer counts
    assert model.peft_config["default"].entries_pattern == counts
    scores = reference_scores(base, list(layers), batches, "gradient")
    if block_size is not None:
        scores = {n: block_sums(s, block_size) for n, s in scores.items()}
    names = list(layers)
    offsets, start = {}, 0
    for name in names:
        offsets[name] = start
        start += scores[name].numel()
    chosen = torch.cat([layers[n].sparse_adapter_indices["default"].long() + offsets[n] for n in names])
    assert_is_top_k(chosen, torch.cat([scores[n].flatten() for n in names]), total)
    for name, layer in layers.items():
        assert layer.sparse_adapter_values["default"].numel() == counts[name] * (block_size or 1) ** 2
    # the model still runs and trains with the new per-layer sizes
    model.train()
    model(**batches[0]).loss.backward()
    assert all(layer.sparse_adapter_values["default"].grad is not None for layer in layers.values())


def test_custom_loss_fn_for_a_model_without_a_built_in_loss():
    base = tiny_bert()
    generator = torch.Generator().manual_seed(0)
    batches = [
        {"a": torch.randint(0, 64, (4, 6), generator=generator), "b": torch.randint(0, 64, (4, 6), generator=generator)}
        for _ in range(2)
    ]

    def contrastive(model, batch):
        za = F.normalize(model(input_ids=batch["a"]).last_hidden_state.mean(1), dim=-1)
        zb = F.normalize(model(input_ids=batch["b"]).last_hidden_state.mean(1), dim=-1)
        return F.cross_entropy(za @ zb.T / 0.1, torch.arange(za.shape[0]))

    config = SparseAdapterConfig(target_modules=["query", "value", "intermediate.dense"], mask_init="gradient")
    model = get_peft_model(copy.deepcopy(base), config)
    with pytest.raises(ValueError, match="loss"):
        calibrate_masks(model, [{"input_ids": batches[0]["a"]}], progress=False)
    calibrate_masks(model, batches, loss_fn=contrastive, progress=False)
    scores = reference_scores(base, list(sparse_layers(model)), batches, "gradient", loss_fn=contrastive)
    for name, layer in sparse_layers(model).items():
        assert_is_top_k(
            layer.sparse_adapter_indices["default"], scores[name], layer.sparse_adapter_values["default"].numel()
        )


# --- side effects -----------------------------------------------------------------------------------------------
def test_base_weights_never_become_trainable_and_values_reset_to_zero():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj", "o_proj"], mask_init="snip"))
    set_random_values(model)
    model.train()
    values_objects = {n: layer.sparse_adapter_values["default"] for n, layer in sparse_layers(model).items()}
    before = base_weights(model)
    base_params = [p for n, p in model.named_parameters() if "sparse_adapter" not in n]
    seen = []
    handle = model.base_model.model.register_forward_pre_hook(
        lambda module, args: seen.append(any(p.requires_grad for p in base_params))
    )
    calibrate_masks(model, lm_batches(2), progress=False)
    handle.remove()
    assert seen == [False, False]
    assert all(not p.requires_grad and p.grad is None for p in base_params)
    assert_same_tensors(base_weights(model), before)
    for name, layer in sparse_layers(model).items():
        values = layer.sparse_adapter_values["default"]
        assert values is values_objects[name]  # same Parameter: optimizers keep working
        assert torch.all(values == 0) and values.requires_grad and values.grad is None
        assert not layer._forward_hooks and not layer._forward_pre_hooks
    assert model.training


def test_errors_change_nothing():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"], mask_init="gradient"))
    set_random_values(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_masks(model, [], progress=False)
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_masks(model, lm_batches(2), num_batches=0, progress=False)
    no_labels = [{"input_ids": b["input_ids"]} for b in lm_batches(1)]
    with pytest.raises(ValueError, match="loss"):
        calibrate_masks(model, no_labels, progress=False)
    with pytest.raises(ValueError, match="score_kind"):
        calibrate_masks(model, lm_batches(1), score_kind="bogus", progress=False)
    with pytest.raises(ValueError):
        calibrate_masks(model, lm_batches(1), adapter_name="missing", progress=False)
    model.merge_adapter()
    merged_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="unmerge"):
        calibrate_masks(model, lm_batches(1), progress=False)
    assert_same_tensors(dict(model.state_dict()), merged_state)
    model.unmerge_adapter()
    state = {k: v.clone() for k, v in model.state_dict().items()}  # unmerge rounds; compare from here
    assert_same_tensors(dict(model.state_dict()), state)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "sparse_adapter_values.default" in n
    }
    for layer in sparse_layers(model).values():
        assert not layer._forward_hooks


def test_adapter_name_is_required_with_several_sparse_adapters():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"]), adapter_name="a")
    model.add_adapter("b", SparseAdapterConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="adapter_name"):
        calibrate_masks(model, lm_batches(1), progress=False)


def test_warmup_changes_only_the_chosen_adapter():
    config = SparseAdapterConfig(target_modules=["q_proj", "v_proj"], mask_init="warmup", warmup_steps=2, seed=0)
    model = get_peft_model(tiny_llama(), config, adapter_name="a")
    model.add_adapter("b", SparseAdapterConfig(target_modules=["q_proj", "v_proj"], mask_init="random", seed=1))
    set_random_values(model)
    model.base_model.set_adapter(["a", "b"])
    before = base_weights(model)
    b_masks, b_values, a_masks = masks_of(model, "b"), values_of(model, "b"), masks_of(model, "a")
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    counts = calibrate_masks(model, lm_batches(2), adapter_name="a", progress=False)
    assert_same_tensors(base_weights(model), before)
    for name, layer in sparse_layers(model).items():
        assert torch.equal(layer.sparse_adapter_indices["b"], b_masks[name])
        assert torch.equal(layer.sparse_adapter_values["b"].detach(), b_values[name])
        assert torch.all(layer.sparse_adapter_values["a"] == 0)
        assert counts[name] == a_masks[name].numel() == layer.sparse_adapter_indices["a"].numel()
        assert layer.active_adapters == ["a", "b"]
        assert not layer._forward_hooks
    assert any(not torch.equal(a_masks[n], m) for n, m in masks_of(model, "a").items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before


def test_progress_bar(capsys):
    model = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["q_proj"], mask_init="gradient"))
    calibrate_masks(model, lm_batches(2), progress=False)
    assert "calibrating masks" not in capsys.readouterr().err
    calibrate_masks(model, lm_batches(2), progress=True)
    assert "calibrating masks" in capsys.readouterr().err


# --- torch.distributed ------------------------------------------------------------------------------------------
DIST_TARGETS = ["q_proj", "down_proj"]


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    return lm_batches(2, seed=100 + rank)


def _distributed_worker(rank: int, world_size: int, directory: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=world_size)
    try:
        config = SparseAdapterConfig(target_modules=DIST_TARGETS, mask_init="gradient")
        model = get_peft_model(tiny_llama(layers=1), config)
        calibrate_masks(model, rank_batches(rank), progress=False)
        torch.save(masks_of(model), os.path.join(directory, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_agree_on_the_mask_of_the_summed_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    base = tiny_llama(layers=1)
    model = get_peft_model(copy.deepcopy(base), SparseAdapterConfig(target_modules=DIST_TARGETS, mask_init="gradient"))
    all_batches = rank_batches(0) + rank_batches(1)
    scores = reference_scores(base, list(sparse_layers(model)), all_batches, "gradient")
    single = rank_batches(0)
    scores_rank0 = reference_scores(base, list(sparse_layers(model)), single, "gradient")
    assert rank0.keys() == rank1.keys() == scores.keys()
    differs_from_local = False
    for name, indices in rank0.items():
        assert torch.equal(indices, rank1[name])
        assert_is_top_k(indices, scores[name], indices.numel())
        local = sorted(range(scores_rank0[name].numel()), key=lambda i: -float(scores_rank0[name].flatten()[i]))
        differs_from_local |= sorted(local[: indices.numel()]) != indices.tolist()
    assert differs_from_local  # the other rank's data mattered


# --- refused inputs ----------------------------------------------------------------------------------------------
def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["gradient", "warmup"])
def test_batches_without_supervised_tokens_are_refused_and_nothing_changes(kind):
    config = SparseAdapterConfig(target_modules=["q_proj", "v_proj"], mask_init=kind, warmup_steps=1)
    model = get_peft_model(tiny_llama(), config)
    set_random_values(model)
    state, pattern = _state(model), dict(model.peft_config["default"].entries_pattern)
    batches = lm_batches(3)
    batches[1] = {**batches[1], "labels": torch.full_like(batches[1]["labels"], -100)}
    with pytest.raises(ValueError, match=r"batch 1 has no supervised tokens"):
        calibrate_masks(model, batches, progress=False)
    assert_same_tensors(_state(model), state)
    assert model.peft_config["default"].entries_pattern == pattern


def test_a_non_finite_loss_is_refused_and_nothing_changes():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"], mask_init="snip"))
    set_random_values(model)
    state = _state(model)
    # only the first position supervised: after the causal shift no token is left, so the loss is NaN
    batch = lm_batches(1)[0]
    labels = torch.full_like(batch["labels"], -100)
    labels[:, 0] = batch["labels"][:, 0]
    with pytest.raises(ValueError, match=r"batch 0 gave a non-finite loss \(nan\); masks left unchanged"):
        calibrate_masks(model, [{**batch, "labels": labels}], progress=False)
    with pytest.raises(ValueError, match="non-finite loss"):
        calibrate_masks(model, lm_batches(1), loss_fn=lambda m, b: m(**b).loss * float("inf"), progress=False)
    assert_same_tensors(_state(model), state)


@pytest.mark.parametrize(
    ("batch", "type_name"), [(torch.zeros(2, 8, dtype=torch.long), "torch.Tensor"), ([1, 2], "builtins.list")]
)
def test_batch_type_errors_name_the_batch_type_not_the_model(batch, type_name):
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"], mask_init="gradient"))
    state = _state(model)
    with pytest.raises(TypeError) as error:
        calibrate_masks(model, lm_batches(1) + [batch], progress=False)
    message = str(error.value)
    assert f"batch 1 is a {type_name}" in message and "loss_fn" in message
    assert "LlamaForCausalLM" not in message and len(message) < 400
    assert_same_tensors(_state(model), state)


def test_loss_fn_must_return_a_scalar_tensor():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["q_proj"], mask_init="gradient"))
    with pytest.raises(TypeError, match="scalar tensor"):
        calibrate_masks(model, lm_batches(1), loss_fn=lambda m, b: 1.0, progress=False)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_batches": 0}, {"num_batches": 1.5}, {"reselect_steps": [0]}, {"reselect_steps": [2, "5"]}, {"loss_fn": 3}],
)
def test_callback_arguments_are_validated(kwargs):
    from peft_sparse import SparseMaskCalibrationCallback

    field = next(iter(kwargs))
    with pytest.raises(ValueError, match=field):
        SparseMaskCalibrationCallback(**kwargs)
