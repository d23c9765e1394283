"""Multi-expert scenarios: merging N experts into one, and how the cost of an expert swap scales."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_sparse import SparseAdapterConfig, SparseAdapterLayer

from . import methods
from .measure import repeat, settle
from .models import ModelSpec

# (label, method, combination_type, extra kwargs); the LoRA svd merge is the reference of the merge target
MERGES: list[tuple[str, str, str, dict[str, Any]]] = [
    ("peft-sparse unstructured, linear", "sparse", "linear", {}),
    ("peft-sparse unstructured, sparse_average", "sparse", "sparse_average", {}),
    ("peft-sparse unstructured, sparse_average, one shared mask", methods.SHARED_MASK, "sparse_average", {}),
    ("peft-sparse block 32, linear", "sparse_block32", "linear", {}),
    ("peft-sparse block 32, sparse_average", "sparse_block32", "sparse_average", {}),
    ("PEFT LoRA r=8, svd", "lora_r8", "svd", {"svd_full_matrices": False}),
    ("PEFT LoRA r=8, linear", "lora_r8", "linear", {}),
    ("PEFT LoRA r=8, cat", "lora_r8", "cat", {}),
]
LORA_SVD = "PEFT LoRA r=8, svd"


def merge_experts(spec: ModelSpec, base: nn.Module, count: int, repeats: int) -> dict[str, Any]:
    """Time ``add_weighted_adapter`` over ``count`` loaded experts with random non-zero values (equal weights).

    Sparse experts have distinct seeded random masks (the worst case for the union's size; one extra row has all
    experts share one magnitude mask, the best case); LoRA experts have random A and B. The LoRA svd merge
    (``svd_full_matrices=False``, PEFT's faster setting) runs once: it is slow. Deleting the merged adapter
    between repeats is not timed.
    """
    results: dict[str, Any] = {}
    holders: dict[str, nn.Module] = {}
    names = [f"e{i}" for i in range(count)]
    weights = [1.0 / count] * count
    for label, method, combination, kwargs in MERGES:
        if method not in holders:
            holders.clear()
            holders[method] = methods.build_experts(method, spec, base, count)
            settle()
        model = holders[method]

        name = f"merged_{combination}"

        def cleanup(model: nn.Module = model, name: str = name) -> None:
            if name in model.peft_config:
                model.delete_adapter(name)

        def merge(model: nn.Module = model, combination: str = combination, kwargs: dict = kwargs, name: str = name):
            model.add_weighted_adapter(names, weights, name, combination_type=combination, **kwargs)

        runs = 1 if combination == "svd" else repeats
        with torch.no_grad():
            timing = repeat(merge, runs, warmup=0, setup=cleanup)
        timing["method"], timing["combination_type"] = method, combination
        if method in (*methods.SPARSE_METHODS, methods.SHARED_MASK):
            timing["stored_values_per_expert"] = stored_entries(model, "e0")
            timing["stored_values_merged"] = stored_entries(model, name)
        cleanup()
        results[label] = timing
    holders.clear()
    settle()
    return {"count": count, "merges": results}


def stored_entries(model: nn.Module, adapter: str) -> int:
    """Stored values of ``adapter`` over all sparse layers."""
    return sum(
        m.sparse_adapter_values[adapter].numel()
        for m in model.modules()
        if isinstance(m, SparseAdapterLayer) and adapter in m.sparse_adapter_values
    )


class _OneLinear(nn.Module):
    """A single square weight, to vary the weight size at a fixed number of stored entries."""

    def __init__(self, size: int):
        super().__init__()
        self.proj = nn.Linear(size, size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _merged_swap(model: nn.Module, repeats: int) -> float:
    """Median CPU seconds of ``unmerge_adapter`` + ``set_adapter`` (other expert) + ``merge_adapter``."""
    tuner = model.base_model
    tuner.merge_adapter()
    state = {"active": "e0"}

    def swap() -> None:
        tuner.unmerge_adapter()
        state["active"] = "e1" if state["active"] == "e0" else "e0"
        model.set_adapter(state["active"])
        tuner.merge_adapter()

    with torch.no_grad():
        result = repeat(swap, repeats, warmup=2)["cpu_s"]
    tuner.unmerge_adapter()
    return result


def swap_scaling(sizes: tuple[int, int], entries: int, repeats: int) -> dict[str, Any]:
    """Merged expert swap on one square weight: sparse at (E, small), (E, large), (4E, large) and LoRA at the same
    trainable count E on both sizes. Cost ∝ entries means: ~flat from small to large weight at fixed E, and a
    clear rise from E to 4E; a weight-size-bound swap (LoRA's dense B @ A) rises with the weight instead."""
    small, large = sizes
    rows: list[dict[str, Any]] = []
    for key, method, size, count in (
        ("sparse_E_small", "sparse", small, entries),
        ("sparse_E_large", "sparse", large, entries),
        ("sparse_4E_large", "sparse", large, 4 * entries),
        ("lora_E_small", "lora", small, entries),
        ("lora_E_large", "lora", large, entries),
    ):
        torch.manual_seed(0)
        base = _OneLinear(size).requires_grad_(False)
        if method == "sparse":
            configs = [
                SparseAdapterConfig(
                    target_modules=["proj"], num_params=count, mask_init="random", seed=i, init_weights=False
                )
                for i in range(2)
            ]
        else:
            rank = max(1, count // (2 * size))
            configs = [LoraConfig(r=rank, target_modules=["proj"], init_lora_weights=False) for _ in range(2)]
        model = get_peft_model(base, configs[0], adapter_name="e0")
        model.add_adapter("e1", configs[1])
        stored = sum(p.numel() for n, p in model.named_parameters() if ".e0" in n)
        rows.append(
            {
                "key": key,
                "method": method,
                "weight_size": size,
                "weight_entries": size * size,
                "stored_entries": stored,
                "swap_merged_s": _merged_swap(model, repeats),
            }
        )
        del model, base
        settle()
    return {"rows": rows, "sizes": list(sizes), "entries": entries}


def swap_ratios(scaling: dict[str, Any]) -> dict[str, float]:
    """The ratios of the swap target: growth with weight size at fixed entries, and with entries."""
    t = {row["key"]: row["swap_merged_s"] for row in scaling["rows"]}
    small, large = scaling["sizes"]
    return {
        "sparse_weight_growth": t["sparse_E_large"] / t["sparse_E_small"],
        "sparse_entry_growth": t["sparse_4E_large"] / t["sparse_E_large"],
        "lora_weight_growth": t["lora_E_large"] / t["lora_E_small"],
        "weight_size_ratio": (large / small) ** 2,
    }


__all__ = ["LORA_SVD", "MERGES", "merge_experts", "stored_entries", "swap_ratios", "swap_scaling"]
