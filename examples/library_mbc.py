"""Expert library + MBC on a tiny Llama: train 6 toy experts (3 tasks x 2 data seeds), collect them in an
ExpertLibrary, cluster them with k=3, and load a merged cluster expert.

Run: ``python examples/library_mbc.py`` (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from quickstart import tiny_llama, train

from peft_sparse import ExpertLibrary, SparseAdapterConfig, calibrate_masks, cluster_experts
from peft_sparse.clustering import similarity_summary


def task_batches(shift: int, data_seed: int, n: int = 8) -> list[dict[str, torch.Tensor]]:
    """Toy task ``t, t+shift, t+2*shift, ...`` (mod vocab) with its own random starts per data seed."""
    generator = torch.Generator().manual_seed(1000 * shift + data_seed)
    batches = []
    for _ in range(n):
        start = torch.randint(0, 128, (8, 1), generator=generator)
        ids = (start + shift * torch.arange(16)) % 128
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def main() -> None:
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    with tempfile.TemporaryDirectory() as tmp:
        library = ExpertLibrary(Path(tmp) / "library", create=True)
        for shift in (3, 5, 7):
            for data_seed in (0, 1):
                name = f"shift{shift}-seed{data_seed}"
                model = get_peft_model(tiny_llama(), SparseAdapterConfig.from_lora_config(lora, mask_init="gradient"))
                batches = task_batches(shift, data_seed)
                calibrate_masks(model, batches, num_batches=4, progress=False)
                loss = train(model, batches)
                library.add(model, name, task=f"shift {shift}", metrics={"train_loss": round(loss, 4)})
                print(f"added {name}: final train loss {loss:.3f}")
        result = cluster_experts(library, 3, out_dir=Path(tmp) / "mbc", progress=False)
        print(similarity_summary(result))
        names = result.names
        print("similarity matrix:")
        for i, row in enumerate(result.similarity.tolist()):
            print(f"  {names[i]:>14} " + " ".join(f"{x:6.3f}" for x in row))
        recovered = all(
            (result.labels[i] == result.labels[j]) == (names[i].split("-")[0] == names[j].split("-")[0])
            for i in range(len(names))
            for j in range(len(names))
        )
        print(f"clusters equal the 3 tasks: {recovered}")
        library.add(result.merged_dirs[0], "mbc-0", task="merged cluster 0")
        model = library.load_into(tiny_llama(), ["mbc-0", *result.clusters[0]])
        model.eval()
        shift = int(result.clusters[0][0].split("-")[0].removeprefix("shift"))
        held_out = task_batches(shift, data_seed=2)[0]
        with torch.no_grad():
            for adapter in ["mbc-0", *result.clusters[0]]:
                model.set_adapter(adapter)
                print(f"loss of {adapter} on unseen shift-{shift} data: {float(model(**held_out).loss):.3f}")
            with model.disable_adapter():
                print(f"loss of the base model on the same data: {float(model(**held_out).loss):.3f}")


if __name__ == "__main__":
    main()
