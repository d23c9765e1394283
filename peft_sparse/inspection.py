"""Compare saved sparse adapters: densities, parameter counts, mask overlap and sign conflicts.

Overlap and conflicts are measured on weight-entry positions (for block adapters every real entry of a block
counts; padding slots past a ragged edge do not). A stored value of exactly 0 has no sign and never conflicts.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from . import adapter_files, masks
from .merging import align_on_union


def _ratio(num: torch.Tensor, den: torch.Tensor) -> list[list[float | None]]:
    """Element-wise ``num / den`` as nested lists, None where ``den`` is 0."""
    return [
        [(float(n) / float(d)) if d > 0 else None for n, d in zip(rn, rd, strict=True)]
        for rn, rd in zip(num.tolist(), den.tolist(), strict=True)
    ]


class _Stats:
    """Pairwise counts over entry positions, summable across layers."""

    def __init__(self, n: int) -> None:
        self.sizes = torch.zeros(n, dtype=torch.float64)
        self.shared = torch.zeros(n, n, dtype=torch.float64)
        self.conflicts = torch.zeros(n, n, dtype=torch.float64)
        self.multi_shared = 0
        self.multi_conflicts = 0
        self.union = 0

    def add(self, other: _Stats) -> None:
        self.sizes += other.sizes
        self.shared += other.shared
        self.conflicts += other.conflicts
        self.multi_shared += other.multi_shared
        self.multi_conflicts += other.multi_conflicts
        self.union += other.union

    def summary(self) -> dict[str, Any]:
        union = self.sizes[:, None] + self.sizes[None, :] - self.shared
        return {
            "jaccard": _ratio(self.shared, union),
            "shared_entries": [[int(x) for x in row] for row in self.shared.tolist()],
            "sign_conflict": _ratio(self.conflicts, self.shared),
            "sign_conflict_rate": (self.multi_conflicts / self.multi_shared) if self.multi_shared else None,
            "union_entries": self.union,
        }


def _layer_stats(
    indices: list[torch.Tensor], values: list[torch.Tensor], shape: tuple[int, int], block_size: int | None
) -> _Stats:
    """Overlap and sign-conflict counts of one layer."""
    union, aligned, present = align_on_union(indices, values)
    if block_size is None:
        valid = torch.ones(union.numel(), 1, dtype=torch.bool)
    else:
        valid = masks.block_entry_positions(union, block_size, shape)[1].reshape(-1, block_size**2)
    held = (present[:, :, None] & valid[None]).reshape(len(values), -1)
    flat = aligned.reshape(len(values), -1)
    pos, neg = (flat > 0) & held, (flat < 0) & held
    h, p, q = held.double(), pos.double(), neg.double()
    stats = _Stats(len(values))
    stats.sizes = h.sum(dim=1)
    stats.shared = h @ h.T
    stats.conflicts = p @ q.T + q @ p.T
    multi = held.sum(dim=0) >= 2
    stats.union = int(held.any(dim=0).sum())
    stats.multi_shared = int(multi.sum())
    stats.multi_conflicts = int((multi & pos.any(dim=0) & neg.any(dim=0)).sum())
    return stats


def inspect_adapters(adapter_dirs: Sequence[str | os.PathLike]) -> dict[str, Any]:
    """Per-layer and overall densities, parameter counts, pairwise Jaccard overlap and sign-conflict rates."""
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise ValueError("no adapters given")
    n = len(dirs)
    total = _Stats(n)
    layers: dict[str, Any] = {}
    entries_sum, params_sum, weight_sum = [0] * n, [0] * n, 0
    with ExitStack() as stack:
        adapters = [stack.enter_context(adapter_files.SparseAdapterFile(d)) for d in dirs]
        adapter_files.check_compatible(adapters, allow_extra_keys=True)
        first = adapters[0]
        for layer in first.layer_names:
            parts = [adapter.read_layer(layer) for adapter in adapters]
            shape = first.shape(layer)
            stats = _layer_stats([p[0] for p in parts], [p[1] for p in parts], shape, first.block_size)
            total.add(stats)
            entries = [int(x) for x in stats.sizes.tolist()]
            params = [int(p[1].numel()) for p in parts]
            numel = shape[0] * shape[1]
            layers[layer] = {
                "shape": list(shape),
                "stored_rows": [int(p[0].numel()) for p in parts],
                "entries": entries,
                "params": params,
                "density": [e / numel for e in entries],
                **stats.summary(),
            }
            entries_sum = [a + b for a, b in zip(entries_sum, entries, strict=True)]
            params_sum = [a + b for a, b in zip(params_sum, params, strict=True)]
            weight_sum += numel
        block_size = first.block_size
    return {
        "adapters": [str(d) for d in dirs],
        "block_size": block_size,
        "layers": layers,
        "overall": {
            "weight_entries": weight_sum,
            "entries": entries_sum,
            "params": params_sum,
            "density": [e / weight_sum if weight_sum else 0.0 for e in entries_sum],
            **total.summary(),
        },
    }


def _fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def mean_off_diagonal(matrix: list[list[float | None]]) -> float | None:
    """Mean of a pairwise matrix over distinct pairs (None entries skipped), e.g. the mean Jaccard overlap."""
    vals = [x for i, row in enumerate(matrix) for j, x in enumerate(row) if i != j and x is not None]
    return sum(vals) / len(vals) if vals else None


def format_inspection(report: dict[str, Any]) -> str:
    """A plain-text table of an :func:`inspect_adapters` report."""
    names = [Path(a).name or a for a in report["adapters"]]
    lines = [f"adapters: {', '.join(f'[{i}] {name}' for i, name in enumerate(names))}"]
    lines.append(f"block_size: {report['block_size']}")
    width = max([len("layer")] + [len(layer) for layer in report["layers"]])
    header = f"{'layer':<{width}}  {'shape':>11}  {'density per adapter':<{max(20, 8 * len(names))}}"
    header += f"  {'params (sum)':>12}  {'jaccard':>7}  {'conflict':>8}"
    lines += ["", header, "-" * len(header)]
    for layer, info in report["layers"].items():
        shape = "x".join(str(s) for s in info["shape"])
        dens = " ".join(f"{d:.4f}" for d in info["density"])
        lines.append(
            f"{layer:<{width}}  {shape:>11}  {dens:<{max(20, 8 * len(names))}}  {sum(info['params']):>12}  "
            f"{_fmt(mean_off_diagonal(info['jaccard'])):>7}  {_fmt(info['sign_conflict_rate']):>8}"
        )
    overall = report["overall"]
    lines += ["", "overall (jaccard: mean pairwise; conflict: shared entries with opposite signs)"]
    for i, name in enumerate(names):
        lines.append(
            f"  [{i}] {name}: {overall['entries'][i]} entries, {overall['params'][i]} params, "
            f"density {overall['density'][i]:.6f}"
        )
    for key in ("jaccard", "sign_conflict"):
        lines.append(f"  {key}:")
        for i, row in enumerate(overall[key]):
            lines.append(f"    [{i}] " + " ".join(f"{_fmt(x):>7}" for x in row))
    rate = _fmt(overall["sign_conflict_rate"])
    lines.append(f"  sign-conflict rate (entries stored by >= 2 adapters): {rate}")
    lines.append(f"  union of all masks (the merged adapter's size): {overall['union_entries']} entries")
    return "\n".join(lines)


def render_inspection_png(report: dict[str, Any]) -> bytes:
    """PNG bytes of the overall Jaccard heatmap and per-layer densities (matplotlib Agg, no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is an optional dependency
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from error
    names = [Path(a).name or a for a in report["adapters"]]
    layers = list(report["layers"])
    fig = Figure(figsize=(12, 5), layout="constrained")
    FigureCanvasAgg(fig)
    heat, dens = fig.subplots(1, 2, width_ratios=[1, 2])
    jac = [[float("nan") if x is None else x for x in row] for row in report["overall"]["jaccard"]]
    image = heat.imshow(jac, vmin=0.0, vmax=1.0, cmap="viridis")
    for i, row in enumerate(jac):
        for j, x in enumerate(row):
            label = "-" if x != x else f"{x:.2f}"
            color = "black" if x == x and x > 0.6 else "white"
            heat.text(j, i, label, ha="center", va="center", color=color, fontsize=8)
    heat.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    heat.set_yticks(range(len(names)), names, fontsize=8)
    heat.set_title("mask overlap (Jaccard, all layers)")
    fig.colorbar(image, ax=heat, shrink=0.8)
    x = list(range(len(layers)))
    for i, name in enumerate(names):
        ys = [report["layers"][layer]["density"][i] for layer in layers]
        dens.plot(x, ys, marker="o", ms=3, label=name)
    if len(layers) <= 40:
        dens.set_xticks(x, layers, rotation=90, fontsize=6)
    dens.set_ylim(bottom=0.0)
    dens.set_xlabel("layer")
    dens.set_ylabel("density (stored entries / weight entries)")
    dens.set_title("per-layer density")
    dens.legend(fontsize=8)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def plot_inspection(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Write the inspection plot to ``path`` (PNG) atomically."""
    adapter_files.atomic_write_bytes(path, render_inspection_png(report))


__all__ = ["format_inspection", "inspect_adapters", "plot_inspection", "render_inspection_png"]
