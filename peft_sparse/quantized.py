"""Quantized base layers: which ones sparse adapters support, their logical weight, and requantizing merges.

Everything goes through PEFT's quantization backends (``peft.utils.resolve_quantization_backend``): the backend
dequantizes the stored weight (``get_base_weight``) and requantizes a modified one into the same quantization
type (``set_base_weight``). Supported here, and tested on CPU:

- bitsandbytes ``Linear4bit`` (nf4 / fp4, with or without double quantization), quantized;
- bitsandbytes ``Linear8bitLt`` holding int8 inference weights (``has_fp16_weights=False``, the default of
  ``BitsAndBytesConfig(load_in_8bit=True)``);
- torchao ``Int8Tensor`` weights (``Int8WeightOnlyConfig``, and ``Int8DynamicActivationInt8WeightConfig`` when the
  model was loaded through transformers' ``TorchAoConfig``, which records the config needed to requantize).

Every other quantized layer (GPTQ, AWQ, HQQ, AQLM, EETQ, other torchao tensor types, unquantized ``Params4bit``,
trainable-int8 ``Linear8bitLt``...) is refused with an ``UnsupportedQuantizationError`` naming the layer and type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.utils import get_quantization_kwargs, resolve_quantization_backend
from torch import nn

SUPPORTED_QUANTIZATIONS = (
    "bitsandbytes Linear4bit (nf4/fp4)",
    "bitsandbytes Linear8bitLt (int8 weights, has_fp16_weights=False)",
    "torchao Int8Tensor (Int8WeightOnlyConfig; Int8DynamicActivationInt8WeightConfig via transformers TorchAoConfig)",
)
# Attributes and package prefixes that mark a quantized layer PEFT's backend resolver may not see (its library is
# not installed, or PEFT has no backend for it).
_QUANTIZED_ATTRIBUTES = ("qweight", "W_q", "qzeros", "quant_config", "weight_packed")
_QUANTIZED_PACKAGES = (
    "auto_gptq", "gptqmodel", "awq", "hqq", "aqlm", "eetq", "optimum", "quanto", "compressed_tensors",
    "transformer_engine", "neural_compressor", "fp_quant", "vptq", "spqr", "higgs", "bitnet",
)  # fmt: skip


class UnsupportedQuantizationError(TypeError):
    """A targeted layer is quantized in a way sparse adapters cannot train on or merge into."""


def quantization_kwargs(model: nn.Module) -> dict[str, Any]:
    """Model-level quantization settings PEFT's backends need (torchao's requantization config from transformers)."""
    return get_quantization_kwargs(model)


def _refuse(where: str, kind: str, why: str = "") -> UnsupportedQuantizationError:
    reason = f" ({why})" if why else ""
    return UnsupportedQuantizationError(
        f"target module {where!r} is quantized as {kind}{reason}, which sparse adapters do not support. "
        f"Supported: {'; '.join(SUPPORTED_QUANTIZATIONS)}. Exclude the module (exclude_modules) or load the base "
        "model unquantized."
    )


def _torchao_int8_config(weight: torch.Tensor) -> Callable[[], Any] | None:
    """The ``Int8WeightOnlyConfig`` that produced a weight-only ``Int8Tensor`` (None when it cannot be told)."""
    from torchao.quantization import Int8WeightOnlyConfig, PerGroup, PerRow, PerTensor

    zero_point = getattr(weight, "zero_point", None)
    if getattr(weight, "act_quant_kwargs", None) is not None or (zero_point is not None and bool(zero_point.any())):
        return None  # activation-quantized or asymmetric: not what Int8WeightOnlyConfig makes
    block, shape = list(weight.block_size), list(weight.shape)
    if block == shape:
        granularity = PerTensor()
    elif block[:-1] == [1] * (len(shape) - 1) and block[-1] == shape[-1]:
        granularity = PerRow()
    elif block[:-1] == [1] * (len(shape) - 1):
        granularity = PerGroup(block[-1])
    else:
        return None
    return lambda: Int8WeightOnlyConfig(granularity=granularity)


def _quantized_tensor_kind(weight: Any) -> str | None:
    """Name of a quantized tensor subclass (``None`` for a plain tensor or parameter)."""
    if weight is None or type(weight) in (torch.Tensor, nn.Parameter):
        return None
    module = type(weight).__module__.split(".")[0]
    return f"{module} {type(weight).__name__}"


def resolve_backend(base_layer: nn.Module, where: str, get_apply_tensor_subclass: Callable[[], Any] | None = None):
    """PEFT's quantization backend for a supported quantized ``base_layer``, ``None`` for a plain layer.

    ``get_apply_tensor_subclass`` is the torchao requantization config from the model's
    :func:`quantization_kwargs` (derived from the weight for weight-only ``Int8Tensor`` when missing). Raises
    ``UnsupportedQuantizationError`` (naming ``where`` and the quantization) for anything this module does not
    support; nothing is modified.
    """
    kwargs = {} if get_apply_tensor_subclass is None else {"get_apply_tensor_subclass": get_apply_tensor_subclass}
    module_package = type(base_layer).__module__.split(".")[0]
    kind = f"{module_package} {type(base_layer).__name__}"
    try:
        backend = resolve_quantization_backend(base_layer, **kwargs)
    except ValueError:  # torchao weight without a known requantization config: derived below
        backend = None
        derived = None
        weight = getattr(base_layer, "weight", None)
        if type(weight).__name__ == "Int8Tensor":
            derived = _torchao_int8_config(weight)
        if derived is None:
            raise _refuse(
                where,
                f"torchao {type(weight).__name__}",
                "its requantization config is unknown: load the model through transformers' TorchAoConfig",
            ) from None
        backend = resolve_quantization_backend(base_layer, get_apply_tensor_subclass=derived)
    if backend is None:
        weight_kind = _quantized_tensor_kind(getattr(base_layer, "weight", None))
        marked = any(hasattr(base_layer, attr) for attr in _QUANTIZED_ATTRIBUTES)
        if weight_kind is not None:
            raise _refuse(where, weight_kind)
        if marked or module_package in _QUANTIZED_PACKAGES:
            raise _refuse(where, kind)
        return None
    name = type(backend).__name__
    weight = base_layer.weight
    if name == "Bnb4bitBackend":
        if not getattr(weight, "bnb_quantized", False) or getattr(weight, "quant_state", None) is None:
            raise _refuse(where, kind, "its weight is not quantized yet: move the model to its device first")
        return backend
    if name == "Bnb8bitBackend":
        if base_layer.state.has_fp16_weights or weight.dtype != torch.int8:
            raise _refuse(where, kind, "has_fp16_weights=True keeps trainable float weights")
        return backend
    if name == "TorchaoBackend":
        if type(weight).__name__ != "Int8Tensor" or not backend.supports_merge:
            raise _refuse(where, f"torchao {type(weight).__name__}")
        return backend
    raise _refuse(where, getattr(backend, "backend_name", "") or kind)


def logical_shape(base_layer: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a quantized ``Linear``: the dequantized weight's shape, not the packed storage's."""
    return int(base_layer.out_features), int(base_layer.in_features)


