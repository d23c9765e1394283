"""Read saved sparse-adapter directories (PEFT format) lazily and write new ones atomically.

A saved adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. For every adapted
module ``<name>`` the safetensors file has ``base_model.model.<name>.sparse_adapter_values`` (1-D, ``n * k``
values, ``k = 1`` or ``block_size**2``) and ``base_model.model.<name>.sparse_adapter_indices`` (1-D, sorted).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import masks
from .files import INSTALL_NOTE, atomic_write_bytes, atomic_write_text, default_mode

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
README_NAME = "README.md"
SPARSE_PEFT_TYPE = "SPARSE_ADAPTER"
KEY_PREFIX = "base_model.model."
VALUES_SUFFIX = ".sparse_adapter_values"
INDICES_SUFFIX = ".sparse_adapter_indices"


class AdapterFormatError(ValueError):
    """A saved adapter is missing, malformed, or incompatible with the others."""


def values_key(layer: str) -> str:
    """Safetensors key of a layer's values."""
    return f"{KEY_PREFIX}{layer}{VALUES_SUFFIX}"


def indices_key(layer: str) -> str:
    """Safetensors key of a layer's indices."""
    return f"{KEY_PREFIX}{layer}{INDICES_SUFFIX}"


def _parse_key(key: str) -> tuple[str, str] | None:
    """``(layer, 'values' | 'indices')`` for a sparse-adapter key, else None."""
    if not key.startswith(KEY_PREFIX):
        return None
    for suffix, kind in ((VALUES_SUFFIX, "values"), (INDICES_SUFFIX, "indices")):
        if key.endswith(suffix) and len(key) > len(KEY_PREFIX) + len(suffix):
            return key[len(KEY_PREFIX) : -len(suffix)], kind
    return None


def _positive_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Load and check ``adapter_config.json`` of a saved sparse adapter."""
    directory = Path(adapter_dir)
    if not directory.is_dir():
        raise AdapterFormatError(f"{directory}: adapter directory not found")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFormatError(f"{directory}: missing {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterFormatError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object")
    if config.get("peft_type") != SPARSE_PEFT_TYPE:
        raise AdapterFormatError(
            f"{directory}: peft_type is {config.get('peft_type')!r}, expected {SPARSE_PEFT_TYPE!r}"
        )
    block = config.get("block_size")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise AdapterFormatError(f"{directory}: block_size must be null or a positive int, got {block!r}")
    for field in ("entries_pattern", "weight_shapes"):
        if not isinstance(config.get(field), dict):
            raise AdapterFormatError(f"{directory}: config field {field!r} missing or not an object")
    for name, shape in config["weight_shapes"].items():
        if not (isinstance(shape, list) and len(shape) == 2 and all(_positive_int(s) for s in shape)):
            raise AdapterFormatError(f"{directory}: weight_shapes[{name!r}] must be [R, C], got {shape!r}")
    return config


def list_layers(adapter_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the adapted modules stored in a saved adapter."""
    with SparseAdapterFile(adapter_dir) as adapter:
        return adapter.layer_names


