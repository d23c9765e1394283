"""``python -m benchmarks.perf.kernel_compare [--baseline REF]``: one adapted projection, fwd + bwd, side by side.

Times the training-step work of one adapted linear layer (forward, then backward to ``x`` and the trainable
parameters) for: this tree's kernels (the registered custom ops), the kernels of git ref ``--baseline``
(default ``main``, loaded from ``git show`` into a temporary package and wrapped in an ``autograd.Function``),
a LoRA layer at the same budget, and the frozen layer (gradient for ``x`` only: the lower bound). All variants
run in one process in interleaved rounds and the medians are reported, so a busy machine slows them alike;
compare ratios, not absolute numbers. Shapes: SmolLM2-135M (hidden 576, GQA k/v 192x576, mlp 1536, 8x100
tokens) and the Llama model of ``benchmarks/perf/models.py`` (hidden 1024, k/v 256x1024, mlp 2816, 4x256 tokens).
"""

from __future__ import annotations

import argparse
import importlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from peft_sparse import masks
from peft_sparse.ops import block_sparse_linear, sparse_linear

# (name, storage shapes (out, in) of the projections that read the same input) per model: the layers of one
# decoder block, grouped as the model calls them (q, k, v share their input, so do gate and up).
SHAPES = {
    "smollm2": [
        ("q+k+v", [(576, 576), (192, 576), (192, 576)]),
        ("o", [(576, 576)]),
        ("gate+up", [(1536, 576), (1536, 576)]),
        ("down", [(576, 1536)]),
    ],
    "llama": [
        ("q+k+v", [(1024, 1024), (256, 1024), (256, 1024)]),
        ("o", [(1024, 1024)]),
        ("gate+up", [(2816, 1024), (2816, 1024)]),
        ("down", [(1024, 2816)]),
    ],
}
TOKENS = {"smollm2": 8 * 100, "llama": 4 * 256}
# (label, LoRA rank whose budget is matched, block size or 0)
KINDS = [("unstructured r8", 8, 0), ("unstructured r16", 16, 0), ("block-16 r16", 16, 16), ("block-32 r16", 16, 32)]


def _git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def load_baseline(ref: str, root: Path) -> ModuleType:
    """The kernel modules of git ``ref`` (``peft_sparse/ops`` without the op registration) as a temporary package
    ``baseline_ops`` with ``sparse_linear`` and ``block_sparse`` attributes."""
    package = Path(tempfile.mkdtemp(prefix="kernel_compare_")) / "baseline_ops"
    package.mkdir()
    for name in _git(root, "ls-tree", "--name-only", f"{ref}:peft_sparse/ops").split():
        if name.endswith(".py") and name not in ("__init__.py", "registered.py"):
            text = _git(root, "show", f"{ref}:peft_sparse/ops/{name}")
            (package / name).write_text(re.sub(r"from \.\.(\w+)", r"from peft_sparse.\1", text))
    (package / "__init__.py").write_text("from . import block_sparse, sparse_linear  # noqa: F401\n")
    for loaded in [m for m in sys.modules if m == "baseline_ops" or m.startswith("baseline_ops.")]:
        del sys.modules[loaded]  # a previous load of another ref
    sys.path.insert(0, str(package.parent))
    return importlib.import_module("baseline_ops")


class _Baseline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, values, indices, block, scaling, modules):  # noqa: ANN001, ANN205
        ctx.save_for_backward(x, weight, values, indices)
        ctx.args = (block, scaling, modules)
        if block:
            return modules.block_sparse.linear_forward(x, weight, None, values, indices, block, scaling, False)
        return modules.sparse_linear.linear_forward(x, weight, None, values, indices, scaling, False)

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        x, weight, values, indices = ctx.saved_tensors
        block, scaling, modules = ctx.args
        if block:
            gx, gv = modules.block_sparse.linear_backward(
                g, x, weight, values, indices, block, scaling, False, True, True
            )
        else:
            gx, gv = modules.sparse_linear.linear_backward(g, x, weight, values, indices, scaling, False, True, True)
        return gx, None, gv, None, None, None, None


