"""Registration of the PEFT type, SparseAdapterConfig validation, budgets, presets and target selection."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from conftest import base_weights, lm_batches, sparse_layers, tiny_bert, tiny_gpt2, tiny_llama, tiny_phi3
from peft import LoraConfig, PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import peft_sparse
from peft_sparse import SparseAdapterConfig, SparseAdapterModel
from peft_sparse.registration import register


def adapted(model: nn.Module) -> set[str]:
    return set(sparse_layers(model))


# --- registration ---------------------------------------------------------------------------------------------
def test_peft_type_member_behaves_like_a_builtin_member():
    member = PeftType.SPARSE_ADAPTER
    assert member.name == member.value == "SPARSE_ADAPTER"
    assert PeftType("SPARSE_ADAPTER") is member
    assert PeftType["SPARSE_ADAPTER"] is member
    assert member in list(PeftType)
    assert member == "SPARSE_ADAPTER" and {member: 1}["SPARSE_ADAPTER"] == 1
    assert json.loads(json.dumps({"peft_type": member})) == {"peft_type": "SPARSE_ADAPTER"}
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is SparseAdapterConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is SparseAdapterModel
    assert peft_sparse.PEFT_TYPE is member


def test_registration_is_idempotent():
    members_before = list(PeftType.__members__)
    configs_before = dict(PEFT_TYPE_TO_CONFIG_MAPPING)
    tuners_before = dict(PEFT_TYPE_TO_TUNER_MAPPING)
    assert register() is PeftType.SPARSE_ADAPTER
    assert register() is PeftType.SPARSE_ADAPTER
    importlib.reload(peft_sparse)
    assert peft_sparse.PEFT_TYPE is PeftType.SPARSE_ADAPTER
    assert list(PeftType.__members__) == members_before
    assert PeftType._member_names_.count("SPARSE_ADAPTER") == 1
    assert dict(PEFT_TYPE_TO_CONFIG_MAPPING) == configs_before
    assert dict(PEFT_TYPE_TO_TUNER_MAPPING) == tuners_before
    # the tuner still works after the reload
    model = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["q_proj"]))
    assert len(adapted(model)) == 1


def test_config_json_round_trip(tmp_path):
    config = SparseAdapterConfig(
        target_modules=["q_proj", "v_proj"], keep_ratio=0.05, block_size=2, mask_init="random", seed=7
    )
    config.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "adapter_config.json").read_text())
    assert stored["peft_type"] == "SPARSE_ADAPTER"
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SparseAdapterConfig)
    assert loaded.peft_type is PeftType.SPARSE_ADAPTER
    assert loaded.target_modules == {"q_proj", "v_proj"}
    assert (loaded.keep_ratio, loaded.block_size, loaded.mask_init, loaded.seed) == (0.05, 2, "random", 7)


def test_saved_config_and_readme_tell_users_to_install_and_import(tmp_path):
    SparseAdapterConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)
    requires = json.loads((tmp_path / "adapter_config.json").read_text())["requires"]
    readme = (tmp_path / "README.md").read_text()
    for text in (requires, readme):
        assert "pip install peft-sparse" in text
        assert "import peft_sparse" in text
    SparseAdapterConfig(target_modules=["q_proj"]).save_pretrained(tmp_path)  # saving again: note appears once
    assert (tmp_path / "README.md").read_text().count("pip install peft-sparse") == 1


# --- validation and budgets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.0001, 2.0])
def test_keep_ratio_outside_unit_interval_errors(ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        SparseAdapterConfig(target_modules=["q_proj"], keep_ratio=ratio)


def test_keep_ratio_one_adapts_every_entry():
    model = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["q_proj"], keep_ratio=1.0))
    (layer,) = sparse_layers(model).values()
    assert torch.equal(layer.sparse_adapter_indices["default"].long(), torch.arange(32 * 32))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mask_init": "bogus"},
        {"budget_scope": "everywhere"},
        {"block_size": 0},
        {"num_params": 0},
        {"lora_rank": 0},
        {"num_params": 10, "lora_rank": 2},
    ],
)
def test_invalid_fields_error(kwargs):
    with pytest.raises(ValueError):
        SparseAdapterConfig(target_modules=["q_proj"], **kwargs)


def test_keep_ratio_budget_per_module():
    model = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["q_proj", "k_proj", "up_proj"]))
    config = model.peft_config["default"]
    layers = sparse_layers(model)
    for name, layer in layers.items():
        rows, cols = layer.get_base_layer().weight.shape
        assert layer.sparse_adapter_indices["default"].numel() == round(0.01 * rows * cols)
        assert config.entries_pattern[name] == layer.sparse_adapter_indices["default"].numel()
        assert config.weight_shapes[name] == [rows, cols]


@pytest.mark.parametrize("total", [1, 997, 1001, 5000])
def test_num_params_budget_sums_exactly_and_is_proportional(total):
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules="all-linear", num_params=total))
    layers = sparse_layers(model)
    counts = {name: layer.sparse_adapter_values["default"].numel() for name, layer in layers.items()}
    assert sum(counts.values()) == total
    assert model.get_nb_trainable_parameters()[0] == total
    sizes = {name: layer.get_base_layer().weight.numel() for name, layer in layers.items()}
    capacity = sum(sizes.values())
    for name, count in counts.items():
        assert abs(count - total * sizes[name] / capacity) < 1.0
    # modules left with no entries (tiny budgets) still run forward and backward
    model.train()
    model(**lm_batches(1)[0]).loss.backward()
    assert sum(int((layer.sparse_adapter_values["default"].grad != 0).sum()) for layer in layers.values()) > 0


def test_budget_larger_than_the_weights_errors():
    model = tiny_llama(layers=1)
    before = base_weights(model)
    with pytest.raises(ValueError, match="budget"):
        get_peft_model(model, SparseAdapterConfig(target_modules=["q_proj"], num_params=32 * 32 + 1))
    with pytest.raises(ValueError, match="budget"):
        get_peft_model(model, SparseAdapterConfig(target_modules=["q_proj"], lora_rank=17))  # 17 * 64 > 1024
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    assert base_weights(model).keys() == before.keys()


def test_block_budget_rounds_to_whole_blocks():
    config = SparseAdapterConfig(target_modules=["q_proj"], num_params=64, block_size=4)
    model = get_peft_model(tiny_llama(layers=1), config)
    (layer,) = sparse_layers(model).values()
    assert layer.sparse_adapter_indices["default"].numel() == 4
    assert layer.sparse_adapter_values["default"].numel() == 64


@pytest.mark.parametrize(
    ("targets", "rank_pattern"),
    [(["q_proj", "v_proj"], {}), (["q_proj", "down_proj"], {"down_proj": 1}), ("all-linear", {})],
)
def test_from_lora_config_matches_lora_targets_and_parameter_count(targets, rank_pattern):
    lora = LoraConfig(r=2, target_modules=targets, rank_pattern=rank_pattern)
    lora_model = get_peft_model(tiny_llama(), lora)
    lora_targets = {name.removeprefix("base_model.model.") for name in lora_model.base_model.targeted_module_names}
    lora_trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)

    sparse = get_peft_model(tiny_llama(), SparseAdapterConfig.from_lora_config(lora))
    sparse_trainable = sum(p.numel() for p in sparse.parameters() if p.requires_grad)
    assert adapted(sparse) == lora_targets
    assert sparse_trainable == lora_trainable


def test_from_lora_config_copies_fields_and_accepts_overrides():
    lora = LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    config = SparseAdapterConfig.from_lora_config(lora, mask_init="random", num_params=100)
    assert config.target_modules == {"q_proj"}
    assert config.layers_to_transform == [1] and config.layers_pattern == "layers"
    assert config.mask_init == "random" and config.num_params == 100 and config.lora_rank is None
    model = get_peft_model(tiny_llama(), config)
    assert adapted(model) == {"model.layers.1.self_attn.q_proj"}
    assert model.get_nb_trainable_parameters()[0] == 100


# --- target selection -----------------------------------------------------------------------------------------
def test_presets_llama():
    qkv = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules="qkv"))
    assert adapted(qkv) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    mlp = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules="mlp"))
    assert adapted(mlp) == {f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")}
    both = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig(target_modules=["qkv", "mlp"]))
    assert adapted(both) == adapted(qkv) | adapted(mlp)


def test_presets_gpt2_fused_attention_and_mlp_only():
    qkv = get_peft_model(tiny_gpt2(), SparseAdapterConfig(target_modules="qkv"))
    assert adapted(qkv) == {f"transformer.h.{i}.attn.c_attn" for i in range(2)}
    mlp = get_peft_model(tiny_gpt2(), SparseAdapterConfig(target_modules="mlp"))
    assert adapted(mlp) == {f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("c_fc", "c_proj")}
    both = get_peft_model(tiny_gpt2(), SparseAdapterConfig(target_modules=["qkv", "mlp"]))
    assert adapted(both) == adapted(qkv) | adapted(mlp)
    assert not any("attn.c_proj" in name for name in adapted(both))


def test_presets_bert_mlp_excludes_attention_output():
    qkv = get_peft_model(tiny_bert(), SparseAdapterConfig(target_modules="qkv"))
    assert adapted(qkv) == {
        f"encoder.layer.{i}.attention.self.{n}" for i in range(2) for n in ("query", "key", "value")
    }
    mlp = get_peft_model(tiny_bert(), SparseAdapterConfig(target_modules="mlp"))
    expected = {f"encoder.layer.{i}.{n}" for i in range(2) for n in ("intermediate.dense", "output.dense")}
    assert adapted(mlp) == expected
    both = get_peft_model(tiny_bert(), SparseAdapterConfig(target_modules=["mlp", "qkv"]))
    assert adapted(both) == adapted(qkv) | expected


def test_presets_phi3_fused_qkv():
    qkv = get_peft_model(tiny_phi3(), SparseAdapterConfig(target_modules="qkv"))
    assert adapted(qkv) == {"model.layers.0.self_attn.qkv_proj"}
    mlp = get_peft_model(tiny_phi3(), SparseAdapterConfig(target_modules="mlp"))
    assert adapted(mlp) == {"model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.down_proj"}


def test_preset_for_unknown_model_type_errors():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="preset"):
        get_peft_model(model, SparseAdapterConfig(target_modules="qkv"))


def test_all_linear_targets_every_linear_but_the_output_head():
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules="all-linear"))
    expected = {
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    }
    assert adapted(model) == expected


def test_exclude_modules():
    config = SparseAdapterConfig(target_modules="all-linear", exclude_modules=["k_proj", "down_proj"])
    names = adapted(get_peft_model(tiny_llama(), config))
    assert len(names) == 10
    assert not any(n.endswith(("k_proj", "down_proj")) for n in names)


def test_layers_to_transform():
    config = SparseAdapterConfig(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    assert adapted(get_peft_model(tiny_llama(), config)) == {
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    }


def test_regex_target():
    config = SparseAdapterConfig(target_modules=r".*layers\.0\.self_attn\.(q|o)_proj")
    assert adapted(get_peft_model(tiny_llama(), config)) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.o_proj",
    }


def test_target_matching_nothing_errors():
    with pytest.raises(ValueError, match="not found"):
        get_peft_model(tiny_llama(), SparseAdapterConfig(target_modules=["no_such_module"]))


@pytest.mark.parametrize("targets", [["embed_tokens"], ["q_proj", "embed_tokens"], ["input_layernorm"]])
def test_unsupported_module_type_errors_naming_it_and_leaves_the_model_unchanged(targets):
    model = tiny_llama(layers=1)
    before = base_weights(model)
    types_before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"model\.(embed_tokens|layers\.0\.input_layernorm)"):
        get_peft_model(model, SparseAdapterConfig(target_modules=targets))
    assert {name: type(m) for name, m in model.named_modules()} == types_before
    after = {k: v for k, v in model.state_dict().items()}
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


def test_unequal_entries_pattern_capacity_is_checked():
    config = SparseAdapterConfig(target_modules=["q_proj"], entries_pattern={"model.layers.0.self_attn.q_proj": 2000})
    with pytest.raises(ValueError, match="entries_pattern"):
        get_peft_model(tiny_llama(layers=1), config)


def test_weight_shape_mismatch_errors():
    config = SparseAdapterConfig(target_modules=["q_proj"], weight_shapes={"model.layers.0.self_attn.q_proj": [8, 8]})
    with pytest.raises(ValueError, match="shape"):
        get_peft_model(tiny_llama(layers=1), config)


# --- every field validated on construction ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("target_modules", 3),
        ("target_modules", ["q_proj", 3]),
        ("exclude_modules", 1.5),
        ("keep_ratio", "0.1"),
        ("keep_ratio", float("nan")),
        ("keep_ratio", True),
        ("num_params", 10.5),
        ("num_params", -1),
        ("lora_rank", 1.5),
        ("lora_rank", "8"),
        ("lora_rank", True),
        ("lora_rank_pattern", {"q_proj": 0}),
        ("lora_rank_pattern", {"q_proj": 2.5}),
        ("lora_rank_pattern", ["q_proj"]),
        ("block_size", 2.0),
        ("block_size", -4),
        ("seed", "abc"),
        ("seed", 1.0),
        ("warmup_steps", -1),
        ("warmup_steps", 0),
        ("warmup_steps", 2.5),
        ("warmup_lr", -1),
        ("warmup_lr", 0),
        ("warmup_lr", float("inf")),
        ("warmup_lr", "1e-4"),
        ("fan_in_fan_out", "yes"),
        ("init_weights", 1),
        ("layers_to_transform", -1),
        ("layers_to_transform", [0, "1"]),
        ("layers_to_transform", 1.0),
        ("modules_to_save", 5),
        ("entries_pattern", {"q_proj": -1}),
        ("entries_pattern", {"q_proj": 3.5}),
        ("weight_shapes", {"q_proj": [32]}),
        ("weight_shapes", {"q_proj": [32, 0]}),
        ("weight_shapes", {"q_proj": [32, 2.5]}),
        ("requires", None),
    ],
)
def test_every_field_is_validated_with_an_error_naming_it(field, value):
    kwargs = {"target_modules": ["q_proj"], field: value}
    with pytest.raises(ValueError, match=field):
        SparseAdapterConfig(**kwargs)


def test_valid_edge_values_are_accepted():
    config = SparseAdapterConfig(
        target_modules="all-linear",
        keep_ratio=1,
        seed=-3,
        warmup_steps=1,
        warmup_lr=1,
        layers_to_transform=0,
        layers_pattern="layers",
        lora_rank_pattern={"q_proj": 1},
        entries_pattern={"x": 0},
        weight_shapes={"x": (4, 5)},
    )
    assert config.keep_ratio == 1 and config.seed == -3


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers(tmp_path):
    import numpy as np

    config = SparseAdapterConfig(
        target_modules=["q_proj"], lora_rank=np.int64(2), block_size=np.int32(4), seed=np.int64(3),
        warmup_lr=np.float32(1e-3), entries_pattern={"a": np.int64(5)},
    )
    assert type(config.lora_rank) is int and type(config.warmup_lr) is float
    assert type(config.entries_pattern["a"]) is int
    config.save_pretrained(tmp_path)  # JSON-serialisable
    loaded = SparseAdapterConfig.from_pretrained(tmp_path)
    assert (loaded.lora_rank, loaded.block_size, loaded.seed) == (2, 4, 3)


# --- block size against the targeted weights ------------------------------------------------------------------------
KV_TARGETS = ["k_proj", "v_proj"]  # 16 x 32 weights in tiny_llama (2 key/value heads of 8)


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_block_larger_than_a_targeted_weight_is_refused_and_nothing_changes():
    lora = LoraConfig(r=8, target_modules=KV_TARGETS)
    model = tiny_llama(layers=1)
    before = base_weights(model)
    with pytest.raises(ValueError, match=r"block_size=32 is larger than the weight of .*k_proj.*\(16, 32\).*<= 16"):
        get_peft_model(model, SparseAdapterConfig.from_lora_config(lora, block_size=32))
    with pytest.raises(ValueError, match="block_size=1000"):
        get_peft_model(model, SparseAdapterConfig(target_modules=["q_proj"], block_size=1000))
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    after = base_weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("block_size", [4, 8, 16])
def test_from_lora_config_with_blocks_keeps_the_lora_parameter_count(block_size):
    lora = LoraConfig(r=8, target_modules=KV_TARGETS)
    lora_trainable = trainable(get_peft_model(tiny_llama(layers=1), lora))
    assert lora_trainable == 2 * 8 * (16 + 32)
    sparse = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig.from_lora_config(lora, block_size=block_size))
    assert trainable(sparse) == lora_trainable  # 768 = 3 blocks of 16 x 16 (2 + 1), 12 of 8 x 8, 48 of 4 x 4
    rows = [layer.sparse_adapter_indices["default"].numel() for layer in sparse_layers(sparse).values()]
    assert sum(rows) * block_size**2 == lora_trainable


def test_lora_budget_with_blocks_is_within_half_a_block_of_lora():
    lora = LoraConfig(r=3, target_modules=["q_proj", "k_proj", "up_proj"])  # 3 * (64 + 48 + 80) = 576 entries
    sparse = get_peft_model(tiny_llama(layers=1), SparseAdapterConfig.from_lora_config(lora, block_size=5))
    lora_trainable = trainable(get_peft_model(tiny_llama(layers=1), lora))
    assert abs(trainable(sparse) - lora_trainable) <= 25 / 2


# --- presets for GPT-NeoX, OPT, Falcon, T5 (module names as in transformers' modeling files) -------------------------
def _tiny(kind: str) -> nn.Module:
    from transformers import (
        FalconConfig,
        FalconForCausalLM,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    torch.manual_seed(0)
    common = {"vocab_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64}
    if kind == "gpt_neox":
        return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=48, **common))
    if kind == "opt":
        config = OPTConfig(hidden_size=32, num_hidden_layers=2, ffn_dim=48, word_embed_proj_dim=32, **common)
        return OPTForCausalLM(config)
    if kind == "falcon":
        return FalconForCausalLM(FalconConfig(hidden_size=32, num_hidden_layers=2, **common))
    config = T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_decoder_layers=1, num_heads=4,
        feed_forward_proj="gated-gelu" if kind == "t5-gated" else "relu", decoder_start_token_id=0,
    )
    return T5ForConditionalGeneration(config)


def _t5_names(mlp: list[str], qkv: bool) -> set[str]:
    if qkv:
        attention = [("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention")]
        attention.append(("decoder", 1, "EncDecAttention"))
        return {f"{stack}.block.0.layer.{i}.{a}.{p}" for stack, i, a in attention for p in "qkv"}
    return {f"encoder.block.0.layer.1.DenseReluDense.{n}" for n in mlp} | {
        f"decoder.block.0.layer.2.DenseReluDense.{n}" for n in mlp
    }


PRESET_CASES = {
    "gpt_neox": (
        {f"gpt_neox.layers.{i}.attention.query_key_value" for i in range(2)},
        {f"gpt_neox.layers.{i}.mlp.{n}" for i in range(2) for n in ("dense_h_to_4h", "dense_4h_to_h")},
    ),
    "opt": (
        {f"model.decoder.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"},
        {f"model.decoder.layers.{i}.{n}" for i in range(2) for n in ("fc1", "fc2")},
    ),
    "falcon": (
        {f"transformer.h.{i}.self_attention.query_key_value" for i in range(2)},
        {f"transformer.h.{i}.mlp.{n}" for i in range(2) for n in ("dense_h_to_4h", "dense_4h_to_h")},
    ),
    "t5": (_t5_names([], qkv=True), _t5_names(["wi", "wo"], qkv=False)),
    "t5-gated": (_t5_names([], qkv=True), _t5_names(["wi_0", "wi_1", "wo"], qkv=False)),
}


@pytest.mark.parametrize("kind", list(PRESET_CASES))
def test_presets_cover_gpt_neox_opt_falcon_t5(kind):
    qkv_names, mlp_names = PRESET_CASES[kind]
    for preset, expected in (("qkv", qkv_names), ("mlp", mlp_names), (["qkv", "mlp"], qkv_names | mlp_names)):
        model = get_peft_model(_tiny(kind), SparseAdapterConfig(target_modules=preset, keep_ratio=0.1))
        assert adapted(model) == expected, preset
    # the adapted model trains: every adapter receives a gradient
    ids = torch.randint(3, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "labels": ids}
    model.train()
    model(**inputs).loss.backward()
    assert all(layer.sparse_adapter_values["default"].grad is not None for layer in sparse_layers(model).values())
