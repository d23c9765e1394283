"""Step time on other bases than fp32: the model cast to bf16, and loaded quantized (bitsandbytes, torchao).

Each base variant turns the fp32 benchmark model into another base (``prepare``), then the listed methods train
on it in interleaved rounds, exactly like the main step-time measurement. Quantized bases are the fp32 model
saved and reloaded through transformers' quantizers (``models.quantize``); PEFT's LoRA and SHiRA then use
their own quantized layers. A variant whose library is not installed is recorded as skipped, with the reason.
Another base is added with :func:`register_base_variant`; the report and the targets pick it up.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from . import measure, methods
from .models import ModelSpec, quantize


@dataclass(frozen=True)
class BaseVariant:
    """How to turn the fp32 base into this base, which methods train on it, and the packages it needs."""

    label: str
    prepare: Callable[[nn.Module], nn.Module]
    methods: tuple[str, ...] = ("lora_r8", "shira", "sparse", "sparse_block32", methods.LOWER_BOUND)
    requires: tuple[str, ...] = ()


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


# kind of models.quantization_config -> (label, package it needs)
QUANTIZED_BASES = {
    "bnb_nf4": ("bitsandbytes NF4 4-bit base (fp32 compute)", "bitsandbytes"),
    "bnb_int8": ("bitsandbytes int8 base (LLM.int8, has_fp16_weights=False)", "bitsandbytes"),
    "torchao_int8": ("torchao int8 weight-only base (Int8WeightOnlyConfig)", "torchao"),
}
for _kind, (_label, _package) in QUANTIZED_BASES.items():
    register_base_variant(
        _kind, BaseVariant(_label, functools.partial(quantize, kind=_kind), requires=(_package, "accelerate"))
    )


def method_step_times(
    spec: ModelSpec, base: nn.Module, names: list[str] | tuple[str, ...], warmup: int, steps: int
) -> dict[str, dict[str, Any]]:
    """Step times (median CPU and wall, per-round CPU) and trainable counts of ``names`` trained on ``base``."""
    batch = spec.batch()
    trainers = [measure.Trainer(m, methods.build(m, spec, base), spec, batch) for m in names]
    measure.settle()
    times = measure.train_step_times(trainers, warmup, steps)
    rows = {
        t.name: {
            "step_cpu_s": times[t.name]["cpu_s"],
            "step_wall_s": times[t.name]["wall_s"],
            "step_cpu_all_s": times[t.name]["cpu_all_s"],
            "trainable_params": t.trainable_params,
            "adapter_layers": _adapter_layer_types(t.model),
        }
        for t in trainers
    }
    del trainers
    measure.settle()
    return rows


def _adapter_layer_types(model: nn.Module) -> list[str]:
    """The PEFT tuner layer classes in ``model`` (e.g. PEFT's bitsandbytes LoRA layer on a 4-bit base)."""
    kinds = {type(m) for m in model.modules() if isinstance(m, BaseTunerLayer)}
    return sorted(f"{k.__module__}.{k.__qualname__}" for k in kinds)


def _weight_types(model: nn.Module, targets: list[str]) -> list[str]:
    """Type and dtype of the targeted base weights, e.g. ``Params4bit[torch.uint8]``."""
    weights = [m.weight for _, m in methods.targeted_linears(model, targets)]
    return sorted({f"{type(w).__name__}[{w.dtype}]" for w in weights})


def missing_packages(variant: BaseVariant) -> list[str]:
    return [p for p in variant.requires if importlib.util.find_spec(p) is None]


def variant_step_times(spec: ModelSpec, base: nn.Module, warmup: int, steps: int) -> dict[str, Any]:
    """Step times of the variants listed in ``spec.extra['base_variants']``, one variant at a time."""
    results: dict[str, Any] = {}
    for name in spec.extra.get("base_variants", ()):
        variant = BASE_VARIANTS[name]
        missing = missing_packages(variant)
        if missing:
            results[name] = {"label": variant.label, "skipped": f"not installed: {', '.join(missing)}"}
            continue
        variant_base = variant.prepare(copy.deepcopy(base))
        results[name] = {
            "label": variant.label,
            "weight_types": _weight_types(variant_base, spec.target_modules),
            "methods": method_step_times(spec, variant_base, variant.methods, warmup, steps),
        }
        del variant_base
        measure.settle()
    return results


__all__ = [
    "BASE_VARIANTS",
    "QUANTIZED_BASES",
    "BaseVariant",
    "method_step_times",
    "missing_packages",
    "register_base_variant",
    "variant_step_times",
]