def _variants(shapes: list[tuple[int, int]], tokens: int, rank: int, block: int, baseline: ModuleType) -> dict:
    """fwd+bwd closures of the projections in ``shapes``, all reading one input ``x`` (as in the model)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, shapes[0][1], generator=generator, requires_grad=True)
    layers = []
    for rows, cols in shapes:
        weight = torch.randn(rows, cols, generator=generator) / cols**0.5
        g = torch.randn(tokens, rows, generator=generator)
        budget = rank * (rows + cols)
        if block:
            grid = masks.block_grid((rows, cols), block)
            indices = masks.random_indices(grid[0] * grid[1], max(1, budget // (block * block)), 0)
            width = block * block
        else:
            indices = masks.random_indices(rows * cols, budget, 0)
            width = 1
        values = (torch.randn(indices.numel() * width, generator=generator) * 1e-2).requires_grad_()
        lora_a = (torch.randn(rank, cols, generator=generator) * 1e-2).requires_grad_()
        lora_b = (torch.randn(rows, rank, generator=generator) * 1e-2).requires_grad_()
        layers.append((weight, g, indices, values, lora_a, lora_b))

    def new() -> None:
        outs, grads = [], []
        for weight, g, indices, values, _, _ in layers:
            if block:
                outs.append(block_sparse_linear(x, weight, None, values, indices, block, 2.0))
            else:
                outs.append(sparse_linear(x, weight, None, values, indices, 2.0))
            grads.append(g)
        torch.autograd.backward(outs, grads)

    def old() -> None:
        outs = [_Baseline.apply(x, w, v, i, block, 2.0, baseline) for w, _, i, v, _, _ in layers]
        torch.autograd.backward(outs, [g for _, g, *_ in layers])

    def lora() -> None:
        outs = [F.linear(x, w) + 2.0 * F.linear(F.linear(x, a), b) for w, _, _, _, a, b in layers]
        torch.autograd.backward(outs, [g for _, g, *_ in layers])

    def frozen() -> None:
        outs = [F.linear(x, w) for w, *_ in layers]
        torch.autograd.backward(outs, [g for _, g, *_ in layers])

    def grads_of(fn) -> list[torch.Tensor]:  # noqa: ANN001
        params = [x] + [layer[3] for layer in layers]
        for p in params:
            p.grad = None
        fn()
        return [p.grad.clone() for p in params]

    torch.testing.assert_close(grads_of(new), grads_of(old), rtol=1e-4, atol=1e-4)
    return {"old": old, "new": new, "lora": lora, "frozen": frozen}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.perf.kernel_compare", description=__doc__)
    parser.add_argument("--baseline", default="main", help="git ref whose kernels are the 'old' column")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    baseline = load_baseline(args.baseline, Path(__file__).resolve().parents[2])
    print(
        f"median ms of fwd+bwd over {args.rounds} interleaved rounds, {args.threads} thread(s); "
        f"old = {args.baseline}, new = this tree"
    )
    print("| model | layer | kind | old | new | new/old | LoRA | new/LoRA | frozen | new/frozen |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    totals: dict[tuple[str, str], dict[str, float]] = {}
    for model in args.models:
        for layer, shape in SHAPES[model]:
            for kind, rank, block in KINDS:
                fns = _variants(shape, TOKENS[model], rank, block, baseline)
                times: dict[str, list[float]] = {name: [] for name in fns}
                for fn in fns.values():  # warm-up
                    fn()
                for _ in range(args.rounds):
                    for name, fn in fns.items():
                        began = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - began)
                ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
                total = totals.setdefault((model, kind), dict.fromkeys(ms, 0.0))
                for name in ms:
                    total[name] += ms[name]
                dims = ", ".join(f"{r}x{c}" for r, c in shape)
                print(
                    f"| {model} | {layer} ({dims}) | {kind} | {ms['old']:.2f} | {ms['new']:.2f} | "
                    f"{ms['new'] / ms['old']:.2f} | {ms['lora']:.2f} | {ms['new'] / ms['lora']:.2f} | "
                    f"{ms['frozen']:.2f} | {ms['new'] / ms['frozen']:.2f} |",
                    flush=True,
                )
    print("\nsum over one decoder block (the rows above):")
    print("| model | kind | old | new | new/old | LoRA | old/LoRA | new/LoRA |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for (model, kind), t in totals.items():
        print(
            f"| {model} | {kind} | {t['old']:.2f} | {t['new']:.2f} | {t['new'] / t['old']:.2f} | {t['lora']:.2f} | "
            f"{t['old'] / t['lora']:.2f} | {t['new'] / t['lora']:.2f} |"
        )


if __name__ == "__main__":
    main()
