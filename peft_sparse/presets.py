"""Target-module presets: ``"qkv"`` (attention q/k/v, fused ones included) and ``"mlp"`` (feed-forward)."""

from __future__ import annotations

from collections.abc import Iterable

_LLAMA_LIKE = {"qkv": ["q_proj", "k_proj", "v_proj"], "mlp": ["gate_proj", "up_proj", "down_proj"]}
_BERT_LIKE = {
    "qkv": ["query", "key", "value"],
    "mlp": r".*\.layer\.\d+\.(intermediate\.dense|output\.dense)",
}
_NEOX_LIKE = {"qkv": ["query_key_value"], "mlp": ["dense_h_to_4h", "dense_4h_to_h"]}

PRESETS: dict[str, dict[str, list[str] | str]] = {
    **{
        name: _LLAMA_LIKE
        for name in ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2")
    },
    **{name: _BERT_LIKE for name in ("bert", "roberta", "xlm-roberta", "electra", "camembert", "distilroberta")},
    "gpt2": {"qkv": ["c_attn"], "mlp": r".*\.mlp\.(c_fc|c_proj)"},
    "phi": {"qkv": ["q_proj", "k_proj", "v_proj"], "mlp": ["fc1", "fc2"]},
    "phi3": {"qkv": ["qkv_proj"], "mlp": ["gate_up_proj", "down_proj"]},
    # fused query_key_value; FalconLinear subclasses nn.Linear
    **{name: _NEOX_LIKE for name in ("gpt_neox", "falcon")},
    "opt": {"qkv": ["q_proj", "k_proj", "v_proj"], "mlp": ["fc1", "fc2"]},
    # T5: self- and cross-attention q/k/v; DenseReluDense wi/wo (gated variants: wi_0, wi_1)
    **{name: {"qkv": ["q", "k", "v"], "mlp": ["wi", "wi_0", "wi_1", "wo"]} for name in ("t5", "mt5", "umt5")},
}
PRESET_NAMES = ("qkv", "mlp")


def is_preset(target_modules: object) -> bool:
    """Whether ``target_modules`` names a preset (``"qkv"``, ``"mlp"`` or a list of only those)."""
    if isinstance(target_modules, str):
        return target_modules in PRESET_NAMES
    return (
        isinstance(target_modules, Iterable)
        and bool(target_modules)
        and all(isinstance(t, str) and t in PRESET_NAMES for t in target_modules)
    )


def resolve_preset(target_modules: str | Iterable[str], model_type: str | None) -> list[str] | str:
    """Turn a preset name (or several) into concrete target modules for ``model_type``."""
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    table = PRESETS.get(model_type or "")
    if table is None:
        raise ValueError(
            f"target_modules preset {names} is not known for model_type {model_type!r}; known model types: "
            f"{sorted(PRESETS)}. Pass explicit module names instead."
        )
    resolved = [table[name] for name in names]
    if len(resolved) == 1:
        return resolved[0]
    if any(isinstance(r, str) for r in resolved):
        # combine regexes (a list is a suffix match, a str a full match): express lists as regex alternatives
        parts = [r if isinstance(r, str) else r"(.*\.)?(" + "|".join(r) + ")" for r in resolved]
        return "|".join(f"(?:{p})" for p in parts)
    return [name for r in resolved for name in r]
