"""Combine several sparse adapters ("experts") into one.

Per layer every expert gives sorted flat ``indices`` (entries, or whole blocks for block adapters) and
``values`` of shape ``(n_i, k)`` (one row per entry or block, ``k = 1`` or ``block_size**2``). Experts are
aligned on the union of their indices and combined row-wise by a named method (:data:`COMBINATION_TYPES`).
The cost is proportional to the stored entries, never to the dense weight size.

The pure tensor functions come first; :func:`merge_adapters_from_disk` at the bottom drives them layer by
layer over saved adapter directories (all file handling lives in :mod:`peft_sparse.adapter_files`).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from peft.utils import merge_utils

from . import adapter_files, masks


@dataclass(frozen=True)
class MergeInputs:
    """What a combination method sees: experts aligned on the union of their indices."""

    values: torch.Tensor  # (n_experts, n_union, k), zeros where an expert has no entry
    present: torch.Tensor  # (n_experts, n_union) bool
    weights: torch.Tensor  # (n_experts,), same dtype as values
    density: float | None
    majority_sign_method: str
    generator: torch.Generator | None

    def rows(self) -> list[torch.Tensor]:
        """One flat ``(n_union * k,)`` tensor per expert, the layout PEFT's merge utilities expect."""
        return list(self.values.reshape(self.values.shape[0], -1).unbind(0))

    def unflatten(self, flat: torch.Tensor) -> torch.Tensor:
        """Back from ``(n_union * k,)`` to ``(n_union, k)``."""
        return flat.reshape(self.values.shape[1:])


@dataclass(frozen=True)
class MethodSpec:
    """A registered combination method and the options it uses."""

    fn: Callable[[MergeInputs], torch.Tensor]
    needs_density: bool = False
    uses_majority_sign: bool = False


_METHODS: dict[str, MethodSpec] = {}
MAJORITY_SIGN_METHODS = ("total", "frequency")


def combination_method(
    *names: str, needs_density: bool = False, uses_majority_sign: bool = False
) -> Callable[[Callable[[MergeInputs], torch.Tensor]], Callable[[MergeInputs], torch.Tensor]]:
    """Register ``fn(inputs) -> (n_union, k)`` under each of ``names``."""

    def register(fn: Callable[[MergeInputs], torch.Tensor]) -> Callable[[MergeInputs], torch.Tensor]:
        for name in names:
            if name in _METHODS:
                raise ValueError(f"combination type {name!r} is already registered")
            _METHODS[name] = MethodSpec(fn, needs_density, uses_majority_sign)
        return fn

    return register


