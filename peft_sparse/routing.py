"""Arrow routing over sparse experts (zero-shot, per token), with GenKnowSub; PEFT-shaped API.

A LoRA-Arrow user changes only the import::

    from peft_sparse import ArrowConfig, create_arrow_model
    model = create_arrow_model(base_model, ["expert_a", "expert_b", ...], ArrowConfig(top_k=2))

The experts are loaded as named sparse adapters (``task_0``, ``task_1``, ...) into the usual
:class:`~peft_sparse.layer.SparseAdapterLayer`, and every adapted layer gets an :class:`ArrowRouter` holding one
prototype per expert (:mod:`peft_sparse.prototypes`). While exactly the experts are active the layer computes,
per token ``x``::

    logits_e = |<x, v_e>| / router_temperature        (v_e: expert e's prototype in this layer)
    w = softmax over the top_k logits (0 for the others)
    y = base(x) + Σ_e w_e · x ΔW_eᵀ

Each expert's ΔW is one CSR matrix built from its stored entries, and an expert only sees the tokens that
picked it, so the cost is O(tokens · top_k · stored entries per expert) and no dense ΔW is formed.
Routing is for inference: expert values get no gradient through the routed forward.

The pure tensor functions (:func:`route_tokens`, :func:`routed_delta`) come first; the plumbing follows.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import PeftModel
from safetensors.torch import load_file, save
from torch import nn

from . import adapter_files, prototypes, quantized, similarity
from .files import atomic_write_bytes, atomic_write_text
from .layer import SUPPORTED_BASE_LAYERS, SparseAdapterLayer, storage_shape

TASK_ADAPTER_PREFIX = "task_"
ROUTER_CONFIG_NAME = "arrow_config.json"
PROTOTYPES_NAME = "arrow_prototypes.safetensors"
ROUTER_FORMAT = "peft-sparse-arrow"
ROUTER_FORMAT_VERSION = 1
PROTOTYPE_CACHE_KIND = "arrow_prototypes"


# --- pure tensor functions ---------------------------------------------------------------------------------------
def route_tokens(
    tokens: torch.Tensor, prototypes_: torch.Tensor, top_k: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token the ``top_k`` experts and their weights: softmax over the top-k of ``|<x, v_e>| / T``.

    ``tokens`` ``(T, in)``, ``prototypes_`` ``(E, in)``; returns ``(chosen (T, k) int64, weights (T, k))``.
    """
    logits = (tokens @ prototypes_.T).abs() / temperature
    top, chosen = torch.topk(logits, top_k, dim=-1)
    return chosen, torch.softmax(top, dim=-1)


# The grouped path multiplies each expert only by the tokens that picked it (top_k x entries per token) but pays a
# few small ops per expert; for a handful of tokens (decoding) one product with all experts stacked is cheaper.
STACKED_MAX_TOKENS = 16


@dataclass(frozen=True)
class ExpertStack:
    """All experts' ΔW of one layer as one CSR ``(E·out, in)`` matrix and per-expert CSR views of its storage."""

    stacked: torch.Tensor
    experts: list[torch.Tensor]


def stack_experts(matrices: Sequence[torch.Tensor]) -> ExpertStack:
    """Stack CSR ``(out, in)`` matrices (as from :func:`prototypes.delta_csr`) row-wise; int32 indices if they fit."""
    out_features, in_features = matrices[0].shape
    counts = [int(m.values().numel()) for m in matrices]
    total = sum(counts)
    index_dtype = torch.int32 if max(total, in_features) < 2**31 - 1 else torch.int64
    offsets = [0]
    for count in counts:
        offsets.append(offsets[-1] + count)
    crow = torch.cat(
        [m.crow_indices()[:-1] + offset for m, offset in zip(matrices, offsets, strict=False)]
        + [torch.tensor([total], device=matrices[0].device)]
    ).to(index_dtype)
    col = torch.cat([m.col_indices() for m in matrices]).to(index_dtype)
    values = torch.cat([m.values() for m in matrices])
    shape = (len(matrices) * out_features, in_features)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        stacked = torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)
        experts = [
            torch.sparse_csr_tensor(
                crow[e * out_features : (e + 1) * out_features + 1] - offsets[e],
                col[offsets[e] : offsets[e + 1]],
                values[offsets[e] : offsets[e + 1]],
                (out_features, in_features),
                check_invariants=False,
            )
            for e in range(len(matrices))
        ]
    return ExpertStack(stacked, experts)


