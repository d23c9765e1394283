"""The causal-LM path of the quality benchmark on a tiny Llama: masking, scoring, Rouge-L, the pipeline end to end."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from quality_tasks import WORDS
from quality_tasks import category_task as shared_category_task

from benchmarks.quality import harness as harness_lib
from benchmarks.quality.causal_model import _write_converted, tiny_llama, tiny_tokenizer
from benchmarks.quality.causal_scorer import (
    SYSTEM_PROMPT,
    CausalScorer,
    candidate_log_likelihoods,
    encode_answer,
    exact_match,
    prompt_text,
    rouge_l,
    user_message,
)
from benchmarks.quality.harness import RunSettings, reselect_steps, train_expert
from benchmarks.quality.methods import load_expert, parse_method, save_expert
from benchmarks.quality.run import main
from benchmarks.quality.tasks import Task, save_task_jsonl

# a two-word label, so answers span several tokens
CAUSAL_WORDS = {("hand tool" if label == "tool" else label): members for label, members in WORDS.items()}


def category_task(name: str, template: str, seed: int) -> Task:
    return shared_category_task(name, template, seed, CAUSAL_WORDS)


EXAMPLES = category_task("t", "what kind of thing is a {}?", 3).train[:5]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer([SYSTEM_PROMPT, *(user_message(e) for e in EXAMPLES)])


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_llama(tokenizer, seed=1)


def test_labels_are_minus_100_exactly_on_prompt_and_padding(tokenizer):
    scorer = CausalScorer(tokenizer)
    features = scorer.features(EXAMPLES)
    for row, example in enumerate(EXAMPLES):
        prompt = tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
        answer = tokenizer(example.candidates[example.label], add_special_tokens=False)["input_ids"]
        answer = answer + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
        n = len(prompt) + len(answer)
        assert features.input_ids[row, :n].tolist() == prompt + answer
        assert features.labels[row, : len(prompt)].tolist() == [-100] * len(prompt)
        assert features.labels[row, len(prompt) : n].tolist() == answer
        assert (features.labels[row, n:] == -100).all() and (features.attention_mask[row, n:] == 0).all()
        assert features.attention_mask[row, :n].all()
        assert tokenizer.decode(answer[:-1]) == example.candidates[example.label]


def test_sft_loss_is_cross_entropy_on_answer_tokens_only(tokenizer, model):
    scorer = CausalScorer(tokenizer)
    features = scorer.features(EXAMPLES)
    logits = model(input_ids=features.input_ids, attention_mask=features.attention_mask).logits
    log_probs = logits.log_softmax(-1)
    terms = []
    for row in range(len(EXAMPLES)):
        for pos in range(1, features.labels.shape[1]):
            target = int(features.labels[row, pos])
            if target != -100:
                terms.append(-log_probs[row, pos - 1, target])
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(scorer.loss(model, EXAMPLES), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("wrap", [False, True])
def test_candidate_log_likelihoods_match_a_full_forward(tokenizer, model, wrap):
    scored = model
    if wrap:  # a PEFT-wrapped model with a non-zero LoRA delta goes through the same body/head split
        scored = get_peft_model(tiny_llama(tokenizer, seed=1), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for name, param in scored.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    examples = EXAMPLES[:3]
    scorer = CausalScorer(tokenizer)
    got = candidate_log_likelihoods(scored, tokenizer, examples, scorer.pad_id)
    for i, example in enumerate(examples):
        prompt = tokenizer(prompt_text(tokenizer, example), add_special_tokens=False)["input_ids"]
        for j, candidate in enumerate(example.candidates):
            answer = encode_answer(tokenizer, candidate)
            with torch.no_grad():
                log_probs = scored(input_ids=torch.tensor([prompt + answer])).logits[0].log_softmax(-1)
            total = sum(float(log_probs[len(prompt) + t - 1, answer[t]]) for t in range(len(answer)))
            assert got[0, i, j].item() == pytest.approx(total, abs=1e-4)
            assert got[1, i, j].item() == pytest.approx(total / len(answer), abs=1e-4)


def test_rouge_l_and_exact_match_by_hand():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    # LCS("the cat sat on the mat", "the cat is on the mat") = the cat on the mat = 5; P = R = 5/6
    assert rouge_l("The cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # LCS = "b d" (2); P = 2/4, R = 2/3 -> F = 2PR/(P+R) = 4/7
    assert rouge_l("a b c d", "b x d") == pytest.approx(4 / 7)
    assert rouge_l("nothing shared", "at all") == 0.0 and rouge_l("", "x") == 0.0
    assert exact_match("Cold.", "cold") and not exact_match("very cold", "cold")


def test_reselect_method_recalibrates_at_its_early_steps(tokenizer, monkeypatch):
    method = parse_method("sparse-gradient-reselect")
    assert method.reselect and method.mask_init == "gradient"
    with pytest.raises(ValueError, match="reselect"):
        parse_method("sparse-magnitude-reselect")
    assert reselect_steps(40) == [2, 4, 6] and reselect_steps(2) == [1]
    calls = []
    real = harness_lib.calibrate_masks
    monkeypatch.setattr(harness_lib, "calibrate_masks", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = Task("t", False, EXAMPLES, [], [])
    settings = RunSettings(methods=[], held_in=[], held_out=[], steps=20, batch_size=2, calibration_batches=1)
    stats: dict = {}
    train_expert(tiny_llama(tokenizer), CausalScorer(tokenizer), method, task, 1e-3, settings, stats)
    assert len(calls) == 1 + len(reselect_steps(20))
    assert stats["seconds_per_step"] > 0 and stats["calibration_seconds"] > 0


def test_full_fine_tuning_delta_of_tied_embeddings_round_trips(tokenizer, tmp_path):
    base = tiny_llama(tokenizer)
    method = parse_method("full")
    tuned = tiny_llama(tokenizer)
    with torch.no_grad():
        tuned.model.embed_tokens.weight.add_(0.25)
    save_expert(tuned, base, method, str(tmp_path))
    loaded = load_expert(base, method, str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    torch.testing.assert_close(loaded.model.embed_tokens.weight, tuned.model.embed_tokens.weight)  # added once


def test_converted_checkpoint_reloads_as_plain_llama_with_tied_weights(tokenizer, model, tmp_path):
    import subprocess
    import sys

    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves in the config
    try:
        _write_converted(model, tokenizer, tmp_path / "converted")
    finally:
        del model.config.quantization_config
    saved = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert "quantization_config" not in saved
    ids = [[2, 5, 7, 9]]
    expected = model(input_ids=torch.tensor(ids)).logits
    code = (
        "import sys, torch; from transformers import LlamaForCausalLM, AutoTokenizer;"
        "m = LlamaForCausalLM.from_pretrained(sys.argv[1]); AutoTokenizer.from_pretrained(sys.argv[1]);"
        "assert m.lm_head.weight is m.model.embed_tokens.weight;"
        "print(m(input_ids=torch.tensor(eval(sys.argv[2]))).logits.flatten().tolist())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "converted"), repr(ids)], capture_output=True, text=True, check=True
    )
    got = torch.tensor(json.loads(out.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected.flatten(), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    save_task_jsonl(category_task("plain", "{}", 0), root / "plain.jsonl")
    save_task_jsonl(category_task("sentence", "I saw a {} yesterday", 1), root / "sentence.jsonl")
    save_task_jsonl(category_task("question", "what kind of thing is a {}?", 2), root / "held_out" / "question.jsonl")
    return root


def run(tasks_dir, tmp_path, *extra):
    args = ["--causal", "--smoke", "--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "out"), "--threads", "1"]
    assert main(args + ["--cache-dir", str(tmp_path / "cache"), *extra]) == 0
    return json.loads((tmp_path / "out" / "quality_causal_smoke.json").read_text())


def test_causal_smoke_run_reports_generation_and_cost_and_resumes(tasks_dir, tmp_path):
    report = run(tasks_dir, tmp_path)
    header, results = report["header"], report["results"]
    assert header["scorer"] == "causal" and header["model"] == "tiny-llama" and header["batch_size"] == 4
    assert set(results["individual"]) == {"base", "lora", "sparse-magnitude"}
    assert results["trainable_params"]["lora"] == results["trainable_params"]["sparse-magnitude"] > 0
    assert {"lora:ties", "lora:svd", "sparse-magnitude:sparse_average"} <= set(results["merged"])
    generation = results["generation"]
    assert {"base", "lora", "sparse-magnitude", "lora:cat"} <= set(generation)
    for label, per_task in generation.items():
        assert set(per_task) == ({"plain", "sentence", "question"} if ":" in label or label == "base" else
                                 {"plain", "sentence"})  # fmt: skip
        for metrics in per_task.values():
            assert 0.0 <= metrics["exact_match"] <= metrics["rouge_l"] <= 1.0  # an exact match has Rouge-L 1
            assert len(metrics["samples"]) == 2 and {"prompt", "answer", "generated"} <= set(metrics["samples"][0])
    for method in ("lora", "sparse-magnitude"):
        assert results["training_cost"][method]["seconds_per_step"] > 0
    markdown = (tmp_path / "out" / "quality_causal_smoke.md").read_text()
    assert "(causal LM)" in markdown and "Greedy generation" in markdown and "Training cost" in markdown
    assert "merged sparse ≥ best merged LoRA + 2 pts" in markdown and "Generated answers on `plain`" in markdown

    done = sorted((tmp_path / "cache").rglob("done.json"))
    assert len(done) == 4 and report["header"]["experts_trained_by_this_command"] == 4
    stamps = [p.stat().st_mtime_ns for p in done]
    scores = sorted((tmp_path / "cache").rglob("scores/*.json"))
    score_stamps = [p.stat().st_mtime_ns for p in scores]
    again = run(tasks_dir, tmp_path)
    assert [p.stat().st_mtime_ns for p in done] == stamps
    assert [p.stat().st_mtime_ns for p in scores] == score_stamps
    assert again["header"]["experts_trained_by_this_command"] == 0
    assert again["results"]["individual"] == results["individual"]
    assert again["results"]["merged"] == results["merged"]
    assert again["results"]["generation"] == results["generation"]

    fewer = run(tasks_dir, tmp_path, "--generate", "1")  # new evaluation settings: re-scored, not retrained
    assert [p.stat().st_mtime_ns for p in done] == stamps and fewer["header"]["experts_trained_by_this_command"] == 0
    assert fewer["results"]["individual"] == results["individual"]  # the same experts, the same accuracy
    generated = [m for per_task in fewer["results"]["generation"].values() for m in per_task.values()]
    assert generated and all(len(m["samples"]) == 1 for m in generated)


def test_step_cost_times_every_method_round_robin(tasks_dir, tmp_path):
    from benchmarks.quality import step_cost

    args = ["--model", "tiny-llama", "--tasks-dir", str(tasks_dir), "--task", "plain", "--steps", "3"]
    args += ["--batch-size", "2", "--methods", "lora", "sparse-gradient", "--out", str(tmp_path), "--threads", "1"]
    assert step_cost.main(args + ["--no-memory"]) == 0
    result = json.loads((tmp_path / "quality_causal_step_cost.json").read_text())["results"]
    assert result["lora"]["trainable_params"] == result["sparse-gradient"]["trainable_params"] > 0
    for info in result.values():
        assert len(info["steps_s"]) == 2 and 0 < info["min_s"] <= info["median_s"]
    parsed = step_cost.parse_args(args[:4] + ["--methods", "sparse-gradient", "--batch-size", "2"])
    task = category_task("plain", "{}", 0)
    memory = step_cost.memory_in_fresh_processes(parsed, [task.train[:2], task.train[2:4]])  # a child process
    assert set(memory) == {"sparse-gradient"} and (memory["sparse-gradient"] is None or memory["sparse-gradient"] >= 0)
    assert "× LoRA" in (tmp_path / "quality_causal_step_cost.md").read_text()
    with pytest.raises(SystemExit, match="--task"):
        step_cost.main(args[:4] + ["--task", "missing", "--out", str(tmp_path)])


def test_generate_needs_the_causal_scorer_and_sizes_are_checked():
    with pytest.raises(SystemExit, match="--generate needs --causal"):
        main(["--smoke", "--generate", "2"])
    for bad in (["--generate", "-1"], ["--batch-size", "0"]):
        with pytest.raises(SystemExit, match="at least"):
            main(["--causal", "--smoke", *bad])


def test_step_cost_times_baseline_kernels_side_by_side(tasks_dir, tmp_path, monkeypatch):
    from benchmarks.quality import step_cost
    from peft_sparse.ops import registered

    seen = []
    real_measure_step = step_cost._step

    def recording_step(model, optimizer, scorer, batch):
        seen.append(registered._flat.__name__)
        return real_measure_step(model, optimizer, scorer, batch)

    monkeypatch.setattr(step_cost, "_step", recording_step)
    args = ["--model", "tiny-llama", "--tasks-dir", str(tasks_dir), "--task", "plain", "--steps", "2"]
    args += ["--batch-size", "2", "--methods", "lora", "sparse-gradient", "--out", str(tmp_path), "--threads", "1"]
    assert step_cost.main(args + ["--no-memory", "--baseline-kernels", "HEAD"]) == 0
    result = json.loads((tmp_path / "quality_causal_step_cost.json").read_text())["results"]
    assert list(result) == ["lora", "sparse-gradient", "sparse-gradient @HEAD kernels"]
    # round robin: lora, sparse (this tree's kernels), sparse (HEAD's kernels loaded from git), per batch
    assert seen == ["peft_sparse.ops.sparse_linear", "peft_sparse.ops.sparse_linear", "baseline_ops.sparse_linear"] * 2
    assert registered._flat.__name__ == "peft_sparse.ops.sparse_linear"  # restored