def _with_generator(generator: torch.Generator | None, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run ``fn`` (which uses torch's global CPU RNG) on ``generator``'s stream, sparing the global RNG."""
    if generator is None:
        return fn()
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(generator.get_state())
        result = fn()
        generator.set_state(torch.get_rng_state())
    return result


def _peft(fn: Callable[..., torch.Tensor], inputs: MergeInputs, *args: object) -> torch.Tensor:
    """Apply a ``peft.utils.merge_utils`` function to the aligned rows (density 1: no pruning, no warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The density .* no pruning will be performed")
        flat = _with_generator(inputs.generator, lambda: fn(inputs.rows(), inputs.weights, *args))
    return inputs.unflatten(flat)


@combination_method("linear", "task_arithmetic")
def _weighted_sum(inputs: MergeInputs) -> torch.Tensor:
    """Σ w_i Δ_i."""
    return (inputs.values * inputs.weights[:, None, None]).sum(dim=0)


@combination_method("sparse_average")
def _sparse_average(inputs: MergeInputs) -> torch.Tensor:
    """Per entry, the weighted mean over only the experts that store it."""
    denominator = (inputs.present.to(inputs.weights.dtype) * inputs.weights[:, None]).sum(dim=0)
    if bool((denominator == 0).any()):
        raise ValueError("sparse_average: the weights of the experts storing some entry sum to 0")
    return _weighted_sum(inputs) / denominator[:, None]


@combination_method("ties", needs_density=True, uses_majority_sign=True)
def _ties(inputs: MergeInputs) -> torch.Tensor:
    return _peft(merge_utils.ties, inputs, inputs.density, inputs.majority_sign_method)


@combination_method("dare_linear", needs_density=True)
def _dare_linear(inputs: MergeInputs) -> torch.Tensor:
    return _peft(merge_utils.dare_linear, inputs, inputs.density)


@combination_method("dare_ties", needs_density=True, uses_majority_sign=True)
def _dare_ties(inputs: MergeInputs) -> torch.Tensor:
    return _peft(merge_utils.dare_ties, inputs, inputs.density, inputs.majority_sign_method)


@combination_method("magnitude_prune", needs_density=True)
def _magnitude_prune(inputs: MergeInputs) -> torch.Tensor:
    return _peft(merge_utils.magnitude_prune, inputs, inputs.density)


COMBINATION_TYPES: tuple[str, ...] = tuple(_METHODS)


def check_merge_options(
    num_experts: int,
    weights: Sequence[float] | torch.Tensor | None,
    combination_type: str,
    density: float | None = None,
    majority_sign_method: str = "total",
) -> list[float]:
    """Validate the options of a merge (``ValueError`` naming the problem); return the weights as floats."""
    if num_experts < 1:
        raise ValueError("need at least one expert to merge")
    if combination_type not in _METHODS:
        raise ValueError(f"unknown combination_type {combination_type!r}; valid: {', '.join(_METHODS)}")
    spec = _METHODS[combination_type]
    if weights is None:
        weight_list = [1.0] * num_experts
    else:
        weight_list = [float(w) for w in (weights.tolist() if isinstance(weights, torch.Tensor) else weights)]
    if len(weight_list) != num_experts:
        raise ValueError(f"got {len(weight_list)} weights for {num_experts} experts")
    if not all(math.isfinite(w) for w in weight_list):
        raise ValueError(f"weights must be finite, got {weight_list}")
    if spec.needs_density:
        if density is None:
            raise ValueError(f"combination_type {combination_type!r} needs density in (0, 1]")
        if not (isinstance(density, int | float) and 0.0 < float(density) <= 1.0):
            raise ValueError(f"density must be in (0, 1], got {density!r}")
    elif density is not None:
        raise ValueError(f"density is not used by combination_type {combination_type!r}")
    if spec.uses_majority_sign and majority_sign_method not in MAJORITY_SIGN_METHODS:
        raise ValueError(
            f"majority_sign_method must be one of {MAJORITY_SIGN_METHODS}, got {majority_sign_method!r}"
        )
    return weight_list


def _check_experts(indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> int:
    """Validate shapes and index order; return the row width ``k``."""
    if len(indices) == 0:
        raise ValueError("need at least one expert to merge")
    if len(indices) != len(values):
        raise ValueError(f"got {len(indices)} index tensors but {len(values)} value tensors")
    width: int | None = None
    for i, (idx, val) in enumerate(zip(indices, values, strict=True)):
        if idx.dim() != 1 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise ValueError(f"expert {i}: indices must be 1-D integers, got {idx.dtype} {tuple(idx.shape)}")
        if val.dim() != 2 or not val.dtype.is_floating_point:
            raise ValueError(f"expert {i}: values must be a 2-D float tensor (n, k), got {tuple(val.shape)}")
        if val.shape[0] != idx.numel():
            raise ValueError(f"expert {i}: {idx.numel()} indices but {val.shape[0]} value rows")
        if width is None:
            width = val.shape[1]
        elif val.shape[1] != width:
            raise ValueError(f"expert {i}: rows of width k={val.shape[1]}, expert 0 has k={width}")
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"expert {i}: negative index")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError(f"expert {i}: indices must be sorted and free of duplicates")
    assert width is not None
    return width


def align_on_union(
    indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align experts on the union of their indices.

    Returns the union (int64, sorted), the values on it ``(n_experts, n_union, k)`` with zeros where an expert
    has no entry, and the presence mask ``(n_experts, n_union)``.
    """
    width = _check_experts(indices, values)
    dtype = values[0].dtype
    for val in values[1:]:
        dtype = torch.promote_types(dtype, val.dtype)
    device = values[0].device
    union = torch.unique(torch.cat([idx.to(device=device, dtype=torch.int64) for idx in indices]))
    aligned = torch.zeros(len(values), union.numel(), width, dtype=dtype, device=device)
    present = torch.zeros(len(values), union.numel(), dtype=torch.bool, device=device)
    for i, (idx, val) in enumerate(zip(indices, values, strict=True)):
        positions = torch.searchsorted(union, idx.to(device=device, dtype=torch.int64))
        aligned[i, positions] = val.to(device=device, dtype=dtype)
        present[i, positions] = True
    return union, aligned, present


_ENTRYWISE = {"linear": False, "task_arithmetic": False, "sparse_average": True}


def merge_entrywise(
    indices: Sequence[torch.Tensor], values: Sequence[torch.Tensor], weights: Sequence[float], average: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ wᵢ·Δᵢ (or its per-entry mean over the experts storing each entry) by scatter-adds over stored entries.

    Costs O(total stored entries), unlike aligning every expert on the whole union; equals the aligned
    ``linear`` / ``sparse_average`` methods.
    """
    width = _check_experts(indices, values)
    dtype = values[0].dtype
    for val in values[1:]:
        dtype = torch.promote_types(dtype, val.dtype)
    compute = torch.promote_types(dtype, torch.float32)
    device = values[0].device
    flat = [idx.to(device=device, dtype=torch.int64) for idx in indices]
    if all(f.numel() == flat[0].numel() and torch.equal(f, flat[0]) for f in flat[1:]):
        union, inverse = flat[0], None  # one shared mask: no union to build
    else:
        union, inverse = torch.unique(torch.cat(flat), return_inverse=True)
    merged = torch.zeros(union.numel(), width, dtype=compute, device=device)
    denominator = torch.zeros(union.numel(), dtype=compute, device=device) if average else None
    start = 0
    for idx, val, weight in zip(flat, values, weights, strict=True):
        contribution = val.to(device=device, dtype=compute) * weight
        if inverse is None:  # every expert stores exactly the union, in order
            merged += contribution
            if denominator is not None:
                denominator += weight
        else:
            rows = inverse[start : start + idx.numel()]
            merged.index_add_(0, rows, contribution)
            if denominator is not None:
                denominator.index_add_(0, rows, torch.full((idx.numel(),), weight, dtype=compute, device=device))
        start += idx.numel()
    if denominator is not None:
        if bool((denominator == 0).any()):
            raise ValueError("sparse_average: the weights of the experts storing some entry sum to 0")
        merged /= denominator[:, None]
    return union, merged.to(dtype)


def merge_layer(
    indices: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    weights: Sequence[float] | torch.Tensor | None = None,
    combination_type: str = "sparse_average",
    density: float | None = None,
    majority_sign_method: str = "total",
    drop_zeros: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one layer of several experts into ``(union_indices, merged_values)``.

    ``union_indices`` is int64 and sorted; ``merged_values`` has shape ``(n_union, k)``.

    ``weights`` defaults to 1 per expert. ``density`` (required by ties / dare_* / magnitude_prune) is the
    fraction of each expert's row over the *union* of stored positions that survives pruning. ``generator``
    (a CPU ``torch.Generator``) drives dare's random drops; without it torch's global RNG is used. With
    ``drop_zeros`` union rows whose merged values are all exactly 0 are removed.
    """
    weight_list = check_merge_options(len(indices), weights, combination_type, density, majority_sign_method)
    if combination_type in _ENTRYWISE:
        union, merged = merge_entrywise(indices, values, weight_list, _ENTRYWISE[combination_type])
        if drop_zeros:
            keep = (merged != 0).any(dim=1)
            union, merged = union[keep], merged[keep]
        return union, merged
    union, aligned, present = align_on_union(indices, values)
    out_dtype = aligned.dtype
    compute = torch.promote_types(out_dtype, torch.float32)
    inputs = MergeInputs(
        values=aligned.to(compute),
        present=present,
        weights=torch.tensor(weight_list, dtype=compute, device=aligned.device),
        density=None if density is None else float(density),
        majority_sign_method=majority_sign_method,
        generator=generator,
    )
    merged = _METHODS[combination_type].fn(inputs).to(out_dtype)
    if drop_zeros:
        keep = (merged != 0).any(dim=1)
        union, merged = union[keep], merged[keep]
    return union, merged


def merge_adapters_from_disk(
    adapter_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    combination_type: str = "sparse_average",
    weights: Sequence[float] | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    drop_zeros: bool = False,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Merge saved sparse adapters layer by layer into a new adapter directory ``out_dir``; returns its path.

    Layers are processed in sorted name order with one ``torch.Generator`` seeded by ``seed`` (dare methods).
    Nothing is written unless every layer merges; the output directory appears atomically.
    """
    from tqdm.auto import tqdm

    dirs = [Path(d) for d in adapter_dirs]
    weight_list = check_merge_options(len(dirs), weights, combination_type, density, majority_sign_method)
    out = Path(out_dir)
    adapter_files.check_output_dir(out, overwrite)
    if any(out.resolve() == d.resolve() for d in dirs):
        raise ValueError(f"output directory {out} is one of the input adapters")
    generator = torch.Generator().manual_seed(int(seed))
    # safetensors cannot append tensor by tensor, so the merged tensors are collected in memory; the merged
    # adapter is small (stored entries only). Inputs are read one layer at a time, so peak memory beyond the
    # output is one layer's union.
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    with ExitStack() as stack:
        adapters = [stack.enter_context(adapter_files.SparseAdapterFile(d)) for d in dirs]
        adapter_files.check_compatible(adapters)
        first = adapters[0]
        for layer in tqdm(first.layer_names, desc="merging", unit="layer", disable=not progress):
            parts = [adapter.read_layer(layer) for adapter in adapters]
            union, merged = merge_layer(
                [p[0] for p in parts],
                [p[1] for p in parts],
                weight_list,
                combination_type,
                density=density,
                majority_sign_method=majority_sign_method,
                drop_zeros=drop_zeros,
                generator=generator,
            )
            del parts
            tensors[adapter_files.values_key(layer)] = merged.reshape(-1).contiguous()
            tensors[adapter_files.indices_key(layer)] = union.to(masks.index_dtype(first.num_slots(layer)))
            counts[layer] = int(union.numel())
        config = copy.deepcopy(first.config)
    config["entries_pattern"] = {layer: counts[layer] for layer in config["entries_pattern"]}
    options = [f"combination_type: `{combination_type}`", f"weights: {weight_list}"]
    if density is not None:
        options.append(f"density: {density}")
    if _METHODS[combination_type].uses_majority_sign:
        options.append(f"majority_sign_method: `{majority_sign_method}`")
    if combination_type.startswith("dare"):
        options.append(f"seed: {seed}")
    if drop_zeros:
        options.append("drop_zeros")
    details = [
        f"Merged from {len(dirs)} sparse adapters: {', '.join(d.name or str(d) for d in dirs)}",
        ", ".join(options),
        f"Stored rows after merging: {sum(counts.values())}",
    ]
    readme = adapter_files.model_card("Merged peft-sparse adapter", details)
    return adapter_files.write_adapter_dir(out, config, tensors, readme, overwrite=overwrite)


__all__ = [
    "COMBINATION_TYPES",
    "MAJORITY_SIGN_METHODS",
    "MergeInputs",
    "align_on_union",
    "check_merge_options",
    "combination_method",
    "merge_adapters_from_disk",
    "merge_layer",
]