def routed_delta(tokens: torch.Tensor, stack: ExpertStack, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``Σ_e w_e(x) · x ΔW_eᵀ`` for every token, ``(T, out)``, given each token's chosen experts and weights.

    Up to :data:`STACKED_MAX_TOKENS` tokens (or with every expert chosen) one product with the stacked experts
    gives every expert's output; otherwise tokens are grouped by expert and each expert multiplies only its
    tokens, so the cost is O(tokens · top_k · entries per expert).
    """
    num_tokens, k = chosen.shape
    num_experts = len(stack.experts)
    out_features = stack.experts[0].shape[0]
    weights = weights.to(tokens.dtype)
    if num_tokens == 0:
        return torch.zeros(0, out_features, dtype=tokens.dtype, device=tokens.device)
    if num_tokens <= STACKED_MAX_TOKENS or k == num_experts:
        dense_weights = torch.zeros(num_tokens, num_experts, dtype=tokens.dtype, device=tokens.device)
        dense_weights.scatter_(1, chosen, weights)
        every = stack.stacked @ tokens.T  # (E·out, T)
        return torch.einsum("te,eot->to", dense_weights, every.view(num_experts, out_features, num_tokens))
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    token_of = torch.div(order, k, rounding_mode="floor")
    weight_of = weights.reshape(-1)[order]
    picked = tokens.index_select(0, token_of).T  # (in, T·k), grouped by expert
    outputs = torch.empty(out_features, token_of.numel(), dtype=tokens.dtype, device=tokens.device)
    start = 0
    for expert, count in zip(stack.experts, counts, strict=True):
        if count:
            outputs[:, start : start + count] = expert @ picked[:, start : start + count]
        start += count
    result = torch.zeros(num_tokens, out_features, dtype=tokens.dtype, device=tokens.device)
    return result.index_add_(0, token_of, outputs.T * weight_of[:, None])


# --- configuration -----------------------------------------------------------------------------------------------
@dataclass
class ArrowConfig:
    """Arrow routing settings; same names, defaults and meanings as ``peft.ArrowConfig``.

    - ``top_k``: experts combined per token (1 <= top_k <= number of experts).
    - ``router_temperature``: softmax temperature over the top-k logits (> 0).
    - ``use_gks``: GenKnowSub: subtract the mean of the general experts from every task expert first.
    - ``rng_seed``: seed of the prototypes' start vectors (None: torch's global RNG; the converged prototypes
      then agree to ``prototype_tol`` but are not bit-identical between runs).
    - ``prototype_tol`` / ``prototype_max_iter``: convergence tolerance (relative eigen-residual) and cap on
      sparse products of the prototype computation (peft-sparse only; PEFT runs 15 fixed power iterations).

    ``task_adapter_names`` and ``gks_adapter_names`` are filled in by :func:`create_arrow_model`.
    """

    top_k: int = 3
    router_temperature: float = 1.0
    use_gks: bool = False
    rng_seed: int | None = None
    prototype_tol: float = prototypes.DEFAULT_TOL
    prototype_max_iter: int = prototypes.DEFAULT_MAX_ITER
    task_adapter_names: list[str] | None = field(default=None, init=False)
    gks_adapter_names: list[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, num_experts: int | None = None) -> None:
        """Raise ``ValueError`` naming the first invalid field (and ``top_k`` > ``num_experts`` if given)."""
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        temperature = self.router_temperature
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"router_temperature must be > 0, got {temperature!r}")
        if not math.isfinite(temperature):
            raise ValueError(f"router_temperature must be finite, got {temperature!r}")
        if not isinstance(self.use_gks, bool):
            raise ValueError(f"use_gks must be a bool, got {self.use_gks!r}")
        if self.rng_seed is not None and (isinstance(self.rng_seed, bool) or not isinstance(self.rng_seed, int)):
            raise ValueError(f"rng_seed must be None or an int, got {self.rng_seed!r}")
        tol = self.prototype_tol
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not (0 < tol < 1):
            raise ValueError(f"prototype_tol must be in (0, 1), got {tol!r}")
        max_iter = self.prototype_max_iter
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"prototype_max_iter must be an int >= 1, got {max_iter!r}")
        if num_experts is not None and self.top_k > num_experts:
            raise ValueError(f"top_k={self.top_k} exceeds the number of task experts ({num_experts})")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArrowConfig:
        """Inverse of :meth:`to_dict` (unknown keys are an error)."""
        data = dict(data)
        names = {key: data.pop(key, None) for key in ("task_adapter_names", "gks_adapter_names")}
        try:
            config = cls(**data)
        except TypeError as error:
            raise ValueError(f"invalid Arrow settings: {error}") from error
        config.task_adapter_names, config.gks_adapter_names = names["task_adapter_names"], names["gks_adapter_names"]
        return config


class PrototypeCache(Protocol):
    """What :func:`create_arrow_model` needs from an ``ExpertLibrary``."""

    def __contains__(self, name: object) -> bool: ...

    def adapter_dir(self, name: str) -> Path: ...

    def cached(
        self, kind: str, names: Sequence[str], params: dict, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]: ...


# --- the per-layer router ----------------------------------------------------------------------------------------
class ArrowRouter:
    """Routing state of one adapted layer: expert names, their prototypes ``(E, in)`` and the settings.

    Attached as ``layer.router``; the layer's forward hands over to :meth:`forward` while exactly the experts are
    the active adapters (``model.set_adapter("task_0")`` uses one expert plainly; activating all experts again
    with ``model.base_model.set_adapter(names)`` routes again).
    """

    def __init__(self, expert_names: Sequence[str], prototypes_: torch.Tensor, top_k: int, temperature: float):
        if prototypes_.dim() != 2 or prototypes_.shape[0] != len(expert_names):
            raise ValueError(f"expected ({len(expert_names)}, in) prototypes, got {tuple(prototypes_.shape)}")
        self.expert_names = list(expert_names)
        self.prototypes = prototypes_.detach().to(torch.float32).contiguous()
        self.top_k = int(top_k)
        self.temperature = float(temperature)
        self._stack: tuple[tuple, ExpertStack] | None = None
        self._device_prototypes: torch.Tensor | None = None

    def engaged(self, active_adapters: Sequence[str]) -> bool:
        """Whether the active adapters are exactly the experts (then the layer routes)."""
        return set(active_adapters) == set(self.expert_names)

    def check_merge(self, adapter_names: Sequence[str]) -> None:
        """Refuse to merge routed experts (there is no single weight that equals per-token routing)."""
        routed = [name for name in adapter_names if name in self.expert_names]
        if routed:
            raise RuntimeError(
                f"cannot merge Arrow-routed experts {routed}: routing picks experts per token, so no merged weight "
                "equals the routed model. Merge the experts with add_weighted_adapter / peft-sparse merge instead, "
                "or unload() the routed model first."
            )

    def expert_stack(self, layer: SparseAdapterLayer, device: torch.device) -> ExpertStack:
        """The experts' scaled ΔW as fp32 CSR matrices (:class:`ExpertStack`); rebuilt when an expert changes."""
        key_parts: list[Any] = [device]
        for name in self.expert_names:
            indices, values = layer.sparse_adapter_indices[name], layer.sparse_adapter_values[name]
            key_parts.append((id(indices), indices._version, id(values), values._version, layer.scaling[name]))
        key = tuple(key_parts)
        if self._stack is None or self._stack[0] != key:
            matrices = []
            for name in self.expert_names:
                positions, values = layer.flat_delta(name)
                positions, values = positions.to(device), values.detach().to(device)
                matrices.append(prototypes.delta_csr(positions, values, layer.shape, layer.transposed))
            self._stack = (key, stack_experts(matrices))
        return self._stack[1]

    def prototypes_on(self, device: torch.device) -> torch.Tensor:
        if self._device_prototypes is None or self._device_prototypes.device != device:
            self._device_prototypes = self.prototypes.to(device)
        return self._device_prototypes

    def forward(self, layer: SparseAdapterLayer, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base(x) + Σ_e w_e(x) · x ΔW_eᵀ`` with per-token top-k weights."""
        result = layer.base_layer(x, *args, **kwargs)
        if x.shape[-1] != layer.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer expects {layer.in_features}")
        tokens = x.reshape(-1, x.shape[-1]).to(torch.float32)
        chosen, weights = route_tokens(tokens, self.prototypes_on(x.device), self.top_k, self.temperature)
        delta = routed_delta(tokens, self.expert_stack(layer, x.device), chosen, weights)
        return result + delta.reshape(*x.shape[:-1], delta.shape[-1]).to(result.dtype)


# --- the routed PeftModel ----------------------------------------------------------------------------------------
@dataclass
class ArrowSetup:
    """Model-level record of a routed set-up (what ``save_pretrained`` writes next to the experts)."""

    config: ArrowConfig
    expert_names: list[str]
    layers: list[str]
    gks_applied: bool
    sources: list[str] = field(default_factory=list)
    general_sources: list[str] = field(default_factory=list)


class ArrowModelMixin:
    """Adds router files to ``save_pretrained`` of a routed ``PeftModel`` (mixed into its own class)."""

    def save_pretrained(self, save_directory: str, *args: Any, **kwargs: Any) -> None:
        """PEFT's save (one sub-directory per expert) plus ``arrow_config.json`` and the prototypes."""
        super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        setup: ArrowSetup | None = getattr(self, "arrow_setup", None)
        if setup is None or not kwargs.get("is_main_process", True):
            return
        selected = kwargs.get("selected_adapters")
        if selected is not None and not set(setup.expert_names) <= set(selected):
            warnings.warn("not all routed experts were saved, so the Arrow router files were not written", stacklevel=2)
            return
        save_router_files(self, Path(save_directory))  # type: ignore[arg-type]


_ARROW_CLASSES: dict[type, type] = {}


def _make_routed(model: PeftModel) -> None:
    cls = type(model)
    if not issubclass(cls, ArrowModelMixin):
        if cls not in _ARROW_CLASSES:
            _ARROW_CLASSES[cls] = type(f"Arrow{cls.__name__}", (ArrowModelMixin, cls), {"__module__": __name__})
        model.__class__ = _ARROW_CLASSES[cls]


def routed_layers(model: nn.Module) -> dict[str, SparseAdapterLayer]:
    """Adapted layers keyed by their name in the transformers model (as in ``entries_pattern``)."""
    root = model.base_model.model if isinstance(model, PeftModel) else model
    return {name: m for name, m in root.named_modules() if isinstance(m, SparseAdapterLayer)}


def save_router_files(model: PeftModel, directory: Path) -> None:
    """Write ``arrow_config.json`` and the prototypes of a routed model into ``directory`` (atomically each)."""
    setup: ArrowSetup = model.arrow_setup  # type: ignore[assignment]
    layers = routed_layers(model)
    tensors = {name: layers[name].router.prototypes.contiguous() for name in setup.layers}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / PROTOTYPES_NAME, save(tensors, metadata={"format": "pt"}))
    record = {
        "format": ROUTER_FORMAT,
        "version": ROUTER_FORMAT_VERSION,
        "arrow_config": setup.config.to_dict(),
        "expert_names": setup.expert_names,
        "layers": setup.layers,
        "gks_applied": setup.gks_applied,
        "sources": setup.sources,
        "general_sources": setup.general_sources,
    }
    atomic_write_text(directory / ROUTER_CONFIG_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


# --- building ----------------------------------------------------------------------------------------------------
def _resolve(entries: Sequence[str | os.PathLike], library: PrototypeCache | None, what: str) -> list[Path]:
    dirs = []
    for entry in entries:
        if library is not None and isinstance(entry, str) and entry in library:
            dirs.append(Path(library.adapter_dir(entry)))
        else:
            path = Path(entry)
            if not (path / adapter_files.CONFIG_NAME).is_file():
                known = " (not an expert of the given library either)" if library is not None else ""
                raise ValueError(f"{what} {str(entry)!r} is not a saved sparse adapter directory{known}")
            dirs.append(path)
    return dirs


def _check_base(base_model: nn.Module, first: adapter_files.SparseAdapterFile, files: list) -> None:
    """Refuse experts made for another base: missing modules, unsupported types, other weight shapes."""
    if isinstance(base_model, PeftModel) or any(isinstance(m, SparseAdapterLayer) for m in base_model.modules()):
        raise ValueError("base_model already carries adapters; pass the plain transformers model")
    for layer in first.layer_names:
        try:
            module = base_model.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"expert {first.path} targets {layer!r}, which the base model does not have") from None
        if not isinstance(module, SUPPORTED_BASE_LAYERS):
            raise ValueError(f"expert {first.path} targets {layer!r}, a {type(module).__name__} in the base model")
        requantize = quantized.quantization_kwargs(base_model).get("get_apply_tensor_subclass")
        shape = storage_shape(module, quantized.resolve_backend(module, layer, requantize) is not None)
        if shape != first.shape(layer):
            raise ValueError(
                f"expert {first.path} was made for {layer!r} with weight shape {list(first.shape(layer))}, "
                f"the base model has {list(shape)}"
            )
    bases = {f.config.get("base_model_name_or_path") for f in files} - {None}
    if len(bases) > 1:
        raise ValueError(f"experts were made for different base models: {sorted(bases)}")


