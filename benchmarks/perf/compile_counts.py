"""``python -m benchmarks.perf.compile_counts``: what ``torch.compile`` makes of a training loop, sparse vs LoRA.

A 2-layer ``LlamaConfig`` model (hidden 64) with q/v targets and two adapters: 3 compiled training steps (SGD),
then ``set_adapter`` to the second adapter and one more step. Reports dynamo's graph breaks, the graphs compiled
after the first and the third step and after the swap (``CompileCounterWithBackend("aot_eager")``, so backward is
traced too). ``tests/test_compile.py`` asserts the same relations on a smaller model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._dynamo
from peft import LoraConfig, PeftConfig, get_peft_model
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters
from transformers import LlamaConfig, LlamaForCausalLM

from peft_sparse import SparseAdapterConfig

TARGETS = ["q_proj", "v_proj"]
VOCAB = 128


def count(make_config: Callable[[], PeftConfig]) -> dict[str, int]:
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = get_peft_model(LlamaForCausalLM(config), make_config())
    model.add_adapter("other", make_config())
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    graphs = []
    for _ in range(3):
        compiled(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        graphs.append(backend.frame_count)
    model.set_adapter("other")
    compiled(input_ids=ids, labels=ids).loss.backward()
    return {
        "graph breaks": sum(counters["graph_break"].values()),
        "graphs after step 1": graphs[0],
        "graphs after step 3": graphs[2],
        "graphs after set_adapter": backend.frame_count,
    }


def main() -> None:
    rows = {
        "PEFT LoRA r=4": lambda: LoraConfig(r=4, target_modules=TARGETS),
        "peft-sparse unstructured": lambda: SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05),
        "peft-sparse block 4": lambda: SparseAdapterConfig(target_modules=TARGETS, keep_ratio=0.05, block_size=4),
    }
    results = {name: count(make) for name, make in rows.items()}
    keys = list(next(iter(results.values())))
    print("| adapter | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for name, result in results.items():
        print(f"| {name} | " + " | ".join(str(result[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
