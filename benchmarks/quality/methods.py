"""Methods compared by the quality benchmark, at matched trainable-parameter counts.

Names: ``base`` (zero-shot), ``full`` (full fine-tuning), ``lora``, ``shira``, and
``sparse-<mask_init>[-b<block>][-reselect]``; any of lora/shira/sparse may end in ``-mlp`` (default targets:
``qkv``). ``-reselect`` (data-driven inits only) re-selects the mask from the task a few times early in training,
then freezes it (the research's recipe; see ``harness.reselect_steps``).

Adding a method kind: extend ``_NAME``, ``build_trainable``, ``save_expert``/``load_expert`` and, if its experts
merge, ``MERGES`` and ``merge_experts``; the harness and the report pick it up from there.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, ShiraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_sparse
from peft_sparse import SparseAdapterConfig
from peft_sparse.presets import resolve_preset

_NAME = re.compile(
    r"^(?P<kind>base|full|lora|shira|sparse)(-(?P<init>random|magnitude|snip|gradient|warmup))?"
    r"(-b(?P<block>\d+))?(?P<reselect>-reselect)?(-(?P<target>qkv|mlp))?$"
)


@dataclass(frozen=True)
class Method:
    """A parsed method name."""

    name: str
    kind: str
    mask_init: str | None = None
    block_size: int | None = None
    target: str = "qkv"
    reselect: bool = False

    @property
    def trains(self) -> bool:
        return self.kind != "base"

    @property
    def is_peft(self) -> bool:
        return self.kind in ("lora", "shira", "sparse")


def parse_method(name: str) -> Method:
    """Parse e.g. ``sparse-gradient-b16-mlp``; clear error for anything else."""
    match = _NAME.match(name)
    if (
        not match
        or (match["kind"] == "sparse") != bool(match["init"])
        or (match["block"] and match["kind"] != "sparse")
    ):
        raise ValueError(f"unknown method {name!r}; e.g. full, lora, shira, sparse-snip-b16-mlp")
    if match["kind"] in ("base", "full") and match["target"]:
        raise ValueError(f"method {name!r}: base/full take no target")
    if match["reselect"] and match["init"] not in ("snip", "gradient", "warmup"):
        raise ValueError(f"method {name!r}: -reselect needs a data-driven mask (snip, gradient or warmup)")
    block = int(match["block"]) if match["block"] else None
    return Method(name, match["kind"], match["init"], block, match["target"] or "qkv", bool(match["reselect"]))


def targets(method: Method, model_type: str) -> list[str] | str:
    return resolve_preset(method.target, model_type)


def build_trainable(base: nn.Module, method: Method, rank: int, seed: int) -> nn.Module:
    """A fresh trainable copy of ``base`` for ``method`` (the base itself is never modified)."""
    model = copy.deepcopy(base)
    if method.kind == "full":
        model.requires_grad_(True)
        return model
    if method.kind == "base":
        return model
    target_modules = targets(method, base.config.model_type)
    lora = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, lora_dropout=0.0)
    if method.kind == "lora":
        return get_peft_model(model, lora)
    if method.kind == "shira":
        return get_peft_model(model, ShiraConfig(r=rank, target_modules=target_modules, random_seed=seed))
    config = SparseAdapterConfig.from_lora_config(
        lora, mask_init=method.mask_init, block_size=method.block_size, seed=seed
    )
    return get_peft_model(model, config)


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors (e.g. a tied LM head) listed once, under their first name."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            state[name] = tensor
    return state


def save_expert(model: nn.Module, base: nn.Module, method: Method, directory: str) -> None:
    """PEFT methods: ``save_pretrained``; full fine-tuning: the weight delta as safetensors (tied weights once)."""
    if method.is_peft:
        model.save_pretrained(directory)
        return
    base_state = base.state_dict()
    delta = {k: (v.detach() - base_state[k]).contiguous() for k, v in unique_state(model).items()}
    save_file(delta, f"{directory}/full_delta.safetensors")


def load_expert(base: nn.Module, method: Method, directory: str, adapter_name: str = "default") -> nn.Module:
    """Rebuild one expert on a copy of ``base``."""
    model = copy.deepcopy(base)
    if method.is_peft:
        return PeftModel.from_pretrained(model, directory, adapter_name=adapter_name)
    if method.kind == "full":
        delta = load_file(f"{directory}/full_delta.safetensors")
        with torch.no_grad():
            for k, v in unique_state(model).items():
                v.add_(delta[k])
    return model


MERGES = {
    "sparse": ("sparse_average", "linear", "ties"),
    "lora": ("linear", "cat", "ties", "svd"),
    "full": ("average",),
}


def merge_experts(base: nn.Module, method: Method, directories: list[str], combination: str) -> nn.Module:
    """One model from many experts of ``method``: sparse / LoRA ``add_weighted_adapter``, or weight averaging."""
    n = len(directories)
    if method.kind == "full":
        model = copy.deepcopy(base)
        with torch.no_grad():
            state = unique_state(model)
            for directory in directories:
                for k, v in load_file(f"{directory}/full_delta.safetensors").items():
                    state[k].add_(v / n)
        return model
    if method.kind not in ("sparse", "lora"):
        raise ValueError(f"no merge for method {method.name}")
    names = [f"expert{i}" for i in range(n)]
    model = PeftModel.from_pretrained(copy.deepcopy(base), directories[0], adapter_name=names[0])
    for name, directory in zip(names[1:], directories[1:], strict=True):
        model.load_adapter(directory, adapter_name=name)
    kwargs: dict = {}
    if combination == "ties":
        weights, kwargs["density"] = [1.0] * n, 0.5
    else:
        weights = [1.0 / n] * n
    if method.kind == "lora" and combination == "svd":
        kwargs["svd_rank"] = max(model.peft_config[names[0]].r, 1)
    model.add_weighted_adapter(names, weights, "merged", combination_type=combination, **kwargs)
    model.set_adapter("merged")
    for name in names:
        model.delete_adapter(name)
    return model


__all__ = ["MERGES", "Method", "build_trainable", "load_expert", "merge_experts", "parse_method", "peft_sparse"]