def _read_experts(
    files: list[adapter_files.SparseAdapterFile], general: list[adapter_files.SparseAdapterFile]
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Per layer, every task expert's ``(indices, values (n, k))``, after GenKnowSub when ``general`` is given."""
    experts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layer in files[0].layer_names:
        parts = [f.read_layer(layer) for f in files]
        if general:
            generic = [g.read_layer(layer) for g in general]
            parts = [prototypes.subtract_general_knowledge(part, generic) for part in parts]
        experts[layer] = parts
    return experts


def compute_prototypes(
    experts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]],
    shapes: dict[str, tuple[int, int]],
    transposed: dict[str, bool],
    block_size: int | None,
    config: ArrowConfig,
) -> dict[str, torch.Tensor]:
    """Per layer the ``(E, in)`` fp32 prototypes of the experts (one start vector seed for all, as PEFT)."""
    result = {}
    for layer, parts in experts.items():
        vectors = []
        for indices, values in parts:
            positions, flat = similarity.entry_positions(indices, values, shapes[layer], block_size)
            found = prototypes.prototype(
                positions,
                flat.float(),
                shapes[layer],
                transposed[layer],
                seed=config.rng_seed,
                tol=config.prototype_tol,
                max_iter=config.prototype_max_iter,
            )
            vectors.append(found.vector)
        result[layer] = torch.stack(vectors)
    return result


