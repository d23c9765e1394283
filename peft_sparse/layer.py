"""``SparseAdapterLayer``: a frozen ``nn.Linear`` / GPT-2 ``Conv1D`` plus sparse deltas per adapter.

Per adapter the layer stores only a 1-D values parameter and a sorted flat index buffer in the base weight's
own storage layout (``(out, in)`` for Linear, ``(in, out)`` for Conv1D). Block adapters store one index per
``block_size x block_size`` block and ``block_size**2`` values per block (row-major inside the block; slots
beyond a ragged edge are inert padding: no effect, zero gradient).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils import quantization_extra_repr
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import masks, quantized
from .distributed import is_sharded
from .ops import block_sparse_delta, block_sparse_linear, sparse_delta, sparse_linear
from .registration import BufferDict, gather_params_ctx

SUPPORTED_BASE_LAYERS = (nn.Linear, Conv1D)


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Dtype of new adapter values: fp32 on half-precision (and integer) bases, like PEFT's
    ``autocast_adapter_dtype=True`` for LoRA, so small deltas are not rounded away; else the weight's."""
    return weight_dtype if weight_dtype in (torch.float32, torch.float64) else torch.float32


def storage_shape(base_layer: nn.Module, quantized_base: bool = False) -> tuple[int, int]:
    """Shape of the base weight's layout: (out, in) for Linear, (in, out) for Conv1D.

    For a quantized base (``quantized_base``) this is the logical (dequantized) shape, not the packed storage;
    under DeepSpeed ZeRO-3 (a partitioned weight) it is the whole weight's ``ds_shape``.
    """
    if quantized_base:
        return quantized.logical_shape(base_layer)
    weight = base_layer.weight
    return tuple(getattr(weight, "ds_shape", weight.shape))  # type: ignore[return-value]


