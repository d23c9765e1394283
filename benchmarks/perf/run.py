"""``python -m benchmarks.perf.run [--quick] [--out DIR]``: the performance benchmark.

On the same model and batch, in one process, for every method: step time (forward + backward + AdamW step),
peak training memory, trainable parameters, optimizer-state bytes, checkpoint bytes, ``merge_and_unload`` time
and expert-swap time; then the time to merge N experts and the scaling of an expert swap. Writes
``perf.json``, ``perf.md`` and ``perf.png`` to ``--out`` (default ``benchmarks/results``). ``--quick`` uses tiny
dimensions and 2 steps: it only checks that everything runs (CI), so write it somewhere else.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import bases, measure, methods, report, scenarios
from .models import ModelSpec, forward_only, full_specs, quick_specs

# Metrics every method reports (``None`` where NOT_APPLICABLE says so).
METRICS = [
    "trainable_params",
    "step_cpu_s",
    "step_wall_s",
    "peak_memory_bytes",
    "persistent_bytes",
    "step_peak_bytes",
    "optimizer_state_bytes",
    "checkpoint_bytes",
    "checkpoint_weights_bytes",
    "merge_and_unload_s",
    "forward_s",
    "swap_s",
    "swap_merged_s",
]
NOT_APPLICABLE: dict[str, set[str]] = {
    methods.FULL: {"merge_and_unload_s", "swap_merged_s"},
    methods.LOWER_BOUND: {
        "trainable_params",
        "optimizer_state_bytes",
        "checkpoint_bytes",
        "checkpoint_weights_bytes",
        "merge_and_unload_s",
        "swap_s",
        "swap_merged_s",
    },
}


@dataclass(frozen=True)
class Settings:
    warmup: int
    steps: int
    repeats: int  # swap / merge_and_unload repeats
    merge_repeats: int
    experts: int
    swap_sizes: tuple[int, int]
    swap_entries: int


FULL_SETTINGS = Settings(
    warmup=2, steps=7, repeats=7, merge_repeats=3, experts=20, swap_sizes=(1024, 4096), swap_entries=65536
)
QUICK_SETTINGS = Settings(
    warmup=1, steps=2, repeats=2, merge_repeats=1, experts=4, swap_sizes=(128, 512), swap_entries=2048
)


def log(message: str) -> None:
    print(f"[perf {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_model(spec: ModelSpec, settings: Settings) -> dict[str, Any]:
    """Every per-method metric on one model, then the merge scenario."""
    base = spec.build()
    base.requires_grad_(False)
    batch = spec.batch()
    log(f"{spec.name}: building {len(methods.METHODS)} methods ({spec.batch_size}x{spec.seq_len} tokens)")
    trainers = [measure.Trainer(m, methods.build(m, spec, base), spec, batch) for m in methods.METHODS]
    measure.settle()
    log(f"{spec.name}: step times ({settings.warmup} warm-up + {settings.steps} interleaved rounds)")
    times = measure.train_step_times(trainers, settings.warmup, settings.steps)
    results: dict[str, dict[str, Any]] = {}
    for trainer in trainers:
        name = trainer.name
        row: dict[str, Any] = dict.fromkeys(METRICS)
        row["step_cpu_s"] = times[name]["cpu_s"]
        row["step_wall_s"] = times[name]["wall_s"]
        row["step_cpu_all_s"] = times[name]["cpu_all_s"]
        row.update(measure.training_memory(trainer))
        if name != methods.LOWER_BOUND:
            row["trainable_params"] = trainer.trainable_params
            row["optimizer_state_bytes"] = trainer.optimizer_state_bytes()
            row.update(measure.checkpoint_bytes(trainer.model, full=name == methods.FULL))
        if name in methods.ADAPTER_METHODS:
            row["merge_and_unload_s"] = measure.merge_and_unload_time(trainer.model, settings.merge_repeats)["cpu_s"]
        if name in methods.SPARSE_METHODS:
            row["checkpoint_floor_bytes"] = sparse_floor_bytes(trainer.model)
        results[name] = row
        log(f"{spec.name}: {name}: step {row['step_cpu_s']:.3f} s CPU, peak {row['peak_memory_bytes'] / 2**20:.0f} MiB")
    full_model = trainers[0].model
    del trainers
    measure.settle()

    log(f"{spec.name}: expert swap")
    request = spec.batch(seed=7, batch_size=1, seq_len=spec.swap_seq_len)
    base.eval()
    with torch.no_grad():
        results[methods.LOWER_BOUND]["forward_s"] = measure.repeat(
            lambda: forward_only(base, request), settings.repeats, warmup=2
        )["cpu_s"]
    swap = measure.full_swap_times(full_model, spec, settings.repeats)
    results[methods.FULL]["forward_s"] = swap["forward"]["cpu_s"]
    results[methods.FULL]["swap_s"] = swap["swap"]["cpu_s"]
    del full_model
    for name in methods.ADAPTER_METHODS:
        model = methods.build_experts(name, spec, base, 2)
        swap = measure.swap_times(model, spec, settings.repeats)
        for key in ("forward", "swap", "swap_merged"):
            results[name][f"{key}_s"] = swap[key]["cpu_s"]
        del model
        measure.settle()

    if spec.extra.get("base_variants"):
        log(f"{spec.name}: step times on other bases: {', '.join(spec.extra['base_variants'])}")
        variants = bases.variant_step_times(spec, base, settings.warmup, settings.steps)
    else:
        variants = {}

    log(f"{spec.name}: merging {settings.experts} experts")
    merges = scenarios.merge_experts(spec, base, settings.experts, settings.merge_repeats)
    trainable = results["lora_r8"]["trainable_params"]
    return {
        "title": spec.title,
        "kind": spec.kind,
        "config": spec.config,
        "target_modules": spec.target_modules,
        "batch": [spec.batch_size, spec.seq_len],
        "swap_request": [1, spec.swap_seq_len],
        "base_params": sum(p.numel() for p in base.parameters()),
        "lora_r8_trainable": trainable,
        "methods": results,
        "merge_experts": merges,
        "base_variants": variants,
    }


def sparse_floor_bytes(model: torch.nn.Module) -> int:
    """4 bytes per stored value + 4 bytes per stored index (an index per entry, or per block)."""
    from peft_sparse import SparseAdapterLayer

    total = 0
    for module in model.modules():
        if isinstance(module, SparseAdapterLayer):
            for name, values in module.sparse_adapter_values.items():
                total += 4 * values.numel() + 4 * module.sparse_adapter_indices[name].numel()
    return total


def run(quick: bool, out: Path, argv: list[str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    settings = QUICK_SETTINGS if quick else FULL_SETTINGS
    specs = quick_specs() if quick else full_specs()
    started = time.perf_counter()
    cpu_started = time.process_time()
    data: dict[str, Any] = {
        "meta": {
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": " ".join(["python -m benchmarks.perf.run", *(shlex.quote(a) for a in argv)]),
            "git": measure.git_revision(),
            "quick": quick,
            "settings": settings.__dict__,
            "timing": "process CPU time (time.process_time), torch.set_num_threads(1); medians",
            "memory": "live tensor bytes before a step + torch.profiler CPU-allocator peak during one step",
            "environment": measure.environment(),
            "methods": methods.LABELS,
            "metrics": METRICS,
            "not_applicable": {k: sorted(v) for k, v in NOT_APPLICABLE.items()},
        },
        "models": {},
    }
    for spec in specs:
        data["models"][spec.name] = run_model(spec, settings)
    log("swap scaling on one square weight")
    scaling = scenarios.swap_scaling(settings.swap_sizes, settings.swap_entries, settings.repeats)
    scaling["ratios"] = scenarios.swap_ratios(scaling)
    data["swap_scaling"] = scaling
    data["targets"] = report.evaluate_targets(data)
    data["meta"]["runtime_wall_s"] = time.perf_counter() - started
    data["meta"]["runtime_cpu_s"] = time.process_time() - cpu_started
    report.write_all(data, out)
    log(f"wrote {out}/perf.json, perf.md, perf.png in {data['meta']['runtime_wall_s']:.0f} s")
    return data


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.run", description=__doc__.split("\n\n")[1])
    parser.add_argument("--quick", action="store_true", help="tiny dims, 2 steps: checks the script runs (CI)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="output directory")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    run(args.quick, args.out, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["METRICS", "NOT_APPLICABLE", "main", "run"]