def _attach(
    model: PeftModel,
    names: list[str],
    protos: dict[str, torch.Tensor],
    config: ArrowConfig,
    setup: ArrowSetup,
) -> PeftModel:
    layers = routed_layers(model)
    for layer_name, vectors in protos.items():
        layer = layers[layer_name]
        if vectors.shape != (len(names), layer.in_features):
            raise ValueError(
                f"prototypes of {layer_name!r} have shape {tuple(vectors.shape)}, "
                f"expected ({len(names)}, {layer.in_features})"
            )
        layer.router = ArrowRouter(names, vectors, config.top_k, config.router_temperature)
    model.base_model.set_adapter(names, inference_mode=True)
    model.arrow_setup = setup
    _make_routed(model)
    return model


def _load_experts(base_model: nn.Module, dirs: list[Path], names: list[str]) -> PeftModel:
    model = PeftModel.from_pretrained(base_model, str(dirs[0]), adapter_name=names[0], is_trainable=False)
    try:
        for directory, name in zip(dirs[1:], names[1:], strict=True):
            model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
    except BaseException:
        model.base_model.unload()
        raise
    return model


def _transposed_layers(base_model: nn.Module, layers: Sequence[str]) -> dict[str, bool]:
    return {layer: not isinstance(base_model.get_submodule(layer), nn.Linear) for layer in layers}


