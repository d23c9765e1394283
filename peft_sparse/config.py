"""``SparseAdapterConfig``: which weights get a sparse adapter, how many entries, and how they are chosen."""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME

from .files import add_install_note, apply_default_mode
from .registration import PEFT_TYPE_NAME, _add_peft_type_member

MASK_INITS = ("random", "magnitude", "snip", "gradient", "warmup")
DATA_DRIVEN_MASK_INITS = ("snip", "gradient", "warmup")
INSTALL_HINT = "pip install peft-sparse; then `import peft_sparse` before loading this adapter with PEFT"


@dataclass
class SparseAdapterConfig(PeftConfig):
    """Configuration of a sparse adapter: train only ``keep_ratio`` of each targeted weight's entries.

    Budgets, in order of precedence: ``entries_pattern`` (explicit stored rows per module, filled in
    automatically and saved so an adapter reloads from its config alone), ``num_params`` (a total budget spread
    over the targeted weights in proportion to their size), ``lora_rank`` (``r * (in + out)`` entries per module,
    as many as a LoRA adapter of that rank) and ``keep_ratio`` (a fraction of each weight).
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module names (suffix match), a regex, 'all-linear', or the presets 'qkv' / 'mlp'."},
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to skip."})
    keep_ratio: float = field(default=0.01, metadata={"help": "Fraction of each weight's entries to train."})
    num_params: int | None = field(default=None, metadata={"help": "Total trainable entries over all targets."})
    lora_rank: int | None = field(default=None, metadata={"help": "Match a LoRA adapter of this rank."})
    lora_rank_pattern: dict[str, int] = field(default_factory=dict, metadata={"help": "Per-module LoRA ranks."})
    block_size: int | None = field(default=None, metadata={"help": "None: unstructured; b: b x b blocks."})
    mask_init: Literal["random", "magnitude", "snip", "gradient", "warmup"] = field(
        default="magnitude",
        metadata={"help": "random/magnitude: chosen at get_peft_model; snip/gradient/warmup: by calibration."},
    )
    budget_scope: Literal["layer", "global"] = field(
        default="layer", metadata={"help": "Calibration picks the top entries per layer or over all layers."}
    )
    seed: int | None = field(
        default=None, metadata={"help": "Seed for random masks; None derives one from the adapter name."}
    )
    warmup_steps: int = field(default=8, metadata={"help": "mask_init='warmup': dense warm-up steps."})
    warmup_lr: float = field(default=1e-4, metadata={"help": "mask_init='warmup': warm-up learning rate."})
    fan_in_fan_out: bool = field(default=False, metadata={"help": "Weight stored as (fan_in, fan_out)."})
    init_weights: bool = field(default=True, metadata={"help": "Start with zero deltas (identity adapter)."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra fully trained modules."})
    trainable_token_indices: list[int] | dict[str, list[int]] | None = field(
        default=None,
        metadata={
            "help": "Embedding rows to train (PEFT's trainable tokens): a list for the input embedding, or "
            "{'embed_tokens': [...]}. TRL's SFTTrainer fills it for tokens its chat_template_path adds."
        },
    )
    entries_pattern: dict[str, int] = field(
        default_factory=dict, metadata={"help": "Stored rows (entries or blocks) per module; filled in for you."}
    )
    weight_shapes: dict[str, list[int]] = field(
        default_factory=dict, metadata={"help": "Storage shape of each adapted weight; filled in for you."}
    )
    requires: str = field(default=INSTALL_HINT, metadata={"help": "What a user needs to load this adapter."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = _add_peft_type_member()
        if isinstance(self.target_modules, list | set | tuple) and not isinstance(self.target_modules, str):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list | tuple):
            self.exclude_modules = set(self.exclude_modules)
        self.validate()
        # numpy scalars pass validation; store plain Python numbers so the config serialises to JSON
        for name in ("num_params", "lora_rank", "block_size", "seed", "warmup_steps"):
            if getattr(self, name) is not None:
                setattr(self, name, int(getattr(self, name)))
        self.keep_ratio, self.warmup_lr = float(self.keep_ratio), float(self.warmup_lr)
        self.lora_rank_pattern = {k: int(v) for k, v in self.lora_rank_pattern.items()}
        self.entries_pattern = {k: int(v) for k, v in self.entries_pattern.items()}
        self.weight_shapes = {k: [int(d) for d in shape] for k, shape in self.weight_shapes.items()}

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field whose type or range is invalid; nothing is modified."""
        _check_names("target_modules", self.target_modules)
        _check_names("exclude_modules", self.exclude_modules)
        if not _is_real(self.keep_ratio) or not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        _check_int("num_params", self.num_params, minimum=1, optional=True)
        _check_int("lora_rank", self.lora_rank, minimum=1, optional=True)
        if self.num_params is not None and self.lora_rank is not None:
            raise ValueError("give at most one of num_params and lora_rank")
        _check_mapping("lora_rank_pattern", self.lora_rank_pattern, minimum=1)
        _check_int("block_size", self.block_size, minimum=1, optional=True)
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"mask_init must be one of {MASK_INITS}, got {self.mask_init!r}")
        if self.budget_scope not in ("layer", "global"):
            raise ValueError(f"budget_scope must be 'layer' or 'global', got {self.budget_scope!r}")
        _check_int("seed", self.seed, minimum=None, optional=True)
        _check_int("warmup_steps", self.warmup_steps, minimum=1)
        if not _is_real(self.warmup_lr) or not (math.isfinite(float(self.warmup_lr)) and float(self.warmup_lr) > 0):
            raise ValueError(f"warmup_lr must be a finite number > 0, got {self.warmup_lr!r}")
        for name in ("fan_in_fan_out", "init_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        layers = self.layers_to_transform
        if layers is not None:
            for layer in [layers] if not isinstance(layers, list | tuple) else layers:
                _check_int("layers_to_transform", layer, minimum=0)
        _check_names("layers_pattern", self.layers_pattern)
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern requires layers_to_transform")
        _check_names("modules_to_save", self.modules_to_save)
        _check_token_indices(self.trainable_token_indices)
        _check_mapping("entries_pattern", self.entries_pattern, minimum=0)
        if not isinstance(self.weight_shapes, dict):
            raise ValueError(f"weight_shapes must be a dict, got {type(self.weight_shapes).__name__}")
        for name, shape in self.weight_shapes.items():
            if not (isinstance(shape, list | tuple) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)):
                raise ValueError(f"weight_shapes[{name!r}] must be [rows, cols] of positive ints, got {shape!r}")
        if not isinstance(self.requires, str):
            raise ValueError(f"requires must be a string, got {self.requires!r}")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the JSON config and make sure the model card says how to install and import the plugin.

        PEFT saves the weights just before the config; their file gets the umask's mode like the other files.
        """
        super().save_pretrained(save_directory, **kwargs)
        add_install_note(save_directory)
        apply_default_mode(os.path.join(save_directory, SAFETENSORS_WEIGHTS_NAME))

    @property
    def is_data_driven(self) -> bool:
        """Whether the mask is chosen by calibration on task data."""
        return self.mask_init in DATA_DRIVEN_MASK_INITS

    @property
    def entry_width(self) -> int:
        """Values stored per index: 1 for unstructured masks, block_size² for block masks."""
        return 1 if self.block_size is None else self.block_size**2

    @classmethod
    def from_lora_config(cls, lora_config: Any, **overrides: Any) -> SparseAdapterConfig:
        """Same targets and the same trainable-parameter count as ``lora_config``; override any field."""

        def copy(value: Any) -> Any:
            return set(value) if isinstance(value, set) else (list(value) if isinstance(value, list) else value)

        kwargs: dict[str, Any] = {
            "target_modules": copy(lora_config.target_modules),
            "exclude_modules": copy(getattr(lora_config, "exclude_modules", None)),
            "layers_to_transform": lora_config.layers_to_transform,
            "layers_pattern": lora_config.layers_pattern,
            "modules_to_save": copy(lora_config.modules_to_save),
            "trainable_token_indices": _copy_token_indices(getattr(lora_config, "trainable_token_indices", None)),
            "fan_in_fan_out": lora_config.fan_in_fan_out,
            "task_type": lora_config.task_type,
            "base_model_name_or_path": lora_config.base_model_name_or_path,
            "inference_mode": lora_config.inference_mode,
            "lora_rank": int(lora_config.r),
            "lora_rank_pattern": dict(getattr(lora_config, "rank_pattern", None) or {}),
        }
        kwargs.update(overrides)
        if "num_params" in overrides and "lora_rank" not in overrides:
            kwargs["lora_rank"] = None
        return cls(**kwargs)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_int(field_name: str, value: object, minimum: int | None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or (minimum is not None and value < minimum):  # type: ignore[operator]
        wanted = "an int" if minimum is None else ("a positive int" if minimum == 1 else f"an int >= {minimum}")
        raise ValueError(f"{field_name} must be {wanted}{' or None' if optional else ''}, got {value!r}")


def _check_mapping(field_name: str, value: object, minimum: int) -> None:
    if not isinstance(value, dict):
        raise ValueError(f"{field_name} must be a dict of module name -> int, got {type(value).__name__}")
    for key, count in value.items():
        if not isinstance(key, str):
            raise ValueError(f"{field_name} keys must be module names (str), got {key!r}")
        _check_int(f"{field_name}[{key!r}]", count, minimum=minimum)


def _check_token_indices(value: object) -> None:
    """None, a list of token ids (the input embedding), or a dict of embedding module name -> list of token ids."""
    if value is None:
        return
    per_module = value if isinstance(value, dict) else {None: value}
    for name, ids in per_module.items():
        where = "trainable_token_indices" if name is None else f"trainable_token_indices[{name!r}]"
        if name is not None and not isinstance(name, str):
            raise ValueError(f"trainable_token_indices keys must be module names (str), got {name!r}")
        if not isinstance(ids, list | tuple) or not all(_is_int(i) and i >= 0 for i in ids):
            raise ValueError(f"{where} must be a list of token ids (ints >= 0), got {ids!r}")


def _copy_token_indices(value: Any) -> Any:
    if isinstance(value, dict):
        return {name: list(ids) for name, ids in value.items()}
    return list(value) if isinstance(value, list | tuple) else value


def _check_names(field_name: str, value: object) -> None:
    """None, a string (suffix or regex), or a collection of strings."""
    if value is None or isinstance(value, str):
        return
    if not isinstance(value, list | tuple | set | frozenset) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{field_name} must be a string or a list of strings, got {value!r}")


__all__ = ["DATA_DRIVEN_MASK_INITS", "MASK_INITS", "PEFT_TYPE_NAME", "SparseAdapterConfig"]
