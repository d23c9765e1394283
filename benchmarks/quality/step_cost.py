"""``python -m benchmarks.quality.step_cost``: training-step time and memory per method on the causal LM, side by side.

Every method's trainable model is built on the same base and the methods take their steps in turn on the same
batches (round robin), so load from other processes hits them alike and the ratios to LoRA are comparable even on
a busy machine. The first step of each method is a warm-up and is not timed. Memory is measured apart, each method
in a fresh process (one process would reuse memory freed by another method without its RSS rising): the peak RSS
of two training steps above the RSS once the trainable model is built. ``--profile`` adds the ten most expensive
operators of one step per method (torch.profiler), to see where a slower method spends its time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch

from peft_sparse import calibrate_masks
from peft_sparse.files import atomic_write_text

from .harness import _batches, _memory_kb, _reset_peak_memory
from .methods import build_trainable, parse_method, trainable_count
from .tasks import Task, save_task_jsonl

DEFAULT_METHODS = ["lora", "sparse-gradient", "sparse-gradient-b16", "shira", "full"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality.step_cost", description=__doc__)
    parser.add_argument("--model", default=None, help="smollm2 (default), tiny-llama, or a HF causal-LM path")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--task", default="noun_supersense", help="the task whose training batches are used")
    parser.add_argument("--wordnet", default="/usr/share/wordnet")
    parser.add_argument("--tasks-dir", default=None)
    parser.add_argument("--steps", type=int, default=6, help="steps per method, the first one untimed")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--profile", action="store_true", help="top operators of one step per method")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-method memory processes")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # child process: one method's memory
    parser.add_argument(
        "--baseline-kernels",
        default=None,
        metavar="REF",
        help="also time every sparse method with the kernels of git ref REF (same model, same process, round robin)",
    )
    parser.add_argument("--cache-dir", default="cache/quality")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--prefix", default="quality_causal_step_cost")
    return parser.parse_args(argv)


def _step(model, optimizer, scorer, batch) -> float:
    began = time.perf_counter()
    scorer.loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - began


def _top_operators(model, optimizer, scorer, batch, count: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        _step(model, optimizer, scorer, batch)
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:count]
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1000, "calls": e.count} for e in rows]


def _build(base, scorer, name: str, batches: list, rank: int, seed: int, calibrate: bool = True):
    method = parse_method(name)
    torch.manual_seed(seed)
    model = build_trainable(base, method, rank, seed)
    if calibrate and method.kind == "sparse" and method.mask_init in ("snip", "gradient", "warmup"):
        calibrate_masks(model, batches[:1], loss_fn=scorer.loss, progress=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-6)


def memory_of_one_method(base, scorer, name: str, batches: list, rank: int, seed: int) -> float | None:
    """Peak RSS (MB) of two training steps above the RSS with the trainable model built (fresh process only).

    The mask is not calibrated here: calibration's own forward/backward would leave freed memory that the steps
    then reuse unseen, and a step's memory does not depend on which entries the mask holds.
    """
    model, optimizer = _build(base, scorer, name, batches, rank, seed, calibrate=False)
    before = _reset_peak_memory()
    for batch in batches[:2]:
        _step(model, optimizer, scorer, batch)
    peak = _memory_kb("VmHWM")
    return None if before is None or peak is None else (peak - before) / 1024


def memory_in_fresh_processes(args: argparse.Namespace, batches: list) -> dict[str, float | None]:
    """Each method's training memory, measured by this module in a child process of its own."""
    with tempfile.TemporaryDirectory() as tmp:
        examples = [e for batch in batches[:2] for e in batch]
        save_task_jsonl(Task("batches", False, examples, [], []), Path(tmp) / "batches.jsonl")
        result = {}
        for name in args.methods:
            command = [sys.executable, "-m", "benchmarks.quality.step_cost", "--memory-of", name, "--task", "batches"]
            command += ["--tasks-dir", tmp, "--batch-size", str(args.batch_size), "--rank", str(args.rank)]
            command += ["--seed", str(args.seed), "--cache-dir", args.cache_dir]
            command += ["--model", args.model] if args.model else []
            command += ["--threads", str(args.threads)] if args.threads else []
            repo = Path(__file__).resolve().parents[2]
            done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=repo)
            if done.returncode != 0:
                raise RuntimeError(f"memory measurement of {name} failed:\n{done.stderr[-2000:]}")
            result[name] = json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_mb"]
    return result


@contextlib.contextmanager
def _kernels(baseline: ModuleType | None):
    """Run the registered custom ops on the kernel modules of ``baseline`` (None: this tree's) inside the block."""
    if baseline is None:
        yield
        return
    from peft_sparse.ops import registered

    saved = registered._flat, registered._block
    registered._flat, registered._block = baseline.sparse_linear, baseline.block_sparse
    try:
        yield
    finally:
        registered._flat, registered._block = saved


