"""The causal-LM scorer: tasks as chat prompts, answer-only SFT loss, log-likelihood choice, greedy generation.

Every example renders the same way for every task (no per-task parameters or instructions): a system line asking
for one option verbatim, then the query and the K candidates as a bulleted list in the user turn, through the
tokenizer's chat template; the answer is the correct candidate's text followed by the end-of-turn token.
Logits are computed only where the loss or the score needs them: the decoder body runs on the whole sequence,
the (large-vocabulary) LM head only on the hidden states gathered at answer positions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

SYSTEM_PROMPT = "Answer with one of the options, exactly as written."
ANSWER_SLACK = 8  # generated tokens allowed beyond the longest candidate answer
FORMAT_VERSION = "chat-options-v1"  # part of the expert cache key: change it when the rendering changes


# ------------------------------------------------------------------------------------------- rendering


def user_message(example) -> str:
    """The user turn: the query, then every candidate on its own line."""
    options = "\n".join(f"- {c}" for c in example.candidates)
    return f"{example.query}\nOptions:\n{options}"


def prompt_text(tokenizer, example) -> str:
    """The chat-template rendering of the prompt, ending where the assistant's answer starts."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_message(example)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def end_of_turn_id(tokenizer) -> int:
    """The token that ends an assistant turn (the tokenizer's EOS, e.g. ``<|im_end|>`` for ChatML models)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: cannot mark the end of an answer")
    return int(tokenizer.eos_token_id)


def encode_prompt(tokenizer, example) -> list[int]:
    return tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]


def encode_answer(tokenizer, text: str) -> list[int]:
    """An answer's tokens: the text, then the end-of-turn token (so the model learns to stop)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


# ---------------------------------------------------------------------------------------- tensor helpers


@dataclass
class Features:
    """Right-padded prompt + answer sequences; ``labels`` is -100 everywhere except on answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int, value: int | None = None) -> torch.Tensor:
    """Right-pad integer sequences into a (n, max_len) tensor (padding ``value``, default ``pad_id``)."""
    width = max(len(s) for s in sequences)
    out = torch.full((len(sequences), width), pad_id if value is None else value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
    return out


def build_features(tokenizer, examples, pad_id: int) -> Features:
    """SFT features: prompt tokens then the correct answer's tokens; only answer tokens carry labels."""
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    answers = [encode_answer(tokenizer, e.candidates[e.label]) for e in examples]
    ids = [p + a for p, a in zip(prompts, answers, strict=True)]
    labels = [[-100] * len(p) + a for p, a in zip(prompts, answers, strict=True)]
    input_ids = pad_sequences(ids, pad_id)
    mask = pad_sequences([[1] * len(s) for s in ids], 0)
    return Features(input_ids, mask, pad_sequences(labels, -100))


def _backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder body returning hidden states, LM head) of a causal LM, PEFT-wrapped or not."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = hf.get_output_embeddings()
    body = getattr(hf, hf.base_model_prefix, None)
    if head is None or body is None:
        raise ValueError(f"{type(hf).__name__} is not a causal LM with an output embedding (lm_head)")
    return body, head


