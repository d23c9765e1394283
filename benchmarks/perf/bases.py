"""Step time on other bases than fp32: the same model cast to bf16 (and, once registered, quantized bases).

Each base variant turns the fp32 benchmark model into another base (``prepare``), then the listed methods train
on it in interleaved rounds, exactly like the main step-time measurement. A branch adding a base (for example a
bitsandbytes or torchao quantized one) registers it with :func:`register_base_variant`; the report and the
targets pick it up without further changes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import measure, methods
from .models import ModelSpec


@dataclass(frozen=True)
class BaseVariant:
    """How to turn the fp32 base into this base, and which methods train on it."""

    label: str
    prepare: Callable[[nn.Module], nn.Module]
    methods: tuple[str, ...] = ("lora_r8", "shira", "sparse", "sparse_block32", methods.LOWER_BOUND)


def _bf16(model: nn.Module) -> nn.Module:
    return model.to(torch.bfloat16)


BASE_VARIANTS: dict[str, BaseVariant] = {"bf16": BaseVariant("bf16 base (weights and activations)", _bf16)}


def register_base_variant(name: str, variant: BaseVariant) -> None:
    """Add a base variant (e.g. a quantized base); models whose spec lists ``name`` in ``base_variants`` run it."""
    if name in BASE_VARIANTS:
        raise ValueError(f"base variant {name!r} is already registered")
    unknown = [m for m in variant.methods if m not in methods.METHODS]
    if unknown:
        raise ValueError(f"base variant {name!r}: unknown methods {unknown}")
    BASE_VARIANTS[name] = variant


def variant_step_times(spec: ModelSpec, base: nn.Module, warmup: int, steps: int) -> dict[str, Any]:
    """Step times of the variants listed in ``spec.extra['base_variants']``, one variant at a time."""
    results: dict[str, Any] = {}
    for name in spec.extra.get("base_variants", ()):
        variant = BASE_VARIANTS[name]
        variant_base = variant.prepare(copy.deepcopy(base))
        batch = spec.batch()
        trainers = [measure.Trainer(m, methods.build(m, spec, variant_base), spec, batch) for m in variant.methods]
        measure.settle()
        times = measure.train_step_times(trainers, warmup, steps)
        results[name] = {
            "label": variant.label,
            "methods": {
                t.name: {
                    "step_cpu_s": times[t.name]["cpu_s"],
                    "step_wall_s": times[t.name]["wall_s"],
                    "step_cpu_all_s": times[t.name]["cpu_all_s"],
                    "trainable_params": t.trainable_params,
                }
                for t in trainers
            },
        }
        del trainers, variant_base
        measure.settle()
    return results


__all__ = ["BASE_VARIANTS", "BaseVariant", "register_base_variant", "variant_step_times"]
