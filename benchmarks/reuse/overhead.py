"""Routing overhead: forward time of the Arrow-routed model vs the merged model, measured side by side.

For each expert count E the same E random sparse experts (q/k/v/o targets, LoRA-r=16 budget, random masks
and values) are (a) routed with :func:`peft_sparse.create_arrow_model` at several ``top_k`` and (b) merged
uniformly (``sparse_average``) into one adapter, which is timed both as an active sparse adapter and merged
into the base weights (``merge_and_unload``: a plain model). Every round times one forward of every variant
in turn (interleaved, so load changes on the shared machine hit all variants alike); the ratios are of the
medians. Timing does not depend on the weights, so the experts are random.

    OMP_NUM_THREADS=2 python -m benchmarks.reuse.overhead            # writes benchmarks/results/routing_overhead.*
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sparse import ArrowConfig, SparseAdapterConfig, create_arrow_model
from peft_sparse.merging import merge_adapters_from_disk

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MODEL = {  # SmolLM2-135M's layer shapes (hidden 576, 9 heads, 3 KV heads, MLP 1536), 4 layers, smaller vocab
    "vocab_size": 4096,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 4,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 512,
}
QUICK_MODEL = {**MODEL, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
               "num_hidden_layers": 2, "vocab_size": 128}  # fmt: skip
TARGET_RATIO = 2.0


def build_base(config: dict[str, Any]) -> nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


def save_experts(config: dict[str, Any], count: int, rank: int, directory: Path) -> list[str]:
    """``count`` random experts at a LoRA-r=``rank`` budget (random masks, random values), saved to disk."""
    dirs = []
    for i in range(count):
        expert = get_peft_model(
            build_base(config),
            SparseAdapterConfig(target_modules=TARGETS, lora_rank=rank, mask_init="random", seed=1000 + i),
        )
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, param in expert.named_parameters():
                if "sparse_adapter_values" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        path = directory / f"expert{i}"
        expert.save_pretrained(str(path))
        dirs.append(str(path))
    return dirs


def forward_fn(model: nn.Module, ids: torch.Tensor):
    def run() -> None:
        with torch.no_grad():
            model(input_ids=ids)

    return run


def interleaved(variants: dict[str, Any], rounds: int, warmup: int) -> dict[str, dict[str, float]]:
    """Median wall / CPU milliseconds of one call of every variant, timed in turn each round."""
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(warmup + rounds):
        for name, fn in variants.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            c1, w1 = time.process_time(), time.perf_counter()
            if round_index >= warmup:
                wall[name].append((w1 - w0) * 1e3)
                cpu[name].append((c1 - c0) * 1e3)
    return {
        name: {"wall_ms": statistics.median(wall[name]), "cpu_ms": statistics.median(cpu[name])} for name in variants
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = QUICK_MODEL if args.quick else MODEL
    generator = torch.Generator().manual_seed(0)
    shapes = {"prefill": (args.batch, args.length), "decode": (args.batch, 1)}
    vocab = config["vocab_size"]
    inputs = {label: torch.randint(0, vocab, size, generator=generator) for label, size in shapes.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        all_dirs = save_experts(config, max(args.experts), args.rank, root)
        for count in args.experts:
            dirs = all_dirs[:count]
            merged_dir = merge_adapters_from_disk(dirs, root / f"merged{count}", "sparse_average", progress=False)
            merged_adapter = PeftModel.from_pretrained(build_base(config), str(merged_dir)).eval()
            merged_weights = PeftModel.from_pretrained(build_base(config), str(merged_dir)).merge_and_unload().eval()
            routed = {
                k: create_arrow_model(build_base(config), dirs, ArrowConfig(top_k=k, rng_seed=0)).eval()
                for k in args.top_k
                if k <= count
            }
            for threads, (label, ids) in itertools.product(args.threads, inputs.items()):
                torch.set_num_threads(threads)
                variants = {"merged_weights": forward_fn(merged_weights, ids)}
                variants["merged_adapter"] = forward_fn(merged_adapter, ids)
                variants.update({f"routed_top{k}": forward_fn(model, ids) for k, model in routed.items()})
                times = interleaved(variants, args.rounds, args.warmup)
                base_ms = times["merged_weights"]["wall_ms"]
                adapter_ms = times["merged_adapter"]["wall_ms"]
                for k in routed:
                    routed_ms = times[f"routed_top{k}"]["wall_ms"]
                    rows.append(
                        {
                            "experts": count,
                            "threads": threads,
                            "top_k": k,
                            "input": label,
                            "tokens": int(ids.numel()),
                            "routed_ms": routed_ms,
                            "merged_weights_ms": base_ms,
                            "merged_adapter_ms": adapter_ms,
                            "ratio_vs_merged_weights": routed_ms / base_ms,
                            "ratio_vs_merged_adapter": routed_ms / adapter_ms,
                            "routed_cpu_ms": times[f"routed_top{k}"]["cpu_ms"],
                            "merged_weights_cpu_ms": times["merged_weights"]["cpu_ms"],
                        }
                    )
                    print(
                        f"E={count:2d} threads={threads} top_k={k} {label:7s}: routed {routed_ms:8.2f} ms, "
                        "merged into weights "
                        f"{base_ms:8.2f} ms ({routed_ms / base_ms:.2f}x), merged adapter {adapter_ms:8.2f} ms "
                        f"({routed_ms / adapter_ms:.2f}x)",
                        flush=True,
                    )
            del merged_adapter, merged_weights, routed
    entries_per_expert = {t: args.rank * 2 * config["hidden_size"] for t in ("q_proj", "o_proj")}
    return {
        "command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python -m benchmarks.reuse.overhead "
        + " ".join(args.argv),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_at_end": list(os.getloadavg()),
        },
        "model": config,
        "targets": TARGETS,
        "expert_budget": f"LoRA r={args.rank} equivalent: r*(in+out) entries per targeted weight, random masks",
        "entries_per_expert_example": entries_per_expert,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "rows": rows,
    }


def verdicts(result: dict[str, Any]) -> list[str]:
    """Plain statements of the target at the largest expert count, per top_k (prefill and decode)."""
    largest = max(row["experts"] for row in result["rows"])
    lines = []
    for row in result["rows"]:
        if row["experts"] != largest:
            continue
        met = row["ratio_vs_merged_weights"] <= TARGET_RATIO
        lines.append(
            f"E={largest}, {row['threads']} thread(s), top_k={row['top_k']}, {row['input']}: "
            "routed / merged-into-weights = "
            f"{row['ratio_vs_merged_weights']:.2f}x -> target (<= {TARGET_RATIO:.0f}x) "
            f"{'met' if met else 'MISSED'}; vs the merged sparse adapter {row['ratio_vs_merged_adapter']:.2f}x"
        )
    return lines


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Routing overhead: Arrow-routed vs merged forward",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model: Llama, hidden {result['model']['hidden_size']}, {result['model']['num_hidden_layers']} layers, "
        f"MLP {result['model']['intermediate_size']}, vocab {result['model']['vocab_size']}; targets "
        f"{', '.join(result['targets'])}; experts: {result['expert_budget']}. "
        f"Machine: {result['machine']['platform']}, "
        f"{result['machine']['cpu_count']} cores shared with other jobs (load average at the end "
        f"{', '.join(f'{x:.1f}' for x in result['machine']['load_average_at_end'])}), torch "
        f"{result['machine']['torch']} (torch threads set per row). Median wall time of "
        f"{result['rounds']} interleaved rounds after {result['warmup']} warm-up rounds.",
        "",
        "| experts | threads | top_k | input | tokens | routed ms | merged into weights ms | ratio "
        "| merged adapter ms | ratio |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['experts']} | {row['threads']} | {row['top_k']} | {row['input']} | {row['tokens']} | "
            f"{row['routed_ms']:.2f} | "
            f"{row['merged_weights_ms']:.2f} | {row['ratio_vs_merged_weights']:.2f}x | "
            f"{row['merged_adapter_ms']:.2f} | {row['ratio_vs_merged_adapter']:.2f}x |"
        )
    lines += ["", "## Target (routed <= 2x merged at the largest expert count)", ""]
    lines += [f"- {line}" for line in verdicts(result)]
    lines += [
        "",
        '"Merged into weights" is the uniform sparse merge folded into the base weights (a plain model, the '
        'cheapest way to serve a merge); "merged adapter" keeps the merged union as an active sparse adapter. '
        "The routed cost grows with top_k x stored entries per expert (each expert multiplies only the tokens "
        "that picked it), plus a fixed per-layer cost (routing logits, grouping tokens by expert, one sparse "
        "product per picked expert) that dominates for the few-token decode input.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rank", type=int, default=16, help="LoRA-rank-equivalent budget of each expert")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads, measured in turn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for routing_overhead.{json,md}")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else []
    result = measure(args)
    result["verdicts"] = verdicts(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing_overhead.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (args.out / "routing_overhead.md").write_text(markdown(result), encoding="utf-8")
    for line in result["verdicts"]:
        print(line)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
