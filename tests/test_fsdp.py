"""Mask re-selection under sharded training (FSDP2 ``fully_shard``, FSDP1, DDP) on 2 gloo CPU ranks.

Each case runs ``tests/dist_calibration.py`` under ``torchrun``: train one step (values become non-zero), then
``calibrate_masks`` on each rank's own batches. The masks must be the top-k of the saliency of all ranks' batches
computed here on an unsharded copy, identical on both ranks, and the values must be zero again (whole tensors
gathered), so the model's output equals the base model's.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import assert_is_top_k, dense_delta, lm_batches, reference_weight_grads, sparse_layers, tiny_llama
from peft import get_peft_model

from peft_sparse import SparseAdapterConfig, calibrate_masks

SCRIPT = Path(__file__).with_name("dist_calibration.py")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def torchrun(script: Path, *args: str) -> None:
    """``torchrun --standalone --nproc_per_node 2 script args`` (a free port, so parallel runs do not collide)."""
    launcher = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    command = [str(launcher), "--standalone", "--nproc_per_node", "2", str(script), *args]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def run_ranks(out_dir: Path, mode: str, kind: str) -> list[dict]:
    torchrun(SCRIPT, str(out_dir), mode, kind)
    return [torch.load(out_dir / f"{mode}-{kind}-rank{rank}.pt") for rank in range(2)]


def reference_snip(trained_values: dict, trained_masks: dict) -> dict[str, torch.Tensor]:
    """|W ⊙ ∂L/∂W| at the trained weights W + ΔW over both ranks' batches, on a plain unsharded model."""
    base = tiny_llama(layers=2)
    model = get_peft_model(copy.deepcopy(base), SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05))
    layers = sparse_layers(model)
    for name, layer in layers.items():
        layer.set_mask("default", trained_masks[name])
        with torch.no_grad():
            layer.sparse_adapter_values["default"].copy_(trained_values[name])
    merged = copy.deepcopy(base)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, layer in layers.items():
            modules[name].weight.add_(dense_delta(layer, "default"))
    batches = lm_batches(2, seed=100) + lm_batches(2, seed=101)
    grads = reference_weight_grads(merged, list(layers), batches)
    weights = dict(base.named_modules())
    return {name: (weights[name].weight.detach() * grad).abs() for name, grad in grads.items()}


@pytest.mark.parametrize("mode", ["fsdp2", "fsdp1", "ddp"])
def test_reselection_resets_values_and_picks_the_global_top_k(tmp_path, mode):
    rank0, rank1 = run_ranks(tmp_path, mode, "snip")
    for key in ("trained_masks", "masks"):
        assert rank0[key].keys() == rank1[key].keys() == set(rank0["initial_masks"])
        for name in rank0[key]:
            assert torch.equal(rank0[key][name], rank1[key][name])
    assert sum(float(v.abs().sum()) for v in rank0["trained_values"].values()) > 0  # training moved the values
    scores = reference_snip(rank0["trained_values"], rank0["trained_masks"])
    for name, mask in rank0["masks"].items():
        assert_is_top_k(mask, scores[name], mask.numel())
        for data in (rank0, rank1):
            assert data["values"][name].numel() == mask.numel()
            assert torch.all(data["values"][name] == 0), f"{mode}: stale values kept in {name}"
    assert any(not torch.equal(rank0["masks"][n], rank0["initial_masks"][n]) for n in rank0["masks"])
    for data in (rank0, rank1):
        torch.testing.assert_close(data["logits"], data["base_logits"], rtol=0, atol=1e-5)
    if mode != "ddp":  # a global budget would resize sharded values: refused before anything changed
        for data in (rank0, rank1):
            assert "budget_scope='global'" in data["refused_global"]
            assert data["unchanged_after_refusal"]


def test_warmup_reselection_under_fsdp2_agrees_across_ranks_and_resets_values(tmp_path):
    rank0, rank1 = run_ranks(tmp_path, "fsdp2", "warmup")
    for name, mask in rank0["masks"].items():
        assert torch.equal(mask, rank1["masks"][name])
        assert all(torch.all(data["values"][name] == 0) for data in (rank0, rank1))
    assert any(not torch.equal(rank0["masks"][n], rank0["initial_masks"][n]) for n in rank0["masks"])
    torch.testing.assert_close(rank0["logits"], rank0["base_logits"], rtol=0, atol=1e-5)