def _check_before_load(layer: SparseAdapterLayer, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: refuse corrupt incoming adapter state before this layer loads any of it."""
    for name in list(layer.sparse_adapter_values):
        index_key, value_key = f"{prefix}sparse_adapter_indices.{name}", f"{prefix}sparse_adapter_values.{name}"
        if index_key not in state_dict and value_key not in state_dict:
            continue
        indices = state_dict.get(index_key, layer.sparse_adapter_indices[name])
        values = state_dict.get(value_key, layer.sparse_adapter_values[name])
        layer.check_state(name, indices, values)


class SparseAdapterLayer(BaseTunerLayer):
    """Sparse deltas on a frozen weight; forward is ``base(x) + x @ ΔW`` with ΔW sparse."""

    adapter_layer_names = ("sparse_adapter_values",)
    other_param_names = ("sparse_adapter_indices", "block_size", "scaling")
    router: Any = None  # an Arrow router (peft_sparse.routing.ArrowRouter) when the layer routes between experts

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.sparse_adapter_values = nn.ParameterDict({})
        self.sparse_adapter_indices = BufferDict({}, persistent=True)
        self.block_size: dict[str, int | None] = {}
        self.scaling: dict[str, float] = {}
        self._validated: dict[str, tuple[int, int, int]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not isinstance(base, SUPPORTED_BASE_LAYERS):
            raise TypeError(f"sparse adapters support nn.Linear and transformers Conv1D, got {type(base).__name__}")
        # PEFT's backend for a quantized base (None if plain); refuses unsupported quantizations
        self.quantization_backend = quantized.resolve_backend(
            base, kwargs.get("module_name") or type(base).__name__, kwargs.get("get_apply_tensor_subclass")
        )
        self.transposed = isinstance(base, Conv1D)
        self.shape = storage_shape(base, self.quantization_backend is not None)
        self.in_features, self.out_features = (self.shape[0], self.shape[1]) if self.transposed else self.shape[::-1]
        self.module_name: str | None = kwargs.get("module_name")  # for error messages
        self.kwargs = kwargs
        if isinstance(self, nn.Module):
            self.register_load_state_dict_pre_hook(_check_before_load)

    # --- adapter state -------------------------------------------------------------------------------------
    def update_layer(
        self,
        adapter_name: str,
        indices: torch.Tensor,
        block_size: int | None,
        init_weights: bool = True,
        inference_mode: bool = False,
    ) -> None:
        """Create (or replace) ``adapter_name`` with the given mask and zero (or random) values."""
        containers = (self.sparse_adapter_values, self.sparse_adapter_indices)
        if "." in adapter_name or any(hasattr(c, adapter_name) and adapter_name not in c for c in containers):
            raise ValueError(f"adapter name {adapter_name!r} clashes with a container attribute; choose another")
        self.block_size[adapter_name] = block_size
        self.scaling[adapter_name] = 1.0
        width = 1 if block_size is None else block_size**2
        weight = self.get_base_layer().weight
        dtype = torch.float32 if self.quantization_backend is not None else adapter_dtype(weight.dtype)
        values = torch.zeros(indices.numel() * width, dtype=dtype, device=weight.device)
        if not init_weights:
            values.normal_(std=0.02)
        self.sparse_adapter_indices[adapter_name] = indices.to(weight.device)
        self.sparse_adapter_values[adapter_name] = nn.Parameter(values)
        if block_size is not None and not init_weights:
            self._zero_padding(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.check_adapter(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_mask(self, adapter_name: str, indices: torch.Tensor) -> None:
        """Replace the mask and reset the values to zero, keeping the same Parameter object (optimizer-safe).

        Bad indices (out of range, unsorted, duplicated) are refused before anything changes. Same size: the
        values are zeroed in place, which also reaches the storage FSDP2 (DTensor shards), FSDP1 (flat-parameter
        views) and ZeRO-3 (partitions, gathered here) read from. A new size replaces ``.data``, which sharded
        parameters cannot take, so that case is refused for them before anything changes.
        """
        values = self.sparse_adapter_values[adapter_name]
        masks.check_indices(indices, self.num_positions(adapter_name), None, self._where(adapter_name))
        size = indices.numel() * self.entry_width(adapter_name)
        same_size = size == getattr(values, "ds_numel", values.numel())  # ZeRO-3 partitions report 0 locally
        if not same_size and is_sharded(values):
            raise ValueError(
                f"cannot resize the sharded values of sparse adapter {adapter_name!r} on {self.module_name} "
                f"({values.numel()} -> {size}) under FSDP / ZeRO-3; keep the per-layer sizes (budget_scope='layer')"
            )
        self.sparse_adapter_indices[adapter_name] = indices.to(values.device)
        with torch.no_grad():
            if same_size:
                with gather_params_ctx(values, modifier_rank=0):
                    values.zero_()
            else:
                values.data = torch.zeros(size, dtype=values.dtype, device=values.device)
        values.grad = None
        self._validated[adapter_name] = self._state_key(adapter_name)

    def entry_width(self, adapter_name: str) -> int:
        block = self.block_size[adapter_name]
        return 1 if block is None else block**2

    def num_positions(self, adapter_name: str) -> int:
        """Selectable positions: weight entries or grid blocks."""
        return masks.num_slots(self.shape, self.block_size[adapter_name])

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.scaling:
            self.scaling[adapter] = scale

    def _where(self, adapter_name: str) -> str:
        layer = f"{type(self.get_base_layer()).__name__}{tuple(self.shape)}"
        return f"sparse adapter {adapter_name!r} on {f'{self.module_name} ({layer})' if self.module_name else layer}"

    def _state_key(self, adapter_name: str) -> tuple[int, int, int]:
        indices = self.sparse_adapter_indices[adapter_name]
        return id(indices), indices._version, self.sparse_adapter_values[adapter_name].numel()

    def check_adapter(self, adapter_name: str) -> None:
        """Refuse corrupt state (indices out of range, unsorted, duplicated, or a count mismatch).

        Runs when the state is set: ``update_layer``, ``set_mask``, ``load_state_dict`` (and PEFT's checkpoint
        loading, which checks the file before loading it), never inside a compiled forward."""
        indices, values = self.sparse_adapter_indices[adapter_name], self.sparse_adapter_values[adapter_name]
        self.check_state(adapter_name, indices, values)
        self._validated[adapter_name] = self._state_key(adapter_name)

    def check_state(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the layer if ``indices`` / ``values`` are not a valid state for it."""
        where = self._where(adapter_name)
        masks.check_indices(indices, self.num_positions(adapter_name), None, where)
        if values.dim() != 1 or values.numel() != indices.numel() * self.entry_width(adapter_name):
            raise ValueError(
                f"{where}: {values.numel()} values do not fit {indices.numel()} indices "
                f"x {self.entry_width(adapter_name)} values each"
            )

    def _check_if_changed(self, adapter_name: str) -> None:
        """Eager-only: re-check an adapter whose index buffer was replaced or written since its last check."""
        if self._validated.get(adapter_name) != self._state_key(adapter_name):
            self.check_adapter(adapter_name)

    def _zero_padding(self, adapter_name: str) -> None:
        block = self.block_size[adapter_name]
        _, valid = masks.block_entry_positions(self.sparse_adapter_indices[adapter_name], block, self.shape)
        with torch.no_grad():
            self.sparse_adapter_values[adapter_name][~valid.to(self.sparse_adapter_values[adapter_name].device)] = 0

    def flat_delta(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat storage positions and scaled values of the adapter's real entries (padding dropped)."""
        self._check_if_changed(adapter_name)
        indices = self.sparse_adapter_indices[adapter_name]
        values = self.sparse_adapter_values[adapter_name] * self.scaling[adapter_name]
        block = self.block_size[adapter_name]
        if block is None:
            return indices.long(), values
        positions, valid = masks.block_entry_positions(indices, block, self.shape)
        return positions[valid], values[valid.to(values.device)]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense ΔW in storage layout (for inspection and tests; merging never builds it)."""
        positions, values = self.flat_delta(adapter_name)
        device = self.get_base_layer().weight.device
        delta = torch.zeros(self.shape[0] * self.shape[1], dtype=values.dtype, device=device)
        delta.index_add_(0, positions.to(device), values.to(device))
        return delta.view(self.shape)

    def logical_weight(self) -> torch.Tensor:
        """The base weight in storage layout as numbers: dequantized (a transient copy) for a quantized base."""
        if self.quantization_backend is not None:
            return quantized.dequantized_weight(self.quantization_backend, self.get_base_layer())
        return self.get_base_layer().weight.detach()

    # --- merge ---------------------------------------------------------------------------------------------
    def _add_to_weight(self, adapter_name: str, sign: float, weight: torch.Tensor | None = None) -> torch.Tensor:
        positions, values = self.flat_delta(adapter_name)
        base = self.get_base_layer().weight
        target = base.data if weight is None else weight
        flat = target.view(-1)
        positions = positions.to(flat.device)
        delta = sign * values.detach().to(flat.device)
        if flat.dtype in (torch.float32, torch.float64):
            flat.index_add_(0, positions, delta.to(flat.dtype))  # one pass; positions are distinct, so exact
            return target
        # half types: add in fp32 and round once, so bf16/fp16 merges match W + ΔW
        flat[positions] = (flat[positions].float() + delta.float()).to(flat.dtype)
        return target

    def _add_to_quantized_weight(self, adapter_names: list[str], sign: float) -> None:
        """Dequantize → exact fp32 index add of all ``adapter_names`` → requantize into the same type (one rounding)."""
        deltas = [self.flat_delta(name) for name in adapter_names]
        positions = torch.cat([p.long() for p, _ in deltas])
        values = torch.cat([v.detach().float().to(positions.device) for _, v in deltas])
        quantized.add_and_requantize(self, positions, sign * values)  # index_add: shared positions accumulate

    def merged_weight_is_finite(self, adapter_names: list[str]) -> bool:
        """Whether merging ``adapter_names`` keeps the weight finite (computed on a copy)."""
        quantized_base = self.quantization_backend is not None
        trial = (self.logical_weight().float() if quantized_base else self.get_base_layer().weight.data).clone()
        for name in adapter_names:
            if name in self.sparse_adapter_values:
                self._add_to_weight(name, 1.0, trial)
        return bool(torch.isfinite(trial).all())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas of ``adapter_names`` (default: active) into the base weight: an exact index add."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.sparse_adapter_values]
        if self.router is not None:
            self.router.check_merge(adapter_names)
        if not adapter_names:
            return
        if safe_merge and not self.merged_weight_is_finite(adapter_names):
            raise ValueError(f"NaNs detected in the merged weights; the adapters {adapter_names} seem to be broken")
        if self.quantization_backend is not None:
            self._add_to_quantized_weight(adapter_names, 1.0)
            self.merged_adapters.extend(adapter_names)
            return
        for name in adapter_names:
            self._add_to_weight(name, 1.0)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        if self.quantization_backend is not None:
            names = [n for n in reversed(self.merged_adapters) if n in self.sparse_adapter_values]
            if names:
                self._add_to_quantized_weight(names, -1.0)
            self.merged_adapters.clear()
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.sparse_adapter_values:
                self._add_to_weight(name, -1.0)

    # --- forward -------------------------------------------------------------------------------------------
    def _has_hooks(self) -> bool:
        base = self.get_base_layer()
        return bool(base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks)

    def sparse_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus the active adapters' sparse deltas (or the plain base when disabled/merged).

        Reads only guard-friendly Python state (active names, ``block_size``, ``scaling``, ``shape``,
        ``transposed``) and calls one custom op per adapter, so ``torch.compile`` traces it without graph breaks.
        """
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        if self.router is not None and self.router.engaged(self.active_adapters):
            return self.router.forward(self, x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.sparse_adapter_values]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        if not torch.compiler.is_compiling():
            # eager safety net for loaders that write buffers directly (transformers' own adapter loader);
            # validation proper happens at update_layer / set_mask / load_state_dict time
            for name in active:
                self._check_if_changed(name)
        base = self.get_base_layer()
        fused = (
            len(active) == 1
            and not args
            and not kwargs
            and base is self.base_layer
            and not self._has_hooks()
            and self.quantization_backend is None  # quantized: base kernel + delta, never a dequantized W
        )
        if fused and self._fusable(active[0]):
            return self.fused_output(active[0], x)
        result = self.base_layer(x, *args, **kwargs)
        for name in active:
            result = result + self.delta_output(name, x).to(result.dtype)
        return result

    def _fusable(self, name: str) -> bool:
        """One GEMM on ``W + ΔW`` when the weight is a plain float tensor in the values' dtype."""
        weight = self.get_base_layer().weight
        return type(weight) in (torch.Tensor, nn.Parameter) and weight.dtype == self.sparse_adapter_values[name].dtype

    def fused_output(
        self, name: str, x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x @ (W + ΔW) + b`` in one GEMM (``W``, ``b``: the base layer's unless given)."""
        if weight is None:
            weight, bias = self.get_base_layer().weight, self.get_base_layer().bias
        values = self.sparse_adapter_values[name]
        indices = self.sparse_adapter_indices[name]
        block = self.block_size[name]
        scale = self.scaling[name]
        if block is None:
            return sparse_linear(x, weight, bias, values, indices, scale, self.transposed)
        return block_sparse_linear(x, weight, bias, values, indices, block, scale, self.transposed)

    def delta_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Only the adapter term ``x @ ΔW`` of adapter ``name``, in ``promote_types(x, values)`` (fp32 values on
        a half-precision base keep small deltas). Never reads the base weight: ``base(x) + delta_output`` works
        for any base layer (several adapters, hooked or quantized bases)."""
        values = self.sparse_adapter_values[name]
        indices = self.sparse_adapter_indices[name]
        block = self.block_size[name]
        scale = self.scaling[name]
        if block is None:
            return sparse_delta(x, values, indices, self.shape, scale, self.transposed)
        return block_sparse_delta(x, values, indices, block, self.shape, scale, self.transposed)


class Linear(nn.Module, SparseAdapterLayer):
    """Sparse adapter on ``nn.Linear`` or GPT-2 ``Conv1D``."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        indices: torch.Tensor,
        block_size: int | None,
        init_weights: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        SparseAdapterLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, indices, block_size, init_weights=init_weights)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.sparse_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "sparse_adapter." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)
