"""Sharded-parameter helpers: FSDP2 (DTensor), FSDP1 (``FullyShardedDataParallel``) and DeepSpeed ZeRO-3.

Masks are chosen from whole weights and the values are reset in place, so the code that scores weights or changes
masks goes through these helpers; under plain single-process or DDP training they do nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .registration import gather_params_ctx

# prefixes the wrappers insert into module names (FSDP1, activation checkpointing, torch.compile)
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def is_dtensor(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (FSDP2 shards its parameters as DTensors)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is sharded by FSDP2 (DTensor), FSDP1 (a view into a flat parameter) or ZeRO-3."""
    return is_dtensor(param) or hasattr(param, "ds_id") or bool(getattr(param, "_is_flat_param", False)) or (
        getattr(param, "_fsdp_flattened", False)
    )


def clean_module_name(name: str) -> str:
    """``name`` without the prefixes FSDP1 / checkpoint / compile wrappers insert (the name PEFT saved)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP1 / DeepSpeed-engine wrappers (their ``.module``)."""
    while type(model).__name__ in ("DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"):
        model = model.module
    return model


def fsdp1_root(model: nn.Module) -> nn.Module | None:
    """The outermost FSDP1 ``FullyShardedDataParallel`` module in ``model``, if any."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return None
    return next((m for m in model.modules() if isinstance(m, FullyShardedDataParallel)), None)


def full_params(model: nn.Module):
    """Context in which FSDP1 parameters are whole and in-place changes are written back (no-op otherwise)."""
    root = fsdp1_root(model)
    if root is None:
        return nullcontext()
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(root, writeback=True, rank0_only=False, with_grads=False)


@contextmanager
def full_weight(module: nn.Module) -> Iterator[torch.Tensor]:
    """The whole ``module.weight``, detached: gathered under ZeRO-3, ``full_tensor()`` under FSDP2.

    Quantized bases are read through ``quantized.dequantized_weight`` instead (``SparseAdapterLayer.logical_weight``).
    """
    weight = module.weight
    with gather_params_ctx(weight, modifier_rank=None):  # ZeRO-3: all-gather, read only
        yield weight.detach().full_tensor() if is_dtensor(weight) else weight.detach()


__all__ = ["clean_module_name", "full_params", "full_weight", "fsdp1_root", "is_dtensor", "is_sharded", "unwrap"]