def test_trainer_callback_reselects_identically_on_ddp_ranks(tmp_path):
    """The docs' recipe: Trainer + SparseMaskCalibrationCallback(reselect_steps=[2]) under torchrun (DDP, gloo)."""
    torchrun(SCRIPT.with_name("dist_trainer.py"), str(tmp_path))
    ranks = [torch.load(tmp_path / f"trainer-rank{rank}.pt") for rank in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    for stage in ("after_reselect", "end"):
        for name, mask in ranks[0][stage]["masks"].items():
            assert torch.equal(mask, ranks[1][stage]["masks"][name])
            assert torch.equal(ranks[0][stage]["values"][name], ranks[1][stage]["values"][name])
    assert all(bool((v == 0).all()) for r in ranks for v in r["after_reselect"]["values"].values())
    assert sum(float(v.abs().sum()) for v in ranks[0]["end"]["values"].values()) > 0  # trained after re-selection


# --- single-process pieces the sharded path relies on -----------------------------------------------------------
def test_same_size_set_mask_zeroes_the_values_in_their_storage():
    model = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["q_proj"]))
    (layer,) = sparse_layers(model).values()
    values = layer.sparse_adapter_values["default"]
    with torch.no_grad():
        values.fill_(0.5)
    storage = values.data_ptr()
    layer.set_mask("default", torch.arange(values.numel(), dtype=torch.int32) * 3)
    assert layer.sparse_adapter_values["default"] is values and values.data_ptr() == storage
    assert torch.all(values == 0)


def test_sharded_values_are_not_resized():
    model = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["q_proj"]))
    (layer,) = sparse_layers(model).values()
    values = layer.sparse_adapter_values["default"]
    indices = layer.sparse_adapter_indices["default"].clone()
    values.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    values.ds_numel = values.numel()
    with pytest.raises(ValueError, match="cannot resize the sharded values"):
        layer.set_mask("default", torch.arange(values.numel() + 1, dtype=torch.int32))
    assert torch.equal(layer.sparse_adapter_indices["default"], indices)


def test_partitioned_weights_are_gathered_for_injection_and_scoring(monkeypatch):
    """ZeRO-3 emulated: weights hold no data outside ``gather_params_ctx`` (DeepSpeed itself cannot run here)."""
    import peft_sparse.distributed

    base = tiny_llama(layers=1)
    reference = copy.deepcopy(base)
    whole = {}
    for module in base.modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            whole[id(weight)] = weight.data
            weight.ds_id, weight.ds_shape = id(weight), weight.shape
            weight.data = torch.empty(0)
    gathered = []

    @contextmanager
    def fake_gather(param, modifier_rank=0, fwd_module=None):
        params = [param] if isinstance(param, torch.Tensor) else list(param)
        partitioned = [p for p in params if hasattr(p, "ds_id") and id(p) in whole]
        for p in partitioned:
            p.data = whole[id(p)]
            gathered.append(p.ds_shape)
        yield
        for p in partitioned:
            p.data = torch.empty(0)

    monkeypatch.setattr(peft_sparse.distributed, "gather_params_ctx", fake_gather)
    config = SparseAdapterConfig(target_modules=["q_proj", "k_proj"], keep_ratio=0.1)
    model = get_peft_model(base, config)
    assert len(gathered) == 2
    modules = dict(reference.named_modules())
    for name, layer in sparse_layers(model).items():
        weight = modules[name].weight.detach()
        assert model.peft_config["default"].weight_shapes[name] == list(weight.shape)
        assert_is_top_k(layer.sparse_adapter_indices["default"], weight.abs(), round(0.1 * weight.numel()))
    # re-selection by magnitude reads the gathered weights too
    calibrate_masks(model, lm_batches(1), score_kind="magnitude", progress=False)
    assert len(gathered) == 4

