"""Shared helpers for the core tests: tiny models built from configs and independent dense references."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    TrainerCallback,
)
from transformers.pytorch_utils import Conv1D

import peft_sparse  # noqa: F401  (registers the tuner)
from peft_sparse import calibration
from peft_sparse.layer import SparseAdapterLayer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)

VOCAB = 64


# --- tiny models -----------------------------------------------------------------------------------------------
def tiny_llama(
    seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32, hidden: int = 32, intermediate: int = 48
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0, layers: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=layers,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()


def _bert_config(layers: int) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )


def tiny_bert(seed: int = 0, layers: int = 2) -> BertModel:
    torch.manual_seed(seed)
    return BertModel(_bert_config(layers)).eval()


def tiny_bert_classifier(seed: int = 0, layers: int = 1) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(_bert_config(layers)).eval()


def tiny_phi3(seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return Phi3ForCausalLM(config).eval()


def lm_batches(n: int = 3, seed: int = 0, batch: int = 2, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Random token batches with labels (causal LM loss)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


# --- introspection ---------------------------------------------------------------------------------------------
def sparse_layers(model: torch.nn.Module) -> dict[str, SparseAdapterLayer]:
    """Sparse adapter layers keyed by their name relative to the transformers model (as in entries_pattern)."""
    root = model
    if hasattr(root, "base_model") and hasattr(root.base_model, "model"):
        root = root.base_model.model
    return {name: m for name, m in root.named_modules() if isinstance(m, SparseAdapterLayer)}


def base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Clone of every non-adapter parameter and buffer, keyed without PEFT's wrapper prefixes."""
    out = {}
    for name, tensor in model.state_dict().items():
        if "sparse_adapter_" in name:
            continue
        out[name.replace("base_model.model.", "").replace(".base_layer", "")] = tensor.detach().clone()
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} changed"


# --- Trainer observers ------------------------------------------------------------------------------------------
class MaskAtFirstStep(TrainerCallback):
    """Records the masks and values seen at the first optimizer step of a run."""

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] | None = None
        self.values_zero: bool | None = None

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.masks is None:
            layers = sparse_layers(model)
            self.masks = {n: layer.sparse_adapter_indices["default"].clone() for n, layer in layers.items()}
            self.values_zero = all(
                bool((layer.sparse_adapter_values["default"] == 0).all()) for layer in layers.values()
            )


@contextmanager
def recorded_calibration_batches() -> Iterator[list[list]]:
    """Spy on calibrate_masks as the Trainer callback calls it; yields the list of the exact batches of each call."""
    calls: list[list] = []
    real = calibration.calibrate_masks

    def spy(model, batches, num_batches=None, *args, **kwargs):
        taken = list(islice(iter(batches), num_batches))
        calls.append(taken)
        return real(model, taken, None, *args, **kwargs)

    calibration.calibrate_masks = spy
    try:
        yield calls
    finally:
        calibration.calibrate_masks = real


# --- independent dense references -------------------------------------------------------------------------------
def dense_delta(layer: SparseAdapterLayer, adapter: str) -> torch.Tensor:
    """ΔW in storage layout built entry by entry from the layer's indices and values (fp32, no library code)."""
    weight = layer.get_base_layer().weight
    rows, cols = weight.shape
    indices = layer.sparse_adapter_indices[adapter].tolist()
    values = layer.sparse_adapter_values[adapter].detach().float().cpu()
    block = layer.block_size[adapter]
    delta = torch.zeros(rows, cols)
    if block is None:
        for i, v in zip(indices, values.tolist(), strict=True):
            delta[i // cols, i % cols] += v
        return delta * layer.scaling[adapter]
    block_cols = math.ceil(cols / block)
    values = values.view(len(indices), block, block)
    for k, b in enumerate(indices):
        r0, c0 = (b // block_cols) * block, (b % block_cols) * block
        h, w = min(block, rows - r0), min(block, cols - c0)
        delta[r0 : r0 + h, c0 : c0 + w] += values[k, :h, :w]
    return delta * layer.scaling[adapter]


def dense_forward(layer: SparseAdapterLayer, x: torch.Tensor, adapters: list[str]) -> torch.Tensor:
    """x @ (W + Σ ΔW)ᵀ + b for Linear, x @ (W + Σ ΔW) + b for Conv1D, computed in fp64."""
    base = layer.get_base_layer()
    weight = base.weight.detach().double()
    for name in adapters:
        weight = weight + dense_delta(layer, name).double()
    x = x.double()
    out = x @ weight if isinstance(base, Conv1D) else x @ weight.T
    if base.bias is not None:
        out = out + base.bias.detach().double()
    return out


def set_random_values(model: torch.nn.Module, adapter: str | None = None, seed: int = 0, std: float = 0.1) -> None:
    """Give adapter values random non-zero numbers (so deltas are visible)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in sparse_layers(model).values():
        for name, values in layer.sparse_adapter_values.items():
            if adapter is None or name == adapter:
                noise = torch.randn(values.shape, generator=generator) * std
                with torch.no_grad():
                    values.copy_(noise.to(values.dtype))


# --- independent saliency references (calibration) --------------------------------------------------------------
def reference_weight_grads(model: nn.Module, names: list[str], batches, loss_fn=None) -> dict[str, torch.Tensor]:
    """Σ over batches of ∂L/∂W for the named modules, by making a copy of their weights trainable."""
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    for batch in batches:
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        loss.backward()
    return {name: modules[name].weight.grad.detach().clone() for name in names}


def reference_scores(model: nn.Module, names: list[str], batches, kind: str, loss_fn=None) -> dict[str, torch.Tensor]:
    """|∂L/∂W| ("gradient") or |W ⊙ ∂L/∂W| ("snip") of the base model's weights."""
    grads = reference_weight_grads(model, names, batches, loss_fn)
    modules = dict(model.named_modules())
    if kind == "gradient":
        return {n: g.abs() for n, g in grads.items()}
    return {n: (modules[n].weight.detach() * g).abs() for n, g in grads.items()}


def block_sums(scores: torch.Tensor, block: int) -> torch.Tensor:
    """Sum of scores per block of the (ragged) block grid, flattened row-major."""
    rows, cols = scores.shape
    grid_cols = math.ceil(cols / block)
    sums = torch.zeros(math.ceil(rows / block) * grid_cols, dtype=torch.float64)
    for r in range(0, rows, block):
        for c in range(0, cols, block):
            sums[(r // block) * grid_cols + c // block] = scores[r : r + block, c : c + block].double().sum()
    return sums


def assert_is_top_k(chosen: torch.Tensor, scores: torch.Tensor, k: int) -> None:
    """``chosen`` is the top-k of ``scores`` (ties to the lower position; near-ties from float order allowed)."""
    flat = scores.flatten().double()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
    expected = sorted(order[:k])
    chosen = chosen.long().tolist()
    assert len(chosen) == k
    if chosen == expected:
        return
    kth = float(flat[order[k - 1]])
    differing = set(chosen) ^ set(expected)
    assert all(abs(float(flat[i]) - kth) <= 1e-5 * max(abs(kth), 1e-12) for i in differing), "not the top-k"
