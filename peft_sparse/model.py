"""``SparseAdapterModel``: the PEFT ``BaseTuner`` that finds targets, plans budgets and injects layers."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import get_pattern_key
from torch import nn

from . import masks, quantized
from .config import SparseAdapterConfig
from .distributed import full_weight
from .layer import SUPPORTED_BASE_LAYERS, Linear, SparseAdapterLayer, storage_shape
from .presets import is_preset, resolve_preset
from .registration import PREFIX, _maybe_include_all_linear_layers
from .routing import check_mergeable


def _lora_entries(config: SparseAdapterConfig, key: str, shape: tuple[int, int]) -> int:
    pattern = get_pattern_key(list(config.lora_rank_pattern), key) if config.lora_rank_pattern else None
    rank = config.lora_rank_pattern.get(pattern, config.lora_rank) if pattern else config.lora_rank
    return int(rank) * (shape[0] + shape[1])


def plan_budget(config: SparseAdapterConfig, shapes: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Stored rows (entries or blocks) for every new target, from the config's budget fields."""
    block = config.block_size
    if block is not None:
        too_small = {key: shape for key, shape in shapes.items() if block > min(shape)}
        if too_small:
            key, shape = next(iter(too_small.items()))
            raise ValueError(
                f"block_size={block} is larger than the weight of {key!r} (shape {tuple(shape)}): its blocks would "
                "store padding beyond the weight's edge, counted as trainable parameters. Use block_size <= "
                f"{min(min(s) for s in shapes.values())} (the smallest targeted dimension) or exclude the "
                f"{len(too_small)} module(s) with a smaller dimension"
            )
    sizes = {key: shape[0] * shape[1] for key, shape in shapes.items()}
    if config.num_params is not None:
        # split in selectable units (entries or blocks) so the stored total is exactly the budget
        units = int(config.num_params) if block is None else max(1, round(int(config.num_params) / block**2))
        if int(config.num_params) > sum(sizes.values()):
            raise ValueError(
                f"budget of {config.num_params} entries exceeds the {sum(sizes.values())} entries of the targets"
            )
        return masks.split_budget(units, {key: masks.num_slots(shape, block) for key, shape in shapes.items()})
    if config.lora_rank is not None:
        entries = {key: _lora_entries(config, key, shape) for key, shape in shapes.items()}
        if block is not None:  # whole blocks over all targets, so the total stays LoRA's (within half a block)
            for key, count in entries.items():
                if count > sizes[key]:
                    raise ValueError(f"budget of {count} entries for {key!r} exceeds its {sizes[key]} weight entries")
            units = max(1, round(sum(entries.values()) / block**2))
            split = masks.split_budget(units, entries)
            return {key: min(rows, masks.num_slots(shapes[key], block)) for key, rows in split.items()}
    else:
        entries = {key: float(config.keep_ratio) * size for key, size in sizes.items()}
    rows = {}
    for key, shape in shapes.items():
        if entries[key] > sizes[key]:
            raise ValueError(
                f"budget of {int(entries[key])} entries for {key!r} exceeds its {sizes[key]} weight entries"
            )
        rows[key] = masks.entries_to_rows(entries[key], shape, block)
    return rows


