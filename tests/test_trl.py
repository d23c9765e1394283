"""TRL's SFTTrainer with a SparseAdapterConfig as its peft_config (the LoraConfig → SparseAdapterConfig swap).

One short run on an in-memory prompt-completion dataset is shared by most tests: which parameters train, the base
staying bit-identical, the trained model against a dense ``W + scatter(values)`` reference, the mask calibrated
inside SFTTrainer, the completion-only loss, and a fresh-process reload of ``trainer.save_model``.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import (
    VOCAB,
    MaskAtFirstStep,
    assert_is_top_k,
    assert_same_tensors,
    base_weights,
    recorded_calibration_batches,
    reference_scores,
    sparse_layers,
    tiny_llama,
)
from datasets import Dataset
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from peft_sparse import SparseAdapterConfig, SparseMaskCalibrationCallback

TESTS = Path(__file__).parent
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0, 1, 2 are tiny_llama's pad / bos / eos
ROWS = [
    ("what colour is the sky", "blue"),
    ("what colour is fresh grass", "green"),
    ("what colour is snow", "white"),
    ("what colour is coal", "black"),
]
TARGETS = ["q_proj", "v_proj"]
LAYER = "model.layers.0.self_attn.q_proj"
PROBE_IDS = torch.tensor([[5, 9, 14, 3, 7, 22, 11, 4], [8, 8, 30, 2, 17, 6, 25, 12]])


def word_tokenizer(extra_words: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the rows' words (offline), special ids matching tiny_llama's config."""
    words = sorted({w for prompt, completion in ROWS for w in f"{prompt} {completion}".split()} | set(extra_words))
    vocab = {token: i for i, token in enumerate(SPECIALS + words)}
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def lora_swapped_config() -> SparseAdapterConfig:
    """The documented swap: a LoRA config's targets and parameter count, data-driven mask."""
    return SparseAdapterConfig.from_lora_config(LoraConfig(r=2, target_modules=TARGETS), mask_init="gradient")


def sft_args(out: Path, **overrides) -> SFTConfig:
    kwargs = dict(
        output_dir=str(out),
        max_steps=3,
        per_device_train_batch_size=len(ROWS),  # one batch = the whole dataset, so the first loss is known
        learning_rate=5e-2,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        bf16=False,  # exact fp32 loss references; the bf16 default is covered by the text-dataset test
        disable_tqdm=True,
        seed=0,
    )
    kwargs.update(overrides)
    return SFTConfig(**kwargs)


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=PROBE_IDS).logits