def restore_canonical_layout(base_layer: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit weight, in place, so it dequantizes correctly.

    On CPUs with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight for its CPU kernel on the first eval
    forward without gradients (absmax rounded to bf16); PEFT's dequantization does not read that layout, and
    bitsandbytes' kernel for it gives no input gradient. This is the inverse bitsandbytes itself applies before
    saving; its next eval forward without gradients repacks the weight.
    """
    weight = getattr(base_layer, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)


def keep_bnb_training_layout(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` in its training layout on CPU; returns how many.

    bitsandbytes' CPU repacking (see :func:`restore_canonical_layout`) loses the input gradient: after one eval
    forward without gradients, gradients stop at every repacked layer, silently for bias-free layers. Training
    adapters needs them, so the repacking is turned off (``support_avx512bf16_for_cpu = False``; inference on CPU
    then runs bitsandbytes' dequantize + fp32 matmul path instead of its bf16 kernel). GPUs are unaffected.
    """
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if type(weight).__name__ == "Params4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            restore_canonical_layout(module)
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def dequantized_weight(backend: Any, base_layer: nn.Module) -> torch.Tensor:
    """The logical weight as a plain float tensor of :func:`logical_shape` (a transient copy)."""
    restore_canonical_layout(base_layer)
    weight = backend.get_base_weight(base_layer)
    return weight.detach().reshape(logical_shape(base_layer))


def add_and_requantize(layer: Any, positions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Dequantize ``layer``'s base weight, add ``values`` at flat ``positions`` in fp32, requantize in place.

    ``layer`` is the PEFT tuner layer (its ``quantization_backend`` requantizes into the same type). Returns the
    fp32 weight that was requantized (before rounding), for callers that measure the rounding.
    """
    base = layer.get_base_layer()
    original = dequantized_weight(layer.quantization_backend, base)
    merged = original.float().clone()
    merged.view(-1).index_add_(0, positions.to(merged.device).long(), values.detach().to(merged))
    layer.set_base_weight(merged.to(original.dtype))
    return merged
