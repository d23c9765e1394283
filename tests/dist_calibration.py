"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU): mask re-selection on a sharded model.

``torchrun --standalone --nproc_per_node 2 tests/dist_calibration.py OUT_DIR {fsdp2,fsdp1,ddp} KIND``.
Every rank trains one step so the values are non-zero, re-selects the mask with ``calibrate_masks`` on its own
batches, and saves what the test checks: the masks, the whole values (gathered), the logits after re-selection and
the logits of the bare base model.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import lm_batches, sparse_layers, tiny_llama  # noqa: E402
from peft import get_peft_model  # noqa: E402

from peft_sparse import SparseAdapterConfig, calibrate_masks  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]


def rank_batches(rank: int) -> list[dict[str, torch.Tensor]]:
    return lm_batches(2, seed=100 + rank)


def whole_values(model: torch.nn.Module, layers: dict) -> dict[str, torch.Tensor]:
    """Every layer's whole values tensor (FSDP2: ``full_tensor``; FSDP1: inside ``summon_full_params``)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor.clone()

    if isinstance(model, FullyShardedDataParallel):
        with FullyShardedDataParallel.summon_full_params(model):
            return {n: whole(layer.sparse_adapter_values["default"]) for n, layer in layers.items()}
    return {n: whole(layer.sparse_adapter_values["default"]) for n, layer in layers.items()}


def shard(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    if mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.base_model.model.model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    if mode == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        # decoder layers wrapped separately: module names gain `_fsdp_wrapped_module.` segments
        policy = ModuleWrapPolicy({LlamaDecoderLayer})
        return FullyShardedDataParallel(
            model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=policy
        )
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    raise ValueError(mode)


def main(out_dir: str, mode: str, kind: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        base = tiny_llama(layers=2)
        config = SparseAdapterConfig(target_modules=TARGETS, mask_init=kind, keep_ratio=0.05)
        model = get_peft_model(copy.deepcopy(base), config)
        config = model.peft_config["default"]
        layers = sparse_layers(model)  # the same layer objects after sharding
        initial_masks = {n: layer.sparse_adapter_indices["default"].clone() for n, layer in layers.items()}
        model = shard(model, mode)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        model.train()
        model(**rank_batches(rank)[0]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        trained = whole_values(model, layers)
        trained_masks = {n: layer.sparse_adapter_indices["default"].clone() for n, layer in layers.items()}

        refused = ""
        if mode != "ddp":  # a global budget would resize sharded values: refused, nothing changes
            config.budget_scope = "global"
            try:
                calibrate_masks(model, rank_batches(rank), progress=False)
            except ValueError as error:
                refused = str(error)
            config.budget_scope = "layer"
        unchanged = all(
            torch.equal(layer.sparse_adapter_indices["default"], initial_masks[n]) for n, layer in layers.items()
        )

        calibrate_masks(model, rank_batches(rank), progress=False)
        probe = lm_batches(1, seed=7)[0]
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=probe["input_ids"]).logits
            base_logits = base(input_ids=probe["input_ids"]).logits
        torch.save(
            {
                "trained_values": trained,
                "trained_masks": trained_masks,
                "refused_global": refused,
                "unchanged_after_refusal": unchanged,
                "initial_masks": initial_masks,
                "masks": {n: layer.sparse_adapter_indices["default"].clone() for n, layer in layers.items()},
                "values": whole_values(model, layers),
                "logits": logits,
                "base_logits": base_logits,
            },
            os.path.join(out_dir, f"{mode}-{kind}-rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
