"""The compared methods, all at the trainable-parameter count of LoRA r=8 (except LoRA r=16 and full FT)."""

from __future__ import annotations

import copy
from typing import Any

from peft import LoraConfig, PeftConfig, ShiraConfig, get_peft_model
from peft.tuners.supertuning import SupertuningConfig
from torch import nn

import peft_sparse  # noqa: F401  (registers the sparse adapter tuner with PEFT)
from peft_sparse import SparseAdapterConfig

from .models import ModelSpec

FULL = "full"
LOWER_BOUND = "frozen_lower_bound"
ADAPTER_METHODS = ["lora_r8", "lora_r16", "shira", "supertuning", "sparse", "sparse_block32"]
METHODS = [FULL, *ADAPTER_METHODS, LOWER_BOUND]
LABELS = {
    FULL: "full fine-tuning",
    "lora_r8": "PEFT LoRA r=8",
    "lora_r16": "PEFT LoRA r=16",
    "shira": "PEFT SHiRA (r=8 count)",
    "supertuning": "PEFT Super-Tuning (r=8 count)",
    "sparse": "peft-sparse unstructured (r=8 count)",
    "sparse_block32": "peft-sparse block 32x32 (r=8 count)",
    LOWER_BOUND: "lower bound: frozen fwd + input-grad bwd",
}
SPARSE_METHODS = ("sparse", "sparse_block32")
# merge scenario only: unstructured experts that all share one (magnitude) mask, the best case for the union
SHARED_MASK = "sparse_shared_mask"
BASE_RANK = 8
BLOCK_SIZE = 32


def targeted_linears(model: nn.Module, targets: list[str]) -> list[tuple[str, nn.Linear]]:
    """The ``nn.Linear`` modules PEFT's suffix matching selects for ``targets``."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]


def lora_count(model: nn.Module, targets: list[str], rank: int) -> tuple[int, int]:
    """(LoRA trainable parameters at ``rank``, total entries of the targeted weights)."""
    linears = targeted_linears(model, targets)
    count = sum(rank * (m.in_features + m.out_features) for _, m in linears)
    return count, sum(m.weight.numel() for _, m in linears)


def lora_config(spec: ModelSpec, rank: int, expert: int | None = None) -> LoraConfig:
    """LoRA on every attention + MLP linear; ``expert`` set: random non-zero A and B (a trained-looking expert)."""
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=list(spec.target_modules),
        init_lora_weights=expert is None,
    )


def adapter_config(method: str, spec: ModelSpec, base: nn.Module, expert: int | None = None) -> PeftConfig:
    """The PEFT config of ``method``. ``expert=None``: a fresh adapter for training (zero delta); ``expert=i``: the
    i-th of several distinct experts with random non-zero values (and, for sparse / SHiRA, an i-seeded random mask)
    so that merging and swapping do real arithmetic."""
    trained = expert is not None
    if method == "lora_r8":
        return lora_config(spec, BASE_RANK, expert)
    if method == "lora_r16":
        return lora_config(spec, 2 * BASE_RANK, expert)
    if method == "shira":
        return ShiraConfig(
            r=BASE_RANK, target_modules=list(spec.target_modules), random_seed=expert or 0, init_weights=not trained
        )
    if method == "supertuning":
        count, total = lora_count(base, spec.target_modules, BASE_RANK)
        # one sparsity for all layers with the LoRA r=8 total (Super-Tuning has no per-layer budget); the epsilon
        # keeps int(numel * (1 - sparsity)) from rounding an exact product down
        return SupertuningConfig(
            target_modules=list(spec.target_modules), sparsity=1.0 - count / total - 1e-9, init_weights=not trained
        )
    if method in SPARSE_METHODS:
        return sparse_config(method, spec, expert)
    raise ValueError(f"unknown adapter method {method!r}")


def sparse_config(
    method: str, spec: ModelSpec, expert: int | None = None, rank: int = BASE_RANK
) -> SparseAdapterConfig:
    """peft-sparse at LoRA ``rank``'s count via ``from_lora_config``; experts get seeded random masks and values."""
    overrides: dict[str, Any] = {}
    if method == "sparse_block32":
        overrides["block_size"] = BLOCK_SIZE
    if expert is not None:
        overrides.update(mask_init="random", seed=expert, init_weights=False)
        if method == SHARED_MASK:
            overrides.update(mask_init="magnitude", seed=None)
    return SparseAdapterConfig.from_lora_config(lora_config(spec, rank), **overrides)


def build(method: str, spec: ModelSpec, base: nn.Module) -> nn.Module:
    """A fresh trainable copy of ``base`` for ``method`` (``base`` itself is never modified)."""
    model = copy.deepcopy(base)
    if method == FULL:
        model.requires_grad_(True)
        return model
    if method == LOWER_BOUND:
        # nothing trainable; the embedding output requires grad so backward computes every input gradient
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_())
        return model
    model.requires_grad_(False)
    return get_peft_model(model, adapter_config(method, spec, base))


def build_experts(method: str, spec: ModelSpec, base: nn.Module, count: int, sparse_rank: int = BASE_RANK) -> nn.Module:
    """A PEFT model holding ``count`` distinct experts ``e0 .. e{count-1}`` of ``method`` (``e0`` active).

    ``sparse_rank`` changes the budget of the sparse methods (the LoRA rank whose count they match)."""

    def config(i: int) -> PeftConfig:
        if method in SPARSE_METHODS or method == SHARED_MASK:
            return sparse_config(method, spec, i, sparse_rank)
        return adapter_config(method, spec, base, i)

    model = get_peft_model(copy.deepcopy(base), config(0), adapter_name="e0")
    for i in range(1, count):
        model.add_adapter(f"e{i}", config(i))
    return model