def create_arrow_model(
    base_model: nn.Module,
    task_specific_adapter_paths: Sequence[str | os.PathLike],
    arrow_config: ArrowConfig,
    general_adapter_paths: Sequence[str | os.PathLike] | None = None,
    library: PrototypeCache | None = None,
) -> PeftModel:
    """Load sparse task experts into ``base_model`` as ``task_0``, ``task_1``, ... and route between them.

    Args:
        base_model: the plain transformers model the experts were trained on (modified in place, as by
            ``PeftModel.from_pretrained``; left untouched when a check fails).
        task_specific_adapter_paths: saved sparse adapter directories, or expert names in ``library``.
        arrow_config: :class:`ArrowConfig`; its ``task_adapter_names`` / ``gks_adapter_names`` are filled in.
        general_adapter_paths: general experts for GenKnowSub (required when ``arrow_config.use_gks``); their
            mean is subtracted from each task expert exactly, on the union of entries, before the prototypes
            are computed. They are not loaded into the model.
        library: an ``ExpertLibrary``; path entries that are names in it are resolved through it, and when all
            entries are names the prototypes are cached in it (``"arrow_prototypes"``).

    Returns:
        A ``PeftModel`` (its class gains a ``save_pretrained`` that also writes the router files) whose adapted
        layers route per token. Raises ``ValueError`` for an empty expert list, ``top_k`` outside
        ``[1, #experts]``, experts with different block sizes / targets / weight shapes / base models, or experts
        that do not fit ``base_model``; nothing is changed then.
    """
    if not isinstance(arrow_config, ArrowConfig):
        raise TypeError(f"arrow_config must be a peft_sparse.ArrowConfig, got {type(arrow_config).__name__}")
    if task_specific_adapter_paths is None or len(task_specific_adapter_paths) == 0:
        raise ValueError("task_specific_adapter_paths must contain at least one expert")
    arrow_config.validate(num_experts=len(task_specific_adapter_paths))
    general_entries = list(general_adapter_paths or [])
    if arrow_config.use_gks and not general_entries:
        raise ValueError("use_gks=True needs general_adapter_paths (at least one general expert)")
    if general_entries and not arrow_config.use_gks:
        warnings.warn("general_adapter_paths are ignored because use_gks=False", stacklevel=2)
        general_entries = []
    task_dirs = _resolve(task_specific_adapter_paths, library, "task expert")
    general_dirs = _resolve(general_entries, library, "general expert")
    names = [f"{TASK_ADAPTER_PREFIX}{i}" for i in range(len(task_dirs))]
    with ExitStack() as stack:
        try:
            files = [stack.enter_context(adapter_files.SparseAdapterFile(d)) for d in task_dirs + general_dirs]
            adapter_files.check_compatible(files)
        except adapter_files.AdapterFormatError as error:
            raise ValueError(f"incompatible experts: {error}") from error
        _check_base(base_model, files[0], files)
        task_files, general_files = files[: len(task_dirs)], files[len(task_dirs) :]
        experts = _read_experts(task_files, general_files)
        block_size = files[0].block_size
        shapes = {layer: files[0].shape(layer) for layer in files[0].layer_names}
    transposed = _transposed_layers(base_model, list(shapes))

    def compute() -> dict[str, torch.Tensor]:
        return compute_prototypes(experts, shapes, transposed, block_size, arrow_config)

    entries = [str(e) for e in task_specific_adapter_paths] + [str(e) for e in general_entries]
    if library is not None and all(e in library for e in entries):
        params = {
            "num_task_experts": len(task_dirs),
            "use_gks": arrow_config.use_gks,
            "rng_seed": arrow_config.rng_seed,
            "tol": arrow_config.prototype_tol,
            "max_iter": arrow_config.prototype_max_iter,
        }
        protos = library.cached(PROTOTYPE_CACHE_KIND, entries, params, compute)
    else:
        protos = compute()

    model = _load_experts(base_model, task_dirs, names)
    try:
        if general_files:
            _install_gks_experts(model, names, experts)
        arrow_config.task_adapter_names = list(names)
        arrow_config.gks_adapter_names = []
        setup = ArrowSetup(
            config=arrow_config,
            expert_names=names,
            layers=sorted(shapes),
            gks_applied=bool(general_files),
            sources=[Path(e).name for e in task_specific_adapter_paths],
            general_sources=[Path(e).name for e in general_entries],
        )
        return _attach(model, names, protos, arrow_config, setup)
    except BaseException:
        model.base_model.unload()
        raise


