"""The benchmark models (built from configs, random init: timing does not depend on the weights) and batches."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: how to build it, what to target, and the batch to train on."""

    name: str
    title: str
    kind: str  # "bert" (sentence-embedding encoder, mean-pool regression loss) or "llama" (causal LM loss)
    config: dict[str, Any]
    target_modules: list[str]
    batch_size: int
    seq_len: int
    swap_seq_len: int  # one short request for the expert-swap forward
    extra: dict[str, Any] = field(default_factory=dict)

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        if self.kind == "bert":
            from transformers import BertConfig, BertModel

            return BertModel(BertConfig(**self.config), add_pooling_layer=False)
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**self.config))

    def batch(self, seed: int = 1, batch_size: int | None = None, seq_len: int | None = None) -> dict[str, Any]:
        """Random token ids (and, for the encoder, a fixed regression target for the pooled embedding)."""
        generator = torch.Generator().manual_seed(seed)
        size = (batch_size or self.batch_size, seq_len or self.seq_len)
        ids = torch.randint(0, self.config["vocab_size"], size, generator=generator)
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.kind == "bert":
            batch["target"] = torch.randn(size[0], self.config["hidden_size"], generator=generator)
        return batch

    @property
    def loss_fn(self) -> Callable[[nn.Module, dict[str, Any]], torch.Tensor]:
        return _bert_loss if self.kind == "bert" else _llama_loss

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len


def _bert_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Mean-pooled sentence embedding regressed onto a fixed target (a sentence-transformers style objective)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
    pooled = (out * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.mse_loss(pooled, batch["target"])


def _llama_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Next-token cross entropy on the batch itself."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["input_ids"]).loss


def forward_only(model: nn.Module, batch: dict[str, Any]) -> None:
    """One inference forward (the serving request of the expert-swap measurement)."""
    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


BERT_TARGETS = ["query", "key", "value", "dense"]  # q, k, v, attention.output.dense, intermediate.dense, output.dense
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# the other bases the Llama trains on (benchmarks/perf/bases.py): bf16, and quantized through transformers
LLAMA_BASE_VARIANTS = ["bf16", "bnb_nf4", "bnb_int8", "torchao_int8"]


# --- quantized bases: a saved model loaded back through transformers' quantizers (fp32 compute on CPU) ----------
def quantization_config(kind: str) -> Any:
    """transformers' quantization config of ``kind`` (``None`` for ``"fp32"``)."""
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import BitsAndBytesConfig, TorchAoConfig

    fp32 = torch.float32
    return {
        "fp32": None,
        "bnb_nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=fp32),
        "bnb_fp4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=fp32),
        "bnb_int8": BitsAndBytesConfig(load_in_8bit=True),
        "torchao_int8": TorchAoConfig(Int8WeightOnlyConfig()),
    }[kind]


def load_llama(path: Path, kind: str) -> nn.Module:
    """The causal LM saved at ``path``, loaded as ``kind`` (fp32 or quantized, see :func:`quantization_config`)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    config = quantization_config(kind)
    if config is None:
        return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map="cpu", dtype=torch.float32
    ).eval()


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """``model`` (a transformers causal LM) saved to a temporary directory and loaded back as ``kind``."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_llama(Path(tmp), kind)


def save_random_llama(config: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """A randomly initialised ``LlamaForCausalLM`` of ``config`` saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(path)
    return path


def full_specs() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="minilm",
            title="BERT with all-MiniLM-L6-v2 dimensions (hidden 384, 6 layers, 12 heads, FFN 1536, vocab 30522)",
            kind="bert",
            config=dict(
                vocab_size=30522,
                hidden_size=384,
                num_hidden_layers=6,
                num_attention_heads=12,
                intermediate_size=1536,
                max_position_embeddings=512,
            ),
            target_modules=BERT_TARGETS,
            batch_size=8,
            seq_len=128,
            swap_seq_len=128,
        ),
        ModelSpec(
            name="llama",
            title="Tiny Llama of realistic width (hidden 1024, 2 layers, 16 heads / 4 KV heads, FFN 2816, vocab 8192)",
            kind="llama",
            config=dict(
                vocab_size=8192,
                hidden_size=1024,
                intermediate_size=2816,
                num_hidden_layers=2,
                num_attention_heads=16,
                num_key_value_heads=4,
                max_position_embeddings=512,
                tie_word_embeddings=False,
            ),
            target_modules=LLAMA_TARGETS,
            extra={"base_variants": LLAMA_BASE_VARIANTS},
            batch_size=4,
            seq_len=256,
            swap_seq_len=128,
        ),
    ]


def quick_specs() -> list[ModelSpec]:
    return [
        ModelSpec(
            name="minilm",
            title="tiny BERT (quick mode: hidden 128, 2 layers)",
            kind="bert",
            config=dict(
                vocab_size=1000,
                hidden_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=256,
                max_position_embeddings=64,
            ),
            target_modules=BERT_TARGETS,
            batch_size=2,
            seq_len=32,
            swap_seq_len=16,
        ),
        ModelSpec(
            name="llama",
            title="tiny Llama (quick mode: hidden 128, 2 layers)",
            kind="llama",
            config=dict(
                vocab_size=512,
                hidden_size=128,
                intermediate_size=352,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                tie_word_embeddings=False,
            ),
            target_modules=LLAMA_TARGETS,
            extra={"base_variants": LLAMA_BASE_VARIANTS},
            batch_size=2,
            seq_len=32,
            swap_seq_len=16,
        ),
    ]