def measure(
    base,
    scorer,
    method_names: list[str],
    batches: list,
    rank: int,
    seed: int,
    profile: bool,
    baseline: tuple[str, ModuleType] | None = None,
) -> dict:
    """Round-robin training steps of every method on the same batches: times, memory, optional profile.

    With ``baseline`` (ref, kernel modules), every sparse method also takes each step on those kernels (a row
    ``NAME @REF kernels`` sharing the method's model), so old and new kernels are timed side by side.
    """
    runs = {}
    for name in method_names:
        model, optimizer = _build(base, scorer, name, batches, rank, seed)
        runs[name] = (model, optimizer, trainable_count(model), None)
        if baseline is not None and parse_method(name).kind == "sparse":
            runs[f"{name} @{baseline[0]} kernels"] = (model, optimizer, runs[name][2], baseline[1])
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step, batch in enumerate(batches):
        for name, (model, optimizer, _, kernels) in runs.items():
            with _kernels(kernels):
                seconds = _step(model, optimizer, scorer, batch)
            if step:
                times[name].append(seconds)
    result = {}
    for name, (model, optimizer, params, kernels) in runs.items():
        result[name] = {
            "trainable_params": params,
            "median_s": statistics.median(times[name]),
            "min_s": min(times[name]),
            "steps_s": times[name],
        }
        if profile:
            with _kernels(kernels):
                result[name]["top_operators"] = _top_operators(model, optimizer, scorer, batches[0])
    return result


def markdown(result: dict, header: dict) -> str:
    lora = result.get("lora", {}).get("median_s")
    lines = [
        "# Training-step cost per method (causal LM)",
        "",
        f"Command: `{header['command']}`  ",
        f"Model: `{header['model']}` · task `{header['task']}` · batch {header['batch_size']} · mean sequence"
        f" {header['mean_tokens']:.0f} tokens · {header['steps']} steps per method (first untimed), round robin ·"
        f" {header['threads']} threads · {header['date']}",
        "",
        "Extra peak memory: in a fresh process per method, the peak RSS of two training steps above the RSS with"
        " the trainable model built (activations, gradients, optimizer state).",
        "",
        "| method | trainable params | median s / step | min s / step | × LoRA (median) | extra peak memory (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, info in result.items():
        ratio = f"{info['median_s'] / lora:.2f}" if lora else "–"
        peak = "–" if info.get("peak_extra_mb") is None else f"{info['peak_extra_mb']:.0f}"
        lines.append(
            f"| {name} | {info['trainable_params']:,} | {info['median_s']:.3f} | {info['min_s']:.3f} | {ratio} |"
            f" {peak} |"
        )
    for name, info in result.items():
        if "top_operators" in info:
            lines += ["", f"## Top operators of one `{name}` step (self CPU time)", "", "| op | ms | calls |"]
            lines += ["|---|---:|---:|"] + [
                f"| `{row['op']}` | {row['self_ms']:.1f} | {row['calls']} |" for row in info["top_operators"]
            ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (the first step is an untimed warm-up)")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .causal_model import TINY, load_causal_lm
    from .causal_scorer import SYSTEM_PROMPT, CausalScorer, user_message
    from .run import load_tasks

    tasks = load_tasks(args, args.seed)
    if args.task not in tasks:
        raise SystemExit(f"--task {args.task!r} not found; available: {', '.join(tasks)}")
    task = tasks[args.task]
    texts = [SYSTEM_PROMPT] + [user_message(e) for e in task.train] if args.model == TINY else []
    base, tokenizer, model_id = load_causal_lm(args.model, args.cache_dir, texts)
    base.requires_grad_(False)
    scorer = CausalScorer(tokenizer, generate_items=0)
    batches = list(_batches(task.train, args.batch_size, args.steps, args.seed))
    if args.memory_of:
        peak = memory_of_one_method(base, scorer, args.memory_of, batches, args.rank, args.seed)
        print(json.dumps({"method": args.memory_of, "peak_extra_mb": peak}))
        return 0
    tokens = [int(scorer.features(b).attention_mask.sum(1).float().mean()) for b in batches]
    baseline = None
    if args.baseline_kernels:
        from benchmarks.perf.kernel_compare import load_baseline

        baseline = (args.baseline_kernels, load_baseline(args.baseline_kernels, Path(__file__).resolve().parents[2]))
    result = measure(base, scorer, args.methods, batches, args.rank, args.seed, args.profile, baseline)
    if not args.no_memory:
        for name, peak in memory_in_fresh_processes(args, batches).items():
            result[name]["peak_extra_mb"] = peak
    header = {
        "command": "python -m benchmarks.quality.step_cost " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "model": model_id,
        "task": args.task,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "mean_tokens": sum(tokens) / len(tokens),
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / f"{args.prefix}.json", json.dumps({"header": header, "results": result}, indent=2))
    text = markdown(result, header)
    atomic_write_text(out / f"{args.prefix}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