class SparseAdapterModel(BaseTuner):
    """Sparse adapters on a transformers model; created by ``get_peft_model`` with a ``SparseAdapterConfig``."""

    prefix: str = PREFIX
    tuner_layer_cls = SparseAdapterLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    # --- target discovery and budget planning (before any module is replaced) -------------------------------
    def _prepare_adapter_config(self, peft_config: SparseAdapterConfig, model_config: dict) -> SparseAdapterConfig:
        if is_preset(peft_config.target_modules):
            peft_config.target_modules = resolve_preset(peft_config.target_modules, model_config.get("model_type"))
        peft_config = super()._prepare_adapter_config(peft_config, model_config)
        return _maybe_include_all_linear_layers(peft_config, self.model)

    def _prepare_model(self, peft_config: SparseAdapterConfig, model: nn.Module) -> None:
        """Check every target and fill in ``entries_pattern`` / ``weight_shapes`` so the config alone reloads."""
        tuner_prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
        new_shapes: dict[str, tuple[int, int]] = {}
        requantize_config = quantized.quantization_kwargs(model).get("get_apply_tensor_subclass")
        for key, module in model.named_modules():
            if (
                not key
                or any(key.startswith(p) for p in tuner_prefixes)
                or not check_target_module_exists(peft_config, key)
            ):
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            backend = quantized.resolve_backend(base, key, requantize_config)  # refuses unsupported quantizations
            if not isinstance(base, SUPPORTED_BASE_LAYERS):
                raise TypeError(
                    f"target module {key!r} is a {type(base).__name__}; sparse adapters support nn.Linear and "
                    "transformers Conv1D. Narrow target_modules or add it to exclude_modules."
                )
            shape = storage_shape(base, backend is not None)
            saved = peft_config.weight_shapes.get(key)
            if saved is not None and tuple(saved) != shape:
                raise ValueError(f"adapter was made for {key!r} with weight shape {tuple(saved)}, model has {shape}")
            if key not in peft_config.entries_pattern:
                new_shapes[key] = shape
            else:
                capacity = masks.num_slots(shape, peft_config.block_size)
                if int(peft_config.entries_pattern[key]) > capacity:
                    raise ValueError(
                        f"entries_pattern[{key!r}] = {peft_config.entries_pattern[key]} exceeds {capacity} positions"
                    )
        planned = plan_budget(peft_config, new_shapes) if new_shapes else {}
        quantized.keep_bnb_training_layout(model)  # all checks passed: gradients must pass every 4-bit layer
        peft_config.entries_pattern.update(planned)
        for key, shape in new_shapes.items():
            peft_config.weight_shapes[key] = list(shape)

    def _create_and_replace(
        self,
        peft_config: SparseAdapterConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if peft_config.fan_in_fan_out != (not isinstance(base, nn.Linear)):
            warnings.warn(
                f"fan_in_fan_out={peft_config.fan_in_fan_out} ignored for {current_key}: the storage layout is "
                f"taken from the module type ({type(base).__name__})",
                stacklevel=2,
            )
        quantization = quantized.quantization_kwargs(self.model)
        backend = quantized.resolve_backend(base, current_key, quantization.get("get_apply_tensor_subclass"))
        if getattr(self, "_placeholder_masks", False):  # add_weighted_adapter sets the real mask right after
            rows = int(peft_config.entries_pattern[current_key])
            shape = storage_shape(base, backend is not None)
            indices = torch.arange(rows, dtype=masks.index_dtype(masks.num_slots(shape, None)))
        else:
            if backend is None:
                with full_weight(base) as weight:  # ZeRO-3 partitions the weight: gather it (read only) to score it
                    indices = initial_mask(peft_config, adapter_name, current_key, weight)
            else:  # scores come from the logical weight: dequantized (transiently) for a quantized base
                weight = quantized.dequantized_weight(backend, base)
                indices = initial_mask(peft_config, adapter_name, current_key, weight)
        if isinstance(target, SparseAdapterLayer):
            target.update_layer(adapter_name, indices, peft_config.block_size, init_weights=peft_config.init_weights)
            return
        new_module = Linear(
            target,
            adapter_name,
            indices,
            peft_config.block_size,
            peft_config.init_weights,
            module_name=current_key,
            **quantization,
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # --- merging with all-or-nothing safety ----------------------------------------------------------------
    def _sparse_layers(self) -> list[SparseAdapterLayer]:
        return [m for m in self.model.modules() if isinstance(m, SparseAdapterLayer)]

    def _check_finite_merge(self, adapter_names: list[str] | None) -> None:
        for layer in self._sparse_layers():
            names = adapter_names if adapter_names is not None else layer.active_adapters
            names = [n for n in names if n in layer.sparse_adapter_values and n not in layer.merged_adapters]
            if names and not layer.merged_weight_is_finite(names):
                raise ValueError(f"NaNs detected in the merged weights; the adapters {names} seem to be broken")

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge into the base weights; with ``safe_merge`` every layer is checked before any is touched."""
        check_mergeable(self.model, adapter_names)
        if safe_merge:
            self._check_finite_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=False)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            check_mergeable(self.model, adapter_names)
        if merge and safe_merge:
            self._check_finite_merge(adapter_names)
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=False, adapter_names=adapter_names
        )

    # --- combining experts -------------------------------------------------------------------------------
    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "sparse_average",
        density: float | None = None,
        majority_sign_method: str = "total",
        drop_zeros: bool = False,
        seed: int = 0,
    ) -> None:
        """Merge sparse adapters into a new adapter ``adapter_name`` whose mask is the union of theirs.

        ``combination_type``: ``linear`` / ``task_arithmetic`` (Σ wᵢΔᵢ), ``sparse_average`` (per entry, the
        weighted mean over the experts that contain it), ``ties``, ``dare_linear``, ``dare_ties``,
        ``magnitude_prune`` (PEFT's merge_utils on the experts' values aligned on the union; ``density`` is
        relative to the union). Nothing changes if any check fails.
        """
        from .merging import merge_layer

        self._check_weighted_merge(adapters, weights, adapter_name)
        configs = [self.peft_config[a] for a in adapters]
        generator = torch.Generator().manual_seed(seed)
        planned: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, layer in self.model.named_modules():
            if not isinstance(layer, SparseAdapterLayer):
                continue
            present = [a for a in adapters if a in layer.sparse_adapter_values]
            if not present:
                continue
            if len(present) != len(adapters):
                raise ValueError(f"adapters {sorted(set(adapters) - set(present))} do not target {key!r}")
            width = layer.entry_width(adapters[0])
            values = [
                (layer.sparse_adapter_values[a].detach() * layer.scaling[a]).float().view(-1, width) for a in adapters
            ]
            indices = [layer.sparse_adapter_indices[a] for a in adapters]
            union, merged = merge_layer(
                indices, values, weights, combination_type, density, majority_sign_method, drop_zeros, generator
            )
            planned[key] = (union.to(masks.index_dtype(layer.num_positions(adapters[0]))), merged.reshape(-1))
        new_config = copy.deepcopy(configs[0])
        new_config.entries_pattern = {key: int(union.numel()) for key, (union, _) in planned.items()}
        new_config.inference_mode = True
        self.peft_config[adapter_name] = new_config
        self._placeholder_masks = True
        try:
            self.inject_adapter(self.model, adapter_name)
        except Exception:
            del self.peft_config[adapter_name]
            raise
        finally:
            self._placeholder_masks = False
        for key, layer in self.model.named_modules():
            if key in planned:
                union, merged = planned[key]
                layer.set_mask(adapter_name, union)
                values = layer.sparse_adapter_values[adapter_name]
                values.data = merged.to(device=values.device, dtype=values.dtype)
        self._mark_only_adapters_as_trainable(self.model)

    def _check_weighted_merge(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists")
        if not adapters:
            raise ValueError("adapters must not be empty")
        unknown = [a for a in adapters if a not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapters {unknown}; available: {sorted(self.peft_config)}")
        if len(weights) != len(adapters):
            raise ValueError(f"got {len(weights)} weights for {len(adapters)} adapters")
        if not all(math.isfinite(float(w)) for w in weights):
            raise ValueError(f"weights must be finite, got {weights}")
        configs = [self.peft_config[a] for a in adapters]
        if not all(isinstance(c, SparseAdapterConfig) for c in configs):
            raise ValueError("add_weighted_adapter combines sparse adapters only")
        if len({c.block_size for c in configs}) != 1:
            raise ValueError(f"cannot merge adapters with different block_size {[c.block_size for c in configs]}")
        if any(c.modules_to_save for c in configs):
            raise ValueError("adapters with modules_to_save cannot be merged (their dense modules are not sparse)")
        if any(c.trainable_token_indices for c in configs):
            raise ValueError("adapters with trainable_token_indices cannot be merged (their embedding rows are dense)")
        targets = [set(c.entries_pattern) for c in configs]
        if any(t != targets[0] for t in targets[1:]):
            raise ValueError("adapters target different modules and cannot be merged")
        shapes = [c.weight_shapes for c in configs]
        if any(s != shapes[0] for s in shapes[1:]):
            raise ValueError("adapters were made for different weight shapes")

    # --- load-time validation --------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SparseAdapterConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        validate_checkpoint(model, adapter_name, remapped)
        return remapped


def initial_mask(config: SparseAdapterConfig, adapter_name: str, key: str, weight: torch.Tensor) -> torch.Tensor:
    """Mask chosen at injection: random or magnitude; data-driven inits start from magnitude until calibrated."""
    shape = tuple(weight.shape)
    rows = int(config.entries_pattern[key])
    if config.mask_init == "random":
        seed = masks.layer_seed(config.seed, adapter_name, key)
        return masks.random_indices(masks.num_slots(shape, config.block_size), rows, seed)
    if weight.device.type == "meta":
        return torch.arange(rows, dtype=masks.index_dtype(masks.num_slots(shape, config.block_size)))
    return masks.select(masks.score(weight, None, "magnitude"), rows, config.block_size)


def validate_checkpoint(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Refuse checkpoint indices that are out of range, unsorted, duplicated or of the wrong count."""
    for name, module in model.named_modules():
        if not isinstance(module, SparseAdapterLayer) or adapter_name not in module.sparse_adapter_values:
            continue
        prefix = f"{name}." if name else ""
        index_key = f"{prefix}sparse_adapter_indices.{adapter_name}"
        value_key = f"{prefix}sparse_adapter_values.{adapter_name}"
        if value_key not in state_dict and index_key not in state_dict:
            continue
        if (value_key in state_dict) != (index_key in state_dict):
            raise ValueError(f"checkpoint for {name!r} has values or indices but not both")
        expected = module.sparse_adapter_indices[adapter_name].numel()
        masks.check_indices(state_dict[index_key], module.num_positions(adapter_name), expected, name)
        width = module.entry_width(adapter_name)
        if state_dict[value_key].numel() != expected * width:
            raise ValueError(
                f"{name}: checkpoint has {state_dict[value_key].numel()} values, expected {expected * width}"
            )
