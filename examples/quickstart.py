"""End-to-end example on a tiny Llama: calibrate a gradient mask, train, save, reload, merge two experts."""

from __future__ import annotations

import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_sparse
from peft_sparse import SparseAdapterConfig, calibrate_masks


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def task_batches(shift: int, n: int = 8) -> list[dict[str, torch.Tensor]]:
    """A toy task: continue the sequence ``t, t+shift, t+2*shift, ...`` (mod vocab)."""
    generator = torch.Generator().manual_seed(shift)
    batches = []
    for _ in range(n):
        start = torch.randint(0, 128, (8, 1), generator=generator)
        ids = (start + shift * torch.arange(16)) % 128
        batches.append({"input_ids": ids, "labels": ids})
    return batches


def train(model, batches, steps: int = 60, lr: float = 3e-2) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return loss.item()


def main() -> None:
    lora = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    config = SparseAdapterConfig.from_lora_config(lora, mask_init="gradient")  # the one-line LoRA -> sparse switch
    model = get_peft_model(tiny_llama(), config, adapter_name="shift3")
    model.print_trainable_parameters()
    data = {"shift3": task_batches(3), "shift5": task_batches(5)}
    model.add_adapter("shift5", SparseAdapterConfig.from_lora_config(lora, mask_init="gradient"))
    for name, batches in data.items():
        model.set_adapter(name)
        calibrate_masks(model, batches, num_batches=4, adapter_name=name, progress=False)
        before = model(**batches[0]).loss.item()
        print(f"{name}: loss {before:.3f} -> {train(model, batches):.3f} after 60 steps")
    model.add_weighted_adapter(["shift3", "shift5"], [1.0, 1.0], "merged", combination_type="sparse_average")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = PeftModel.from_pretrained(tiny_llama(), f"{tmp}/merged", adapter_name="merged")
        model.set_adapter("merged")
        model.eval()
        same = torch.allclose(model(**data["shift3"][0]).logits, reloaded(**data["shift3"][0]).logits)
        print(f"merged adapter saved and reloaded; identical logits: {same}")
        for name, batches in data.items():
            print(f"merged model loss on {name}: {float(reloaded(**batches[0]).loss):.3f}")
        merged = reloaded.merge_and_unload()
        print(f"merge_and_unload -> {type(merged).__name__}; peft_sparse {peft_sparse.__version__}")


if __name__ == "__main__":
    main()
