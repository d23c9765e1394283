"""``python -m benchmarks.perf.half_precision``: how to apply fp32 adapter values on a bf16 base, measured.

The two exact options on one bf16 layer of the Llama benchmark shapes (1024 tokens, LoRA r=8 budget, fp32
values), forward + backward, side by side in one process (interleaved rounds, process CPU time, 1 thread):

- ``separate``: ``base(x)`` in bf16 plus the delta-only op in fp32, added to the output (what the layer does);
- ``fused fp32``: compose ``W + ΔW`` in fp32 and run one fp32 GEMM (``sparse_linear`` on fp32 ``x``);

next to the frozen bf16 layer and the old lossy path (``W + ΔW`` composed in bf16). Both exact options keep a 1e-5
delta that the lossy path rounds away (``tests/test_bf16.py`` holds the layer to an fp64 reference; the fused fp32
variant passes the same test when forced).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from peft_sparse.ops import block_sparse_delta, block_sparse_linear, sparse_delta, sparse_linear

TOKENS = 1024
SHAPES = [(1024, 1024), (2816, 1024), (1024, 2816)]  # (out, in): q/o, gate/up, down
BLOCK = 32


def _options(shape: tuple[int, int], generator: torch.Generator) -> dict:
    out_f, in_f = shape
    count = 8 * (in_f + out_f)  # LoRA r=8 trainable count
    weight = (torch.randn(shape, generator=generator) * 0.02).bfloat16()
    x = torch.randn(TOKENS, in_f, generator=generator).bfloat16().requires_grad_()
    grad = torch.randn(TOKENS, out_f, generator=generator).bfloat16()
    idx = torch.randperm(shape[0] * shape[1], generator=generator)[:count].sort().values.to(torch.int32)
    values = (torch.randn(count, generator=generator) * 1e-4).requires_grad_()
    grid = -(-shape[0] // BLOCK) * -(-shape[1] // BLOCK)
    blocks = torch.randperm(grid, generator=generator)[: count // BLOCK**2].sort().values.to(torch.int32)
    block_values = (torch.randn(blocks.numel() * BLOCK**2, generator=generator) * 1e-4).requires_grad_()
    lossy, lossy_blocks = values.detach().bfloat16(), block_values.detach().bfloat16()
    options = {
        "frozen bf16 layer": lambda: F.linear(x, weight),
        "unstructured, separate": lambda: F.linear(x, weight) + sparse_delta(x, values, idx, shape).bfloat16(),
        "unstructured, fused fp32": lambda: sparse_linear(x.float(), weight, None, values, idx).bfloat16(),
        "unstructured, fused bf16 (lossy)": lambda: sparse_linear(x, weight, None, lossy, idx),
        "block 32, separate": lambda: (
            F.linear(x, weight) + block_sparse_delta(x, block_values, blocks, BLOCK, shape).bfloat16()
        ),
        "block 32, fused fp32": lambda: block_sparse_linear(
            x.float(), weight, None, block_values, blocks, BLOCK
        ).bfloat16(),
        "block 32, fused bf16 (lossy)": lambda: block_sparse_linear(x, weight, None, lossy_blocks, blocks, BLOCK),
    }
    return {name: (fn, grad) for name, fn in options.items()}


def main(rounds: int = 7, warmup: int = 2) -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    cases = {shape: _options(shape, generator) for shape in SHAPES}
    times: dict[tuple, list[float]] = {}
    for r in range(warmup + rounds):
        for shape, options in cases.items():
            for name, (fn, grad) in options.items():
                start = time.process_time()
                fn().backward(grad)
                if r >= warmup:
                    times.setdefault((shape, name), []).append(time.process_time() - start)
    print(f"fwd+bwd of one bf16 layer, {TOKENS} tokens, fp32 values, median CPU ms over {rounds} rounds")
    for shape, options in cases.items():
        print(f"weight {shape[0]}x{shape[1]}:")
        for name in options:
            print(f"  {name:34s} {1e3 * statistics.median(times[(shape, name)]):8.1f} ms")


if __name__ == "__main__":
    main()