def _install_gks_experts(
    model: PeftModel, names: list[str], experts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]]
) -> None:
    """Replace the loaded experts' masks and values by their GenKnowSub versions (union masks)."""
    layers = routed_layers(model)
    for layer_name, parts in experts.items():
        layer = layers[layer_name]
        for name, (indices, values) in zip(names, parts, strict=True):
            layer.set_mask(name, indices.to(layer.sparse_adapter_indices[name].dtype))
            target = layer.sparse_adapter_values[name]
            target.data = values.reshape(-1).to(device=target.device, dtype=target.dtype)
            model.peft_config[name].entries_pattern[layer_name] = int(indices.numel())


def load_arrow_model(base_model: nn.Module, path: str | os.PathLike) -> PeftModel:
    """Reload a routed model written by ``save_pretrained`` of a :func:`create_arrow_model` result.

    The experts come from ``path/<task_i>/`` (already GenKnowSub-ed if they were), the settings from
    ``arrow_config.json`` and the prototypes from ``arrow_prototypes.safetensors``, so outputs are identical.
    """
    directory = Path(path)
    record_path = directory / ROUTER_CONFIG_NAME
    if not record_path.is_file():
        raise ValueError(f"{directory}: no {ROUTER_CONFIG_NAME}; not a saved Arrow model")
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{record_path}: not valid JSON ({error})") from error
    if not isinstance(record, dict) or record.get("format") != ROUTER_FORMAT:
        raise ValueError(f"{record_path}: not a {ROUTER_FORMAT} file")
    if record.get("version") != ROUTER_FORMAT_VERSION:
        raise ValueError(f"{record_path}: unsupported version {record.get('version')!r}")
    names, layers = record.get("expert_names"), record.get("layers")
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ValueError(f"{record_path}: expert_names must be a non-empty list of names")
    if not (isinstance(layers, list) and all(isinstance(n, str) for n in layers)):
        raise ValueError(f"{record_path}: layers must be a list of module names")
    config = ArrowConfig.from_dict(record.get("arrow_config") or {})
    config.validate(num_experts=len(names))
    dirs = [directory / name for name in names]
    with ExitStack() as stack:
        try:
            files = [stack.enter_context(adapter_files.SparseAdapterFile(d)) for d in dirs]
            adapter_files.check_compatible(files)
        except adapter_files.AdapterFormatError as error:
            raise ValueError(f"{directory}: bad expert ({error})") from error
        _check_base(base_model, files[0], files)
        if sorted(files[0].layer_names) != sorted(layers):
            raise ValueError(f"{record_path}: layers differ from the experts' layers")
    try:
        protos = load_file(str(directory / PROTOTYPES_NAME))
    except Exception as error:  # missing or corrupt safetensors file
        raise ValueError(f"{directory / PROTOTYPES_NAME}: cannot read prototypes ({error})") from error
    if sorted(protos) != sorted(layers):
        raise ValueError(f"{directory / PROTOTYPES_NAME}: prototypes do not cover exactly the routed layers")
    for layer, tensor in protos.items():
        in_features = files[0].shape(layer)[0 if _transposed_layers(base_model, [layer])[layer] else 1]
        if tensor.shape != (len(names), in_features) or not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{directory / PROTOTYPES_NAME}: bad prototypes for {layer!r} {tuple(tensor.shape)}")
    model = _load_experts(base_model, dirs, names)
    try:
        setup = ArrowSetup(
            config=config,
            expert_names=names,
            layers=sorted(layers),
            gks_applied=bool(record.get("gks_applied")),
            sources=list(record.get("sources") or []),
            general_sources=list(record.get("general_sources") or []),
        )
        return _attach(model, names, protos, config, setup)
    except BaseException:
        model.base_model.unload()
        raise


def check_mergeable(model: nn.Module, adapter_names: Sequence[str] | None) -> None:
    """Raise before anything is merged if ``adapter_names`` (default: active) include routed experts."""
    for module in model.modules():
        if isinstance(module, SparseAdapterLayer) and module.router is not None:
            module.router.check_merge(module.active_adapters if adapter_names is None else adapter_names)


__all__ = [
    "ArrowConfig",
    "ArrowRouter",
    "check_mergeable",
    "compute_prototypes",
    "create_arrow_model",
    "load_arrow_model",
    "route_tokens",
    "routed_delta",
    "stack_experts",
    "save_router_files",
]