def completion_only_loss(model: torch.nn.Module, tokenizer, full_sequence: bool = False) -> float:
    """Mean next-token cross-entropy over the completion tokens (and EOS) of all rows, plain torch."""
    total, count = 0.0, 0
    for prompt, completion in ROWS:
        prompt_ids = tokenizer.convert_tokens_to_ids(prompt.split())
        ids = prompt_ids + tokenizer.convert_tokens_to_ids([completion]) + [tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        first = 1 if full_sequence else len(prompt_ids)
        for position in range(first, len(ids)):
            total -= float(log_probs[position - 1, ids[position]])
            count += 1
    return total / count


def module_budget(model: torch.nn.Module, rank: int = 2) -> dict[str, int]:
    """LoRA-equivalent budget r * (in + out) per targeted Linear, from the module shapes."""
    return {
        name: rank * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if name.split(".")[-1] in TARGETS
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """SFTTrainer(peft_config=SparseAdapterConfig, callbacks=[SparseMaskCalibrationCallback]) trained 3 steps."""
    out = tmp_path_factory.mktemp("sft")
    tokenizer = word_tokenizer()
    dataset = Dataset.from_dict({"prompt": [p for p, _ in ROWS], "completion": [f" {c}" for _, c in ROWS]})
    base = tiny_llama()
    before = base_weights(base)
    first_step = MaskAtFirstStep()
    with recorded_calibration_batches() as calls:
        trainer = SFTTrainer(
            model=base,
            args=sft_args(out),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_swapped_config(),
            callbacks=[SparseMaskCalibrationCallback(num_batches=1, progress=False), first_step],
        )
        layers = sparse_layers(trainer.model)
        magnitude = {n: layer.sparse_adapter_indices["default"].clone() for n, layer in layers.items()}
        trainer.train()
    trainer.save_model(str(out / "adapter"))
    return dict(
        trainer=trainer, model=trainer.model, tokenizer=tokenizer, before=before, calls=calls,
        first_step=first_step, magnitude=magnitude, out=out,
    )  # fmt: skip


def test_only_the_sparse_values_train_with_the_lora_equivalent_budget(run):
    model = run["model"]
    budget = module_budget(tiny_llama())
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.sparse_adapter_values.default": k for n, k in budget.items()}
    assert sum(trainable.values()) == sum(budget.values()) == 2 * (2 * 64 + 2 * 48)
    assert model.peft_config["default"].entries_pattern == budget
    assert run["trainer"].state.global_step == 3


def test_base_weights_bit_identical_and_values_trained(run):
    model = run["model"]
    assert_same_tensors(base_weights(model), run["before"])
    assert run["first_step"].values_zero  # calibration reset them before step 0
    for layer in sparse_layers(model).values():
        values = layer.sparse_adapter_values["default"]
        assert values.dtype == torch.float32 and bool((values != 0).any())


def test_trained_model_equals_dense_reference(run):
    model = run["model"]
    layers = sparse_layers(model)
    dense = tiny_llama()  # fresh base, same seed: W + scatter(values) written into every targeted weight
    modules = dict(dense.named_modules())
    for name, layer in layers.items():
        assert layer.scaling["default"] == 1.0
        weight = modules[name].weight
        with torch.no_grad():
            flat = weight.detach().flatten().clone()
            flat[layer.sparse_adapter_indices["default"].long()] += layer.sparse_adapter_values["default"].detach()
            weight.copy_(flat.view_as(weight))
    # one targeted layer on its own: x @ (W + ΔW)ᵀ
    x = torch.randn(3, 5, modules[LAYER].in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(layers[LAYER](x), x @ modules[LAYER].weight.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits(model), logits(dense), rtol=1e-5, atol=1e-5)


def test_mask_calibrated_inside_sft_trainer_on_its_batches(run):
    calls, masks = run["calls"], run["first_step"].masks
    assert len(calls) == 1 and len(calls[0]) == 1  # num_batches=1, before step 0, not again
    scores = reference_scores(tiny_llama(), list(masks), calls[0], "gradient")
    for name, mask in masks.items():
        assert_is_top_k(mask, scores[name], mask.numel())
        assert torch.equal(sparse_layers(run["model"])[name].sparse_adapter_indices["default"], mask)  # kept
    assert any(not torch.equal(run["magnitude"][n], m) for n, m in masks.items())  # not the magnitude mask


def test_completion_only_loss_for_prompt_completion_rows(run):
    tokenizer = run["tokenizer"]
    batch = run["calls"][0][0]
    expected = set()
    for prompt, completion in ROWS:
        prompt_ids = tokenizer.convert_tokens_to_ids(prompt.split())
        completion_ids = tokenizer.convert_tokens_to_ids([completion]) + [tokenizer.eos_token_id]
        expected.add((tuple(prompt_ids + completion_ids), tuple([-100] * len(prompt_ids) + completion_ids)))
    got = set()
    for ids, labels, attention in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True):
        n = int(attention.sum())
        assert (labels[n:] == -100).all()
        got.add((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
    assert got == expected
    # the first step's loss (values still zero: the base model) is the completion-only cross-entropy
    first_loss = run["trainer"].state.log_history[0]["loss"]
    reference = completion_only_loss(tiny_llama(), tokenizer)
    assert first_loss == pytest.approx(reference, rel=1e-5)
    assert abs(completion_only_loss(tiny_llama(), tokenizer, full_sequence=True) - reference) > 1e-3


def test_saved_adapter_reloads_in_a_fresh_process(run):
    adapter = run["out"] / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    expected = logits(run["model"])
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(TESTS)!r})
        import torch
        import peft_sparse
        from peft import PeftModel
        from safetensors.torch import save_file
        from conftest import tiny_llama
        from test_trl import PROBE_IDS
        model = PeftModel.from_pretrained(tiny_llama(), {str(adapter)!r}).eval()
        with torch.no_grad():
            save_file({{"logits": model(input_ids=PROBE_IDS).logits}}, {str(run["out"] / "logits.safetensors")!r})
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert torch.equal(load_file(run["out"] / "logits.safetensors")["logits"], expected)


def test_text_rows_with_trl_defaults_train_on_the_full_sequence(tmp_path):
    """Language-modeling rows, TRL's own defaults (bf16 autocast, gradient checkpointing): loss on every token."""
    tokenizer = word_tokenizer()
    dataset = Dataset.from_dict({"text": [f"{p} {c}" for p, c in ROWS]})
    base = tiny_llama()
    before = base_weights(base)
    args = sft_args(tmp_path, max_steps=2, bf16=None)
    assert args.bf16 and args.gradient_checkpointing  # TRL's defaults
    trainer = SFTTrainer(
        model=base,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=SparseAdapterConfig(target_modules=TARGETS, num_params=300),
        callbacks=[SparseMaskCalibrationCallback(num_batches=1, progress=False)],
    )
    trainer.train()
    model = trainer.model
    assert model.get_base_model().is_activation_checkpointing
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 300
    assert_same_tensors(base_weights(model), before)
    for layer in sparse_layers(model).values():
        values = layer.sparse_adapter_values["default"]
        assert values.dtype == torch.float32 and bool((values != 0).any())
    reference = completion_only_loss(tiny_llama(), tokenizer, full_sequence=True)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(reference, rel=2e-2)  # bf16 autocast


def test_chat_template_clone_trains_the_added_tokens(tmp_path):
    """chat_template_path adding tokens makes SFTTrainer set trainable_token_indices (+ lm_head) on the config."""
    source = word_tokenizer()
    source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    source.eos_token = "<|im_end|>"
    source.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    source.save_pretrained(str(tmp_path / "template"))
    tokenizer = word_tokenizer(extra_words=("user", "assistant"))
    original_vocab = len(tokenizer)
    dataset = Dataset.from_dict(
        {"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in ROWS]}
    )
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=sft_args(tmp_path / "out", max_steps=2, chat_template_path=str(tmp_path / "template")),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=SparseAdapterConfig(target_modules=TARGETS, num_params=300),
    )
    trainer.train()
    model = trainer.model
    added = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert added == [original_vocab, original_vocab + 1] and len(tokenizer) == VOCAB  # + dummies up to 64 rows
    config = model.peft_config["default"]
    assert config.trainable_token_indices == {"embed_tokens": list(range(original_vocab, VOCAB))}
    assert config.modules_to_save == ["lm_head"]
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {n for n in trainable if "sparse_adapter_values" in n} == {
        f"base_model.model.{n}.sparse_adapter_values.default" for n in sparse_layers(model)
    }
    assert {n for n in trainable if "sparse_adapter_values" not in n} == {
        "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default",
        "base_model.model.lm_head.modules_to_save.default.weight",
    }
    delta = model.base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert delta.shape[0] == VOCAB - original_vocab and bool((delta != 0).any())
    model.save_pretrained(str(tmp_path / "adapter"))
    fresh = tiny_llama()
    fresh.resize_token_embeddings(model.get_input_embeddings().weight.shape[0])
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    ids = torch.tensor([[added[0], 5, 9, added[1], 14, 7]])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_trainable_token_indices_validated_and_copied_from_lora():
    for bad in ([1, -2], [1.5], "3", {"embed_tokens": [1, "2"]}, {3: [1]}):
        with pytest.raises(ValueError, match="trainable_token_indices"):
            SparseAdapterConfig(target_modules=TARGETS, trainable_token_indices=bad)
    lora = LoraConfig(r=2, target_modules=TARGETS, trainable_token_indices={"embed_tokens": [3, 5]})
    config = SparseAdapterConfig.from_lora_config(lora)
    assert config.trainable_token_indices == {"embed_tokens": [3, 5]}
    assert config.trainable_token_indices["embed_tokens"] is not lora.trainable_token_indices["embed_tokens"]


def test_quantized_base_values_cast_to_bf16_by_trl_and_back_to_fp32(tmp_path):
    """A 4-bit base: SFTTrainer casts the trainable values to bf16 (its QLoRA recipe); casting them back before
    train() (the optimizer is built there) trains fp32 values, and the packed 4-bit weights stay as they were."""
    tiny_llama(hidden=64, intermediate=128).save_pretrained(tmp_path / "base")  # bnb CPU 4-bit: 64-wide blocks
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    base = AutoModelForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=quantization, device_map="cpu", dtype=torch.float32
    )
    packed = {n: p.detach().clone() for n, p in base.named_parameters() if p.dtype == torch.uint8}
    dataset = Dataset.from_dict({"prompt": [p for p, _ in ROWS], "completion": [f" {c}" for _, c in ROWS]})
    trainer = SFTTrainer(
        model=base,
        args=sft_args(tmp_path / "out", max_steps=2),
        train_dataset=dataset,
        processing_class=word_tokenizer(),
        peft_config=SparseAdapterConfig(target_modules=TARGETS, mask_init="gradient"),
        callbacks=[SparseMaskCalibrationCallback(num_batches=1, progress=False)],
    )
    values = [layer.sparse_adapter_values["default"] for layer in sparse_layers(trainer.model).values()]
    assert values and all(v.dtype == torch.bfloat16 for v in values)  # TRL's cast
    for p in trainer.model.parameters():  # the workaround in docs/concepts.md
        if p.requires_grad:
            p.data = p.data.float()
    trainer.train()
    assert all(v.dtype == torch.float32 and bool((v != 0).any()) for v in values)
    after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in trainer.model.named_parameters()
    }
    assert len(packed) == 2 * 7 and all(torch.equal(after[n], p) for n, p in packed.items())  # 7 Linear per layer
