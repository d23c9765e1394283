"""Sparse adapters on quantized bases: merge precision and training-step time (CPU), standalone.

    python -m benchmarks.quantized precision [--out benchmarks/results/quantized_precision.json]
    python -m benchmarks.quantized timing [--quick] [--steps 5] [--out benchmarks/results/quantized_timing.json]
    python -m benchmarks.quantized bnb-shapes

``precision`` merges random sparse deltas (LoRA r=16 count, magnitude masks, every attention + MLP linear) into a
Llama loaded through transformers' quantizers and measures what requantization does to them. ``timing`` runs the
training step of the performance benchmark (``benchmarks.perf``: its Llama spec, AdamW, interleaved rounds,
medians) with the base quantized: frozen lower bound, LoRA r=16, sparse unstructured and block-32.
``bnb-shapes`` compares bitsandbytes' 4-bit quantization error per weight shape with an NF4 reference written here.
The quantized loaders (``load_llama``, ``save_random_llama``) and the step-time helper are the performance
benchmark's, which also reports these bases as its own rows (LoRA r=8, SHiRA, sparse, block-32, frozen bound).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from benchmarks.perf.bases import method_step_times
from benchmarks.perf.methods import LOWER_BOUND
from benchmarks.perf.models import LLAMA_TARGETS, full_specs, load_llama, quick_specs, save_random_llama
from peft_sparse import SparseAdapterConfig
from peft_sparse.layer import SparseAdapterLayer

KINDS = ("fp32", "bnb_nf4", "bnb_fp4", "bnb_int8", "torchao_int8")
PRECISION_CONFIG = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=704,  # bitsandbytes 0.50.2's CPU 4-bit quantizer is off for in_features 688 (docs)
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
# delta scales: the std of the random values as a fraction of each layer's weight RMS
SCALES = (0.1, 1.0)
MASKS = ("magnitude", "random")


def _layers(model: torch.nn.Module) -> dict[str, SparseAdapterLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseAdapterLayer)}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def merge_precision(path: Path, kind: str, scale: float, mask: str, seed: int = 0) -> dict[str, float]:
    """What a merge keeps of random sparse deltas of ``scale`` x the weight RMS (Frobenius norms over all layers)."""
    lora = LoraConfig(r=16, target_modules=LLAMA_TARGETS)
    config = SparseAdapterConfig.from_lora_config(lora, mask_init=mask, seed=seed)
    model = get_peft_model(load_llama(path, kind), config)
    generator = torch.Generator().manual_seed(seed)
    layers = _layers(model)
    base, exact = {}, {}
    for name, layer in layers.items():
        weight = layer.logical_weight().double()
        values = layer.sparse_adapter_values["default"]
        rms = weight.pow(2).mean().sqrt()
        noise = torch.randn(values.shape, generator=generator, dtype=torch.float64) * scale * rms
        with torch.no_grad():
            values.copy_(noise.float())
        base[name] = weight.clone()
        exact[name] = weight + layer.get_delta_weight("default").double()
    ids = torch.randint(0, PRECISION_CONFIG["vocab_size"], (2, 64), generator=generator)
    adapter_logits = _logits(model, ids)
    with model.disable_adapter():
        base_logits = _logits(model, ids)
    model.merge_adapter()
    merged = {name: layer.logical_weight().double() for name, layer in layers.items()}
    merged_logits = _logits(model, ids)
    model.unmerge_adapter()
    unmerged = {name: layer.logical_weight().double() for name, layer in layers.items()}

    def norm(tensors: dict[str, torch.Tensor]) -> float:
        return float(sum(t.pow(2).sum() for t in tensors.values()).sqrt())

    deltas = {n: exact[n] - base[n] for n in layers}
    # entries outside the mask that moved by more than 1e-4 of the layer's largest |W| (a changed code or scale)
    outside = {n: (merged[n] - base[n]).abs() * (deltas[n] == 0) for n in layers}
    untouched_changed = sum(int((o > 1e-4 * base[n].abs().max()).sum()) for n, o in outside.items())
    untouched_total = sum(int((deltas[n] == 0).sum()) for n in layers)
    return {
        "delta_error": norm({n: merged[n] - exact[n] for n in layers}) / norm(deltas),
        "weight_error": norm({n: merged[n] - exact[n] for n in layers}) / norm(exact),
        "untouched_entries_changed": untouched_changed / untouched_total,
        "unmerge_error": norm({n: unmerged[n] - base[n] for n in layers}) / norm(base),
        "logit_effect_kept": 1.0
        - float((merged_logits - adapter_logits).norm() / (adapter_logits - base_logits).norm()),
        "max_logit_diff_merged_vs_adapter": float((merged_logits - adapter_logits).abs().max()),
    }


def run_precision(out: Path | None) -> dict[str, Any]:
    results: dict[str, Any] = {"config": PRECISION_CONFIG, "targets": LLAMA_TARGETS, "budget": "LoRA r=16 count"}
    results["rows"] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_llama(PRECISION_CONFIG, Path(tmp))
        for kind in KINDS:
            for mask in MASKS:
                for scale in SCALES:
                    row = {"kind": kind, "mask": mask, "delta_scale": scale, **merge_precision(path, kind, scale, mask)}
                    results["rows"].append(row)
                    print(json.dumps(row))
    print(
        "\n| base | mask | delta std / weight RMS | ΔW error after merge | weight error | untouched entries changed "
        "| unmerge error | logit effect kept |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(
            f"| {r['kind']} | {r['mask']} | {r['delta_scale']} | {r['delta_error']:.3f} | {r['weight_error']:.4f} "
            f"| {r['untouched_entries_changed']:.1%} | {r['unmerge_error']:.4f} | {r['logit_effect_kept']:.1%} |"
        )
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


def run_timing(quick: bool, steps: int, warmup: int, out: Path | None) -> dict[str, Any]:
    spec = next(s for s in (quick_specs() if quick else full_specs()) if s.name == "llama")
    methods = [LOWER_BOUND, "lora_r16", "sparse", "sparse_block32"]
    results: dict[str, Any] = {"spec": spec.title, "steps": steps, "threads": torch.get_num_threads(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_random_llama(spec.config, Path(tmp))
        for kind in ("fp32", "bnb_nf4", "bnb_int8", "torchao_int8"):
            times = method_step_times(spec, load_llama(path, kind), methods, warmup, steps)
            bound = times[LOWER_BOUND]["step_wall_s"]
            for m in methods:
                row = {"kind": kind, "method": m, "wall_s": times[m]["step_wall_s"]}
                row["vs_frozen"] = row["wall_s"] / bound
                row["vs_lora_r16"] = row["wall_s"] / times["lora_r16"]["step_wall_s"]
                results["rows"].append(row)
                print(json.dumps(row))
    print("\n| base | method | step (s) | × frozen | × LoRA r=16 |")
    print("|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['kind']} | {r['method']} | {r['wall_s']:.3f} | {r['vs_frozen']:.2f} | {r['vs_lora_r16']:.2f} |")
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
    return results


NF4_CODES = (
    -1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626,
    0.7230, 1.0,
)  # fmt: skip


def run_bnb_shapes(shapes=((256, 256), (256, 672), (256, 680), (256, 688), (256, 704), (688, 256))) -> None:
    """Relative error of bitsandbytes NF4 vs a blockwise NF4 reference, and how much requantizing changes it."""
    import bitsandbytes as bnb

    def nf4(weight: torch.Tensor) -> torch.Tensor:
        params = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4", compress_statistics=False)
        params = params.to("cpu")
        return bnb.functional.dequantize_4bit(params.data, params.quant_state)

    code = torch.tensor(NF4_CODES)
    print("| shape | relative error (bitsandbytes) | relative error (NF4 reference) | requantization change |")
    print("|---|---|---|---|")
    for shape in shapes:
        weight = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02
        blocks = weight.flatten().view(-1, 64)
        absmax = blocks.abs().max(1, keepdim=True).values
        reference = (code[((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)] * absmax).view(shape)
        once = nf4(weight)
        twice = nf4(once)
        errors = [(once - weight).norm() / weight.norm(), (reference - weight).norm() / weight.norm()]
        change = (twice - once).norm() / once.norm()
        print(f"| {shape[0]}×{shape[1]} | {float(errors[0]):.3f} | {float(errors[1]):.3f} | {float(change):.3f} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    precision = sub.add_parser("precision", help="requantization error of merges")
    precision.add_argument("--out", type=Path)
    timing = sub.add_parser("timing", help="training-step time on quantized bases")
    timing.add_argument("--quick", action="store_true", help="the perf benchmark's quick (tiny) Llama")
    timing.add_argument("--steps", type=int, default=5)
    timing.add_argument("--warmup", type=int, default=2)
    timing.add_argument("--out", type=Path)
    sub.add_parser("bnb-shapes", help="bitsandbytes 4-bit quantization error per weight shape")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.command == "precision":
        run_precision(args.out)
    elif args.command == "bnb-shapes":
        run_bnb_shapes()
    else:
        run_timing(args.quick, args.steps, args.warmup, args.out)


if __name__ == "__main__":
    main()