class SparseAdapterFile:
    """One saved sparse adapter: its config plus lazy, validated per-layer tensor access (``safe_open``)."""

    def __init__(self, adapter_dir: str | os.PathLike) -> None:
        self.path = Path(adapter_dir)
        self.config = read_adapter_config(self.path)
        weights = self.path / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterFormatError(f"{self.path}: missing {WEIGHTS_NAME}")
        self._stack = ExitStack()
        try:
            self._handle = self._stack.enter_context(safe_open(str(weights), framework="pt"))
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            raise AdapterFormatError(f"{weights}: cannot read safetensors file ({error})") from error
        found: dict[str, set[str]] = {}
        self.extra_keys: list[str] = []
        for key in self._handle.keys():
            parsed = _parse_key(key)
            if parsed is None:
                self.extra_keys.append(key)
            else:
                found.setdefault(parsed[0], set()).add(parsed[1])
        try:
            self.layer_names: list[str] = self._check_layers(found)
        except BaseException:
            self.close()
            raise

    def _check_layers(self, found: dict[str, set[str]]) -> list[str]:
        """Sorted layer names, after checking the tensors agree with the config."""
        for layer, kinds in found.items():
            if kinds != {"values", "indices"}:
                raise AdapterFormatError(f"{self.path}: layer {layer!r} has only its {kinds.pop()} tensor")
        pattern = set(self.config["entries_pattern"])
        if set(found) != pattern:
            diff = sorted(set(found) ^ pattern)[:5]
            raise AdapterFormatError(f"{self.path}: entries_pattern and weights disagree on layers {diff}")
        missing = sorted(pattern - set(self.config["weight_shapes"]))
        if missing:
            raise AdapterFormatError(f"{self.path}: weight_shapes missing for layers {missing[:5]}")
        return sorted(found)

    @property
    def block_size(self) -> int | None:
        """Block size, or None for unstructured adapters."""
        return self.config.get("block_size")

    @property
    def entry_width(self) -> int:
        """Values per stored row: 1, or ``block_size**2``."""
        return 1 if self.block_size is None else self.block_size**2

    def shape(self, layer: str) -> tuple[int, int]:
        """Storage-layout shape ``(R, C)`` of the layer's base weight."""
        rows, cols = self.config["weight_shapes"][layer]
        return int(rows), int(cols)

    def num_slots(self, layer: str) -> int:
        """Selectable positions of the layer: entries, or blocks of the grid."""
        return masks.num_slots(self.shape(layer), self.block_size)

    def read_layer(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices (n,), values (n, k))`` of one layer, checked against the config."""
        if layer not in self.config["entries_pattern"]:
            raise AdapterFormatError(f"{self.path}: no layer {layer!r}")
        indices = self._handle.get_tensor(indices_key(layer))
        values = self._handle.get_tensor(values_key(layer))
        rows = int(self.config["entries_pattern"][layer])
        where = f"{self.path}: {layer}"
        try:
            masks.check_indices(indices, self.num_slots(layer), rows, where)
        except ValueError as error:
            raise AdapterFormatError(str(error)) from error
        if values.dim() != 1 or not values.dtype.is_floating_point:
            raise AdapterFormatError(f"{where}: values must be a 1-D float tensor, got {values.dtype}")
        if values.numel() != rows * self.entry_width:
            raise AdapterFormatError(f"{where}: {values.numel()} values, expected {rows}x{self.entry_width}")
        return indices, values.reshape(rows, self.entry_width)

    def close(self) -> None:
        """Release the safetensors file."""
        self._stack.close()

    def __enter__(self) -> SparseAdapterFile:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def check_same_targets(adapters: Sequence[SparseAdapterFile]) -> None:
    """Raise ``AdapterFormatError`` unless all adapters have the same layers and weight shapes."""
    if not adapters:
        raise AdapterFormatError("no adapters given")
    first = adapters[0]
    for other in adapters[1:]:
        if other.layer_names != first.layer_names:
            diff = sorted(set(other.layer_names) ^ set(first.layer_names))[:5]
            raise AdapterFormatError(f"target layers differ between {first.path} and {other.path}: {diff}")
        for layer in first.layer_names:
            if other.shape(layer) != first.shape(layer):
                raise AdapterFormatError(
                    f"weight_shapes[{layer!r}] differs: {first.path} has {list(first.shape(layer))}, "
                    f"{other.path} has {list(other.shape(layer))}"
                )


def check_compatible(adapters: Sequence[SparseAdapterFile], allow_extra_keys: bool = False) -> None:
    """Raise ``AdapterFormatError`` unless all adapters have the same layers, weight shapes and block size."""
    if not adapters:
        raise AdapterFormatError("no adapters given")
    first = adapters[0]
    for other in adapters[1:]:
        if other.block_size != first.block_size:
            raise AdapterFormatError(
                f"block_size differs: {first.path} has {first.block_size}, {other.path} has {other.block_size}"
            )
    check_same_targets(adapters)
    if allow_extra_keys:
        return
    for adapter in adapters:
        if not adapter.extra_keys:
            continue
        shared = [k for k in adapter.extra_keys if "modules_to_save" in k]
        if shared:
            raise AdapterFormatError(
                f"shared modules_to_save cannot be merged: {adapter.path} stores {shared[0]!r}"
                + (f" and {len(shared) - 1} more" if len(shared) > 1 else "")
            )
        raise AdapterFormatError(f"{adapter.path}: cannot merge unexpected tensor {adapter.extra_keys[0]!r}")


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``FileExistsError`` unless ``out_dir`` is absent, an empty directory, or ``overwrite`` is set."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace")


def model_card(title: str, details: Sequence[str] = ()) -> str:
    """README text for a saved sparse adapter, with install/import instructions for the plugin."""
    lines = [f"# {title}", ""] + [f"- {line}" for line in details]
    return "\n".join(lines) + "\n" + INSTALL_NOTE


def write_adapter_dir(
    out_dir: str | os.PathLike,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    readme: str,
    overwrite: bool = False,
) -> Path:
    """Write a whole adapter directory atomically: build it in a sibling temp dir, then rename it in place."""
    out = Path(out_dir)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    trash: Path | None = None
    try:
        os.chmod(staging, default_mode("dir"))
        contiguous = {key: tensor.contiguous() for key, tensor in tensors.items()}
        save_file(contiguous, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        config_text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        (staging / CONFIG_NAME).write_text(config_text, encoding="utf-8")
        (staging / README_NAME).write_text(readme, encoding="utf-8")
        for name in (WEIGHTS_NAME, CONFIG_NAME, README_NAME):
            os.chmod(staging / name, default_mode("file"))  # safetensors creates its file as 0600
        check_output_dir(out, overwrite)  # re-check: something may have appeared meanwhile
        if out.exists():
            if any(out.iterdir()):
                trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
                os.replace(out, trash / "old")
            else:
                out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if trash is not None and (trash / "old").exists() and not out.exists():
            os.replace(trash / "old", out)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)
    return out


__all__ = [
    "CONFIG_NAME",
    "README_NAME",
    "WEIGHTS_NAME",
    "AdapterFormatError",
    "SparseAdapterFile",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_compatible",
    "check_output_dir",
    "indices_key",
    "list_layers",
    "model_card",
    "read_adapter_config",
    "values_key",
    "write_adapter_dir",
]