def selected_log_probs(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for rows of ``hidden`` (n, d): the LM head runs on these n rows only."""
    logits = head(hidden).float()
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def sft_loss(model: nn.Module, features: Features) -> torch.Tensor:
    """Mean cross-entropy over answer tokens, the LM head applied only at the positions that predict them."""
    body, head = _backbone(model)
    device = features.input_ids.device
    hidden = body(input_ids=features.input_ids, attention_mask=features.attention_mask).last_hidden_state
    rows, cols = (features.labels[:, 1:] != -100).nonzero(as_tuple=True)  # position cols predicts cols + 1
    targets = features.labels[rows, cols + 1].to(device)
    return -selected_log_probs(head, hidden[rows, cols], targets).mean()


@torch.no_grad()
def candidate_log_likelihoods(model: nn.Module, tokenizer, examples, pad_id: int) -> torch.Tensor:
    """(n, K) summed and per-token log-likelihoods of each candidate answer given its prompt.

    Returns a (2, n, K) tensor: [sum, sum / tokens]. The prompt runs once per example; its key/value cache is
    repeated for the K candidates, which then run only their own tokens (positions continue the prompt's).
    """
    body, head = _backbone(model)
    device = next(model.parameters()).device
    k = len(examples[0].candidates)
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    answers = [encode_answer(tokenizer, c) for e in examples for c in e.candidates]
    prompt_ids = pad_sequences(prompts, pad_id).to(device)
    prompt_mask = pad_sequences([[1] * len(p) for p in prompts], 0).to(device)
    prompt_len = prompt_mask.sum(1)
    out = body(input_ids=prompt_ids, attention_mask=prompt_mask, use_cache=True)
    last_hidden = out.last_hidden_state[torch.arange(len(prompts), device=device), prompt_len - 1]
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)
    answer_ids = pad_sequences(answers, pad_id).to(device)
    answer_mask = pad_sequences([[1] * len(a) for a in answers], 0).to(device)
    lengths = answer_mask.sum(1)
    positions = prompt_len.repeat_interleave(k).unsqueeze(1) + torch.arange(answer_ids.shape[1], device=device)
    hidden = body(
        input_ids=answer_ids,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(k, 0), answer_mask], 1),
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
    ).last_hidden_state
    # answer token j is predicted by the prompt's last position (j = 0) or by answer position j - 1
    first = selected_log_probs(head, last_hidden.repeat_interleave(k, 0), answer_ids[:, 0])
    rows, cols = (answer_mask[:, 1:] == 1).nonzero(as_tuple=True)
    rest = selected_log_probs(head, hidden[rows, cols], answer_ids[rows, cols + 1])
    total = first.clone().index_add_(0, rows, rest)
    return torch.stack([total, total / lengths]).view(2, len(examples), k)


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, examples, pad_id: int, max_new_tokens: int) -> list[str]:
    """Greedy generation from each prompt (left-padded batch), decoded up to the end-of-turn token.

    Generation stops after the longest candidate's length + ``ANSWER_SLACK`` tokens (at most ``max_new_tokens``):
    longer output cannot match any answer, and a rambling model would otherwise pay for every extra token.
    """
    device = next(model.parameters()).device
    prompts = [encode_prompt(tokenizer, e) for e in examples]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    eos = end_of_turn_id(tokenizer)
    longest = max(len(encode_answer(tokenizer, c)) for e in examples for c in e.candidates)
    max_new_tokens = min(max_new_tokens, longest + ANSWER_SLACK)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad_id,
    )
    texts = []
    for row in out[:, width:].tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts


# ----------------------------------------------------------------------------------------------- metrics


def _words(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (the tokenisation of the ``rouge-score`` package)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F1: longest common subsequence of the word sequences, as a harmonic mean of P and R."""
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return 0.0
    previous = [0] * (len(ref) + 1)
    for word in pred:
        current = [0]
        for j, other in enumerate(ref):
            current.append(previous[j] + 1 if word == other else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> bool:
    """Equal once lower-cased with punctuation and spacing ignored."""
    return _words(prediction) == _words(reference)


# ------------------------------------------------------------------------------------------------ scorer


class CausalScorer:
    """Loss and evaluation of a causal LM on choose-the-candidate tasks rendered as chat prompts."""

    kind = "causal"

    def __init__(self, tokenizer, generate_items: int = 8, batch_size: int = 8, max_new_tokens: int = 32) -> None:
        self.tokenizer = tokenizer
        self.generate_items = generate_items
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        pad = tokenizer.pad_token_id
        self.pad_id = int(end_of_turn_id(tokenizer) if pad is None else pad)

    @property
    def settings(self) -> dict:
        """What changes scores beside the expert itself (part of the score cache key)."""
        return {
            "generate_items": self.generate_items,
            "max_new": self.max_new_tokens,
            "slack": ANSWER_SLACK,
        }

    def features(self, examples) -> Features:
        return build_features(self.tokenizer, examples, self.pad_id)

    def loss(self, model: nn.Module, examples) -> torch.Tensor:
        features = self.features(examples)
        device = next(model.parameters()).device
        moved = Features(*(t.to(device) for t in (features.input_ids, features.attention_mask, features.labels)))
        return sft_loss(model, moved)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples) -> dict:
        """Accuracy by length-normalised log-likelihood; exact match and Rouge-L of greedy answers on a subset."""
        was_training = model.training
        model.eval()
        correct = 0
        for start in range(0, len(examples), self.batch_size):
            chunk = examples[start : start + self.batch_size]
            per_token = candidate_log_likelihoods(model, self.tokenizer, chunk, self.pad_id)[1]
            correct += int((per_token.argmax(-1).cpu() == torch.tensor([e.label for e in chunk])).sum())
        result: dict = {"accuracy": correct / max(len(examples), 1)}
        subset = examples[: self.generate_items]
        if subset:
            generated = []
            for start in range(0, len(subset), self.batch_size):
                chunk = subset[start : start + self.batch_size]
                generated += greedy_answers(model, self.tokenizer, chunk, self.pad_id, self.max_new_tokens)
            answers = [e.candidates[e.label] for e in subset]
            result["exact_match"] = sum(map(exact_match, generated, answers)) / len(subset)
            result["rouge_l"] = sum(map(rouge_l, generated, answers)) / len(subset)
            result["samples"] = [
                {"prompt": user_message(e), "answer": a, "generated": g}
                for e, a, g in zip(subset[:3], answers, generated, strict=False)
            ]
        model.train(was_training)
        return result
