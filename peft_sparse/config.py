"""``SparseAdapterConfig``: which weights get a sparse adapter, how many entries, and how they are chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from peft.config import PeftConfig

from .files import add_install_note
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

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field."""
        if not (0.0 < float(self.keep_ratio) <= 1.0):
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.mask_init not in MASK_INITS:
            raise ValueError(f"mask_init must be one of {MASK_INITS}, got {self.mask_init!r}")
        if self.budget_scope not in ("layer", "global"):
            raise ValueError(f"budget_scope must be 'layer' or 'global', got {self.budget_scope!r}")
        if self.block_size is not None and (not isinstance(self.block_size, int) or self.block_size < 1):
            raise ValueError(f"block_size must be None or a positive int, got {self.block_size!r}")
        if self.num_params is not None and self.lora_rank is not None:
            raise ValueError("give at most one of num_params and lora_rank")
        if self.num_params is not None and int(self.num_params) < 1:
            raise ValueError(f"num_params must be a positive int, got {self.num_params}")
        if self.lora_rank is not None and int(self.lora_rank) < 1:
            raise ValueError(f"lora_rank must be a positive int, got {self.lora_rank}")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern requires layers_to_transform")
        for name, count in self.entries_pattern.items():
            if int(count) < 0:
                raise ValueError(f"entries_pattern[{name!r}] must be >= 0, got {count}")

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the JSON config and make sure the model card says how to install and import the plugin."""
        super().save_pretrained(save_directory, **kwargs)
        add_install_note(save_directory)

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


__all__ = ["DATA_DRIVEN_MASK_INITS", "MASK_INITS", "PEFT_TYPE_NAME", "SparseAdapterConfig"]
