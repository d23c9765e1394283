"""Smoke test of the performance benchmark: ``--quick`` runs end to end and writes complete, sane outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("perf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_outputs_exist(quick_run: Path) -> None:
    for name in ("perf.json", "perf.md", "perf.png"):
        path = quick_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (quick_run / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(quick_run.glob(".*tmp*")), "temporary files left behind"


def test_json_has_every_method_and_metric(quick_run: Path) -> None:
    from benchmarks.perf.methods import METHODS
    from benchmarks.perf.run import METRICS, NOT_APPLICABLE

    data = json.loads((quick_run / "perf.json").read_text())
    assert data["meta"]["quick"] is True
    assert set(data["models"]) == {"minilm", "llama"}
    for model_name, model in data["models"].items():
        assert set(model["methods"]) == set(METHODS)
        for method in METHODS:
            row = model["methods"][method]
            for metric in METRICS:
                assert metric in row, (model_name, method, metric)
                value = row[metric]
                if metric in NOT_APPLICABLE.get(method, set()):
                    assert value is None, (model_name, method, metric)
                else:
                    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (
                        model_name,
                        method,
                        metric,
                        value,
                    )
        merges = model["merge_experts"]["merges"]
        assert len(merges) >= 5
        assert all(math.isfinite(m["cpu_s"]) and m["cpu_s"] > 0 for m in merges.values())
    rows = data["swap_scaling"]["rows"]
    assert rows and all(r["swap_merged_s"] > 0 for r in rows)


def test_targets_table(quick_run: Path) -> None:
    data = json.loads((quick_run / "perf.json").read_text())
    targets = data["targets"]
    assert len(targets) >= 10
    for target in targets:
        assert isinstance(target["met"], bool)
        assert target["measured"] is not None and math.isfinite(target["measured"]) and target["measured"] > 0
    md = (quick_run / "perf.md").read_text()
    assert "## Targets" in md and ("met" in md or "MISSED" in md)
    for model in ("minilm", "llama"):
        assert f"## {model}" in md


# LoRA on each base goes through PEFT's own layer for that base
LORA_LAYERS = {
    "bf16": "peft.tuners.lora.layer.Linear",
    "bnb_nf4": "peft.tuners.lora.bnb.Linear4bit",
    "bnb_int8": "peft.tuners.lora.bnb.Linear8bitLt",
    "torchao_int8": "peft.tuners.lora.torchao.TorchaoLoraLinear",
}
WEIGHT_TYPES = {
    "bf16": "Parameter[torch.bfloat16]",
    "bnb_nf4": "Params4bit[torch.uint8]",
    "bnb_int8": "Int8Params[torch.int8]",
    "torchao_int8": "Int8Tensor[torch.float32]",  # torchao reports the logical dtype
}


def test_other_bases_have_their_own_rows_and_targets(quick_run: Path) -> None:
    from benchmarks.perf.bases import BASE_VARIANTS
    from benchmarks.perf.methods import LOWER_BOUND
    from benchmarks.perf.models import LLAMA_BASE_VARIANTS

    data = json.loads((quick_run / "perf.json").read_text())
    llama = data["models"]["llama"]
    variants = llama["base_variants"]
    assert list(variants) == LLAMA_BASE_VARIANTS == list(WEIGHT_TYPES)
    md = (quick_run / "perf.md").read_text()
    scopes = {t["scope"] for t in data["targets"]}
    for name, variant in variants.items():
        assert "skipped" not in variant, variant  # bitsandbytes and torchao are dev dependencies
        assert variant["weight_types"] == [WEIGHT_TYPES[name]]
        assert list(variant["methods"]) == list(BASE_VARIANTS[name].methods)
        for method, row in variant["methods"].items():
            assert len(row["step_cpu_all_s"]) == data["meta"]["settings"]["steps"]
            for key in ("step_cpu_s", "step_wall_s"):
                assert math.isfinite(row[key]) and row[key] > 0, (name, method, key)
            # the same counts as on the fp32 base: the quantized layers' logical shapes, not their packed storage
            expected = 0 if method == LOWER_BOUND else llama["methods"][method]["trainable_params"]
            assert row["trainable_params"] == expected, (name, method)
        assert variant["methods"]["lora_r8"]["adapter_layers"] == [LORA_LAYERS[name]]
        assert variant["methods"]["sparse"]["adapter_layers"] == ["peft_sparse.layer.Linear"]
        assert variant["methods"][LOWER_BOUND]["adapter_layers"] == []
        assert {"step: block 32 / LoRA r=8", "step: unstructured / frozen lower bound"} <= {
            t["target"] for t in data["targets"] if t["scope"] == f"llama, {name} base"
        }, scopes
        assert f"| {variant['label']} | peft-sparse block 32x32 (r=8 count) |" in md


def test_a_base_variant_whose_library_is_missing_is_reported_as_skipped(
    quick_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch import nn

    from benchmarks.perf import bases, report
    from benchmarks.perf.models import quick_specs

    def must_not_run(model: nn.Module) -> nn.Module:
        raise AssertionError("prepare ran although its library is missing")

    variant = bases.BaseVariant("imaginary 3-bit base", must_not_run, requires=("no_such_quantizer_lib",))
    monkeypatch.setitem(bases.BASE_VARIANTS, "imaginary", variant)
    spec = next(s for s in quick_specs() if s.name == "llama")
    spec = type(spec)(**{**spec.__dict__, "extra": {"base_variants": ["imaginary"]}})
    result = bases.variant_step_times(spec, nn.Linear(2, 2), warmup=0, steps=1)
    assert result == {"imaginary": {"label": variant.label, "skipped": "not installed: no_such_quantizer_lib"}}
    table = "\n".join(report.variants_table({"base_variants": result}))
    assert "| imaginary 3-bit base | skipped: not installed: no_such_quantizer_lib |" in table
    data = json.loads((quick_run / "perf.json").read_text())
    data["models"]["llama"]["base_variants"].update(result)
    targets = report.evaluate_targets(data)
    assert len(targets) == len(data["targets"]) and not [t for t in targets if "imaginary" in t["scope"]]


def test_registering_a_base_variant_refuses_duplicates_and_unknown_methods() -> None:
    from benchmarks.perf import bases

    with pytest.raises(ValueError, match="'bnb_nf4' is already registered"):
        bases.register_base_variant("bnb_nf4", bases.BaseVariant("again", lambda m: m))
    with pytest.raises(ValueError, match=r"unknown methods \['dora'\]"):
        bases.register_base_variant("new", bases.BaseVariant("new", lambda m: m, methods=("dora",)))
    assert "new" not in bases.BASE_VARIANTS
