"""Targets, the Markdown report and the bar chart of the performance benchmark (all written atomically)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import methods
from .scenarios import LORA_SVD

MiB = 2**20


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    threshold: float
    at_most: bool  # measured <= threshold (else >=)
    measure: Callable[[dict[str, Any]], float]
    paired: tuple[str, str] | None = None  # step targets: (method, reference) for the per-round ratio range


def _ratio(metric: str, num: str, den: str) -> Callable[[dict[str, Any]], float]:
    return lambda model: model["methods"][num][metric] / model["methods"][den][metric]


def _checkpoint(method: str) -> Callable[[dict[str, Any]], float]:
    return lambda model: (
        model["methods"][method]["checkpoint_bytes"] / model["methods"][method]["checkpoint_floor_bytes"]
    )


def _merge_speedup(label: str) -> Callable[[dict[str, Any]], float]:
    return lambda model: (
        model["merge_experts"]["merges"][LORA_SVD]["cpu_s"] / model["merge_experts"]["merges"][label]["cpu_s"]
    )


def _step(key: str, text: str, threshold: float, num: str, den: str) -> Target:
    return Target(key, text, threshold, True, _ratio("step_cpu_s", num, den), (num, den))


MODEL_TARGETS = [
    _step("step_vs_shira", "step: unstructured / SHiRA", 0.8, "sparse", "shira"),
    _step("step_vs_supertuning", "step: unstructured / Super-Tuning", 0.8, "sparse", "supertuning"),
    _step("block_step_vs_lora", "step: block 32 / LoRA r=8", 1.0, "sparse_block32", "lora_r8"),
    _step("step_vs_lower_bound", "step: unstructured / frozen lower bound", 1.25, "sparse", methods.LOWER_BOUND),
    _step(
        "block_step_vs_lower_bound", "step: block 32 / frozen lower bound", 1.25, "sparse_block32", methods.LOWER_BOUND
    ),
    Target(
        "memory_vs_lora",
        "peak memory: unstructured / LoRA r=8",
        1.10,
        True,
        _ratio("peak_memory_bytes", "sparse", "lora_r8"),
    ),
    Target(
        "block_memory_vs_lora",
        "peak memory: block 32 / LoRA r=8",
        1.10,
        True,
        _ratio("peak_memory_bytes", "sparse_block32", "lora_r8"),
    ),
    Target(
        "checkpoint",
        "checkpoint: unstructured / (4 B per value + 4 B per index)",
        1.1,
        True,
        _checkpoint("sparse"),
    ),
    Target(
        "block_checkpoint",
        "checkpoint: block 32 / (4 B per value + 4 B per block index)",
        1.1,
        True,
        _checkpoint("sparse_block32"),
    ),
    Target(
        "merge_sparse_average",
        "merge N experts: LoRA svd time / unstructured sparse_average time",
        50.0,
        False,
        _merge_speedup("peft-sparse unstructured, sparse_average"),
    ),
    Target(
        "merge_linear",
        "merge N experts: LoRA svd time / unstructured linear time",
        50.0,
        False,
        _merge_speedup("peft-sparse unstructured, linear"),
    ),
    Target(
        "block_merge_sparse_average",
        "merge N experts: LoRA svd time / block 32 sparse_average time",
        50.0,
        False,
        _merge_speedup("peft-sparse block 32, sparse_average"),
    ),
]
SWAP_TARGETS = [
    Target(
        "swap_weight_growth",
        "merged swap, sparse: time on a 16x larger weight / smaller weight, same entries (not weight size)",
        2.0,
        True,
        lambda data: data["swap_scaling"]["ratios"]["sparse_weight_growth"],
    ),
    Target(
        "swap_entry_growth",
        "merged swap, sparse: time at 4x entries / 1x entries, same weight (proportional to entries)",
        2.0,
        False,
        lambda data: data["swap_scaling"]["ratios"]["sparse_entry_growth"],
    ),
]


# Step targets repeated on every other base (bf16, quantized): the same methods, measured the same way.
VARIANT_TARGETS = [
    _step("step_vs_shira", "step: unstructured / SHiRA", 0.8, "sparse", "shira"),
    _step("block_step_vs_lora", "step: block 32 / LoRA r=8", 1.0, "sparse_block32", "lora_r8"),
    _step("step_vs_lower_bound", "step: unstructured / frozen lower bound", 1.25, "sparse", methods.LOWER_BOUND),
    _step(
        "block_step_vs_lower_bound", "step: block 32 / frozen lower bound", 1.25, "sparse_block32", methods.LOWER_BOUND
    ),
]


def evaluate_targets(data: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def add(target: Target, scope: str, source: dict[str, Any]) -> None:
        try:
            value = float(target.measure(source))
        except (KeyError, TypeError, ZeroDivisionError):
            value = math.nan
        met = math.isfinite(value) and (value <= target.threshold if target.at_most else value >= target.threshold)
        spread = None
        if target.paired is not None:
            num, den = (source["methods"][m]["step_cpu_all_s"] for m in target.paired)
            ratios = [a / b for a, b in zip(num, den, strict=True)]
            spread = [min(ratios), max(ratios)]
        rows.append(
            {
                "key": target.key,
                "target": target.text,
                "scope": scope,
                "measured": value,
                "threshold": ("<= " if target.at_most else ">= ") + f"{target.threshold:g}",
                "met": bool(met),
                "per_round_range": spread,
            }
        )

    for name, model in data["models"].items():
        for target in MODEL_TARGETS:
            add(target, name, model)
        for variant_name, variant in model.get("base_variants", {}).items():
            for target in VARIANT_TARGETS:  # a skipped variant (library not installed) has no methods
                if all(m in variant.get("methods", {}) for m in target.paired or ()):
                    add(target, f"{name}, {variant_name} base", variant)
    for target in SWAP_TARGETS:
        add(target, "one square weight", data)
    return rows


# --- formatting ----------------------------------------------------------------------------------------------
def _num(value: Any, scale: float = 1.0, digits: int = 3) -> str:
    if value is None:
        return "—"
    value = float(value) / scale
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _bytes(value: Any) -> str:
    if value is None:
        return "—"
    value = float(value)
    if value >= 10 * MiB:
        return f"{value / MiB:,.0f} MiB"
    if value >= MiB:
        return f"{value / MiB:.2f} MiB"
    return f"{value / 1024:,.0f} KiB"


def model_table(model: dict[str, Any]) -> list[str]:
    rows = model["methods"]
    lora = rows["lora_r8"]["step_cpu_s"]
    lower = rows[methods.LOWER_BOUND]["step_cpu_s"]
    lines = [
        "| method | trainable | step CPU s | × LoRA r=8 | × lower bound | step wall s | peak memory "
        "| (persistent + step peak) | optimizer state | checkpoint | merge_and_unload ms | forward ms | swap ms "
        "| merged swap ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in methods.METHODS:
        r = rows[name]
        lines.append(
            "| "
            + " | ".join(
                [
                    methods.LABELS[name],
                    _num(r["trainable_params"], digits=4) if r["trainable_params"] is not None else "0",
                    f"{r['step_cpu_s']:.3f}",
                    f"{r['step_cpu_s'] / lora:.2f}",
                    f"{r['step_cpu_s'] / lower:.2f}",
                    f"{r['step_wall_s']:.3f}",
                    _bytes(r["peak_memory_bytes"]),
                    f"{_bytes(r['persistent_bytes'])} + {_bytes(r['step_peak_bytes'])}",
                    _bytes(r["optimizer_state_bytes"]),
                    _bytes(r["checkpoint_bytes"]),
                    _num(r["merge_and_unload_s"], 1e-3),
                    _num(r["forward_s"], 1e-3),
                    _num(r["swap_s"], 1e-3),
                    _num(r["swap_merged_s"], 1e-3),
                ]
            )
            + " |"
        )
    return lines


def variants_table(model: dict[str, Any]) -> list[str]:
    """Step times on the other bases (bf16, quantized), with ratios to LoRA r=8 and the lower bound there; then
    what each base's targeted weights are, and which PEFT layers the adapters used on it."""
    lines = [
        "| base | method | trainable | step CPU s | × LoRA r=8 | × lower bound | step wall s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for variant in model.get("base_variants", {}).values():
        if "skipped" in variant:
            lines.append(f"| {variant['label']} | skipped: {variant['skipped']} | | | | | |")
            continue
        rows = variant["methods"]
        lora = rows.get("lora_r8", {}).get("step_cpu_s")
        lower = rows.get(methods.LOWER_BOUND, {}).get("step_cpu_s")
        for name, r in rows.items():
            cells = [variant["label"], methods.LABELS[name], f"{r['trainable_params']:,}", f"{r['step_cpu_s']:.3f}"]
            cells += [f"{r['step_cpu_s'] / ref:.2f}" if ref else "—" for ref in (lora, lower)]
            cells.append(f"{r['step_wall_s']:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        used = {methods.LABELS[name]: r["adapter_layers"] for name, r in rows.items() if r["adapter_layers"]}
        layers = "; ".join(f"{label}: {', '.join(kinds)}" for label, kinds in used.items())
        notes.append(f"- {variant['label']}: targeted weights {', '.join(variant['weight_types'])}; layers: {layers}.")
    return lines + ([""] + notes if notes else [])


def merge_table(model: dict[str, Any]) -> list[str]:
    merges = model["merge_experts"]["merges"]
    svd = merges[LORA_SVD]["cpu_s"]
    lines = [
        "| merge | CPU s | LoRA svd ÷ this | stored values: one expert → merged |",
        "|---|---:|---:|---:|",
    ]
    for label, timing in merges.items():
        sizes = "—"
        if "stored_values_merged" in timing:
            sizes = f"{timing['stored_values_per_expert']:,} → {timing['stored_values_merged']:,}"
        lines.append(f"| {label} | {timing['cpu_s']:.4f} | {svd / timing['cpu_s']:.1f} | {sizes} |")
    return lines


def swap_table(scaling: dict[str, Any]) -> list[str]:
    lines = ["| adapter | weight | stored entries | merged swap ms |", "|---|---:|---:|---:|"]
    for row in scaling["rows"]:
        size = row["weight_size"]
        ms = row["swap_merged_s"] * 1e3
        lines.append(f"| {row['method']} | {size}x{size} | {row['stored_entries']:,} | {ms:.2f} |")
    ratios = scaling["ratios"]
    lines.append("")
    lines.append(
        f"Weight {ratios['weight_size_ratio']:.0f}x larger at the same entries: sparse swap ×"
        f"{ratios['sparse_weight_growth']:.2f}, LoRA swap ×{ratios['lora_weight_growth']:.2f}; "
        f"4x the entries on the same weight: sparse swap ×{ratios['sparse_entry_growth']:.2f}."
    )
    return lines


def targets_table(targets: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| target | model | measured | per-round range | threshold | status |",
        "|---|---|---:|---:|---:|---|",
    ]
    for t in targets:
        status = "met" if t["met"] else "MISSED"
        spread = t.get("per_round_range")
        span = f"{spread[0]:.2f}–{spread[1]:.2f}" if spread else ""
        lines.append(f"| {t['target']} | {t['scope']} | {t['measured']:.3g} | {span} | {t['threshold']} | {status} |")
    return lines


def markdown(data: dict[str, Any]) -> str:
    meta = data["meta"]
    env = meta["environment"]
    s = meta["settings"]
    lines = [
        "# peft-sparse performance benchmark" + (" (QUICK MODE: tiny dims, not meaningful)" if meta["quick"] else ""),
        "",
        f"- Date: {meta['date']}; command: `{meta['command']}`; code: {meta.get('git', 'unknown')}; runtime "
        f"{meta['runtime_wall_s']:.0f} s wall.",
        f"- torch {env['torch']}, peft {env['peft']}, transformers {env['transformers']}; CPU: {env['cpu']} "
        f"({env['cores']} cores, shared), torch threads: {env['torch_threads']}.",
        f"- Times are process CPU time, medians: training steps over {s['steps']} interleaved rounds after "
        f"{s['warmup']} warm-up steps; swaps over {s['repeats']} repeats; merges over {s['merge_repeats']} "
        "(LoRA svd: once). Wall time swings with other load on the shared cores.",
        "- Peak memory = live tensor bytes between steps (weights, buffers, optimizer state) + torch.profiler "
        "CPU-allocator peak during one step. See docs/performance.md for every metric.",
        "",
    ]
    for name, model in data["models"].items():
        b, t = model["batch"]
        lines += [
            f"## {name}: {model['title']}",
            "",
            f"Batch {b}x{t} tokens; targets {', '.join(model['target_modules'])}; base parameters "
            f"{model['base_params']:,}; LoRA r=8 trainable {model['lora_r8_trainable']:,}. Swap request: 1x"
            f"{model['swap_request'][1]} tokens.",
            "",
            *model_table(model),
            "",
            *(
                [
                    "Step time on other bases (same model and batch, interleaved rounds like the table above):",
                    "",
                    *variants_table(model),
                    "",
                ]
                if model.get("base_variants")
                else []
            ),
            f"Merging {model['merge_experts']['count']} experts with `add_weighted_adapter` (random non-zero values; "
            "sparse experts with distinct random masks unless marked; LoRA svd with `svd_full_matrices=False`):",
            "",
            *merge_table(model),
            "",
        ]
    lines += ["## Expert swap scaling (one square weight)", "", *swap_table(data["swap_scaling"]), ""]
    met = sum(t["met"] for t in data["targets"])
    lines += [
        f"## Targets ({met} of {len(data['targets'])} met)",
        "",
        "Step ratios are of medians; the per-round range is the spread of the same ratio within each round.",
        "",
        *targets_table(data["targets"]),
        "",
    ]
    return "\n".join(lines)


# --- outputs -------------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["models"].items())
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8), squeeze=False)
    labels = [methods.LABELS[m] for m in methods.METHODS]
    colors = ["#888888", "#4c72b0", "#6f8fc9", "#dd8452", "#c44e52", "#55a868", "#2f7d4a", "#bbbbbb"]
    for col, (name, model) in enumerate(models):
        rows = model["methods"]
        for row, (metric, scale, unit) in enumerate(
            [("step_cpu_s", 1.0, "step CPU time (s)"), ("peak_memory_bytes", MiB, "peak training memory (MiB)")]
        ):
            ax = axes[row][col]
            values = [rows[m][metric] / scale for m in methods.METHODS]
            ax.barh(range(len(values)), values, color=colors[: len(values)])
            ax.set_yticks(range(len(values)))
            ax.set_yticklabels(labels if col == 0 else [""] * len(labels), fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel(unit)
            ax.set_title(f"{name}: {unit}", fontsize=10)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
            ax.margins(x=0.15)
    title = "peft-sparse performance benchmark" + (" (quick mode)" if data["meta"]["quick"] else "")
    fig.suptitle(f"{title}: {data['meta']['date']}", fontsize=11)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_all(data: dict[str, Any], out: Path) -> None:
    out = Path(out)
    text = json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n"
    _atomic_write(out / "perf.json", lambda tmp: tmp.write_text(text))
    md = markdown(data)
    _atomic_write(out / "perf.md", lambda tmp: tmp.write_text(md))
    plot(data, out / "perf.png")
