"""Train (or load cached) task experts, merge them per method, and evaluate everything.

Experts are cached under ``cache_dir/<model>/<method>/<task>/lr<lr>-s<steps>-seed<seed>/`` together with their
scores, so an interrupted run resumes where it stopped and finished experts are never retrained. The scorer (the
encoder one in ``scorer.py`` or the causal-LM one in ``causal_scorer.py``) supplies the training loss and the
evaluation; everything else (tasks, methods, learning-rate search, merges, cache) is shared.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peft_sparse import calibrate_masks
from peft_sparse.files import atomic_write_text
from peft_sparse.inspection import inspect_adapters, mean_off_diagonal

from .methods import MERGES, Method, build_trainable, load_expert, merge_experts, parse_method, trainable_count


@dataclass
class RunSettings:
    """Everything that determines the results (recorded in the output)."""

    methods: list[str]
    held_in: list[str]
    held_out: list[str]
    steps: int = 100
    batch_size: int = 16
    rank: int = 8
    seed: int = 0
    lr_grid: dict[str, list[float]] = field(default_factory=dict)
    lr_search_tasks: int = 2
    lr_extensions: int = 1  # half-decade steps the search may take past each edge of the grid
    calibration_batches: int = 8
    max_eval: int | None = None
    merge_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])
    reuse: bool = False  # also route / cluster the held-in experts (benchmarks/quality/reuse.py)
    reuse_pooled: bool = True  # with reuse: also train one expert per MBC cluster on its pooled data


DEFAULT_LR_GRID = {
    "full": [1e-5, 3e-5, 1e-4],
    "lora": [3e-4, 1e-3, 3e-3],
    "shira": [1e-3, 3e-3, 1e-2],
    "sparse": [1e-3, 3e-3, 1e-2],
}


def lr_grid_for(settings: RunSettings, method: Method) -> list[float]:
    return settings.lr_grid.get(method.name) or settings.lr_grid.get(method.kind) or DEFAULT_LR_GRID[method.kind]


def next_half_decade(lr: float, side: int) -> float:
    """The next rate up (``side=1``) or down (``-1``) on the 1-3-10 grid: 1e-3 -> 3e-3 -> 1e-2."""
    step = round(2 * math.log10(lr)) + side
    return float(f"{10 ** (step / 2):.0e}")


def _batches(examples, batch_size: int, steps: int, seed: int):
    """``steps`` batches drawn by reshuffling the training set with a fixed seed."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            extra = list(range(len(examples)))
            rng.shuffle(extra)
            order += extra
        chunk, order = order[:batch_size], order[batch_size:]
        yield [examples[i] for i in chunk]


def _memory_kb(field: str) -> int | None:
    """``VmRSS`` / ``VmHWM`` of this process in kB (Linux), else None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_memory() -> int | None:
    """Reset the process's peak-RSS mark (Linux ``clear_refs``); returns the current RSS in kB, or None."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return None
    return _memory_kb("VmRSS")


def reselect_steps(steps: int) -> list[int]:
    """When a ``-reselect`` method re-selects its mask: after 5, 10 and 15 % of the steps (at least step 1)."""
    return sorted({max(1, round(steps * f)) for f in (0.05, 0.10, 0.15)} - {steps})


def train_expert(base, scorer, method: Method, task, lr: float, settings: RunSettings, stats: dict | None = None):
    """Train one expert for ``settings.steps`` AdamW steps at ``lr`` (``stats`` receives timings)."""
    torch.manual_seed(settings.seed)
    model = build_trainable(base, method, settings.rank, settings.seed)
    batches = list(_batches(task.train, settings.batch_size, settings.steps, settings.seed))
    calibrates = method.kind == "sparse" and method.mask_init in ("snip", "gradient", "warmup")

    def calibrate(start: int) -> float:
        began = time.perf_counter()
        chosen = batches[start : start + settings.calibration_batches] or batches[-1:]
        calibrate_masks(model, chosen, loss_fn=scorer.loss, progress=False)
        return time.perf_counter() - began

    rss_before = _reset_peak_memory()
    calibration_seconds = calibrate(0) if calibrates else 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    again = set(reselect_steps(settings.steps)) if method.reselect else set()
    model.train()
    step_seconds = []
    for step, batch in enumerate(tqdm(batches, desc=f"{method.name} on {task.name} lr={lr:g}", leave=False)):
        if step in again:  # the research recipe: the mask follows the task gradient early, then stays fixed
            calibration_seconds += calibrate(step)
            optimizer.state.clear()
            model.train()
        began = time.perf_counter()
        loss = scorer.loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - began)
    model.eval()
    if stats is not None:
        timed = step_seconds[1:] or step_seconds  # the first step pays one-off allocation costs
        stats["seconds_per_step"] = sum(timed) / len(timed)
        stats["calibration_seconds"] = calibration_seconds
        peak = _memory_kb("VmHWM")
        # peak RSS of mask calibration + training above the RSS before: activations, gradients, optimizer state
        stats["peak_extra_mb"] = None if rss_before is None or peak is None else (peak - rss_before) / 1024
    return model


class ExpertCache:
    """Trained experts on disk, keyed by model, method, task, lr, steps and seed."""

    def __init__(self, cache_dir: str | os.PathLike, model_id: str) -> None:
        self.root = Path(cache_dir) / hashlib.sha1(model_id.encode()).hexdigest()[:10]
        self.trained = 0  # experts trained (not loaded) by this process

    def path(self, method: Method, task, lr: float, settings: RunSettings) -> Path:
        key = f"lr{lr:g}-s{settings.steps}-b{settings.batch_size}-r{settings.rank}-seed{settings.seed}"
        return self.root / method.name / f"{task.name}-{task.fingerprint}" / key

    def get_or_train(self, base, scorer, method: Method, task, lr: float, settings: RunSettings) -> Path:
        path = self.path(method, task, lr, settings)
        if (path / "done.json").exists():
            return path
        stats: dict = {}
        model = train_expert(base, scorer, method, task, lr, settings, stats)
        self.trained += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        try:
            from .methods import save_expert

            save_expert(model, base, method, str(tmp))
            info = {"trainable_params": trainable_count(model), "lr": lr, "task": task.name, "method": method.name}
            info.update(stats)
            atomic_write_text(tmp / "done.json", json.dumps(info))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path


def _eval_split(task, split: str, max_eval: int | None):
    examples = getattr(task, split)
    return examples[:max_eval] if max_eval else examples


def mask_overlap(dirs: list[str]) -> dict[str, float | None]:
    """How much the experts' masks overlap: what decides whether ``sparse_average`` differs from averaging."""
    overall = inspect_adapters(dirs)["overall"]
    return {
        "mean_jaccard": mean_off_diagonal(overall["jaccard"]),
        "sign_conflict_rate": overall["sign_conflict_rate"],
        "union_over_mean_expert": overall["union_entries"] / (sum(overall["entries"]) / len(dirs)),
    }


def training_cost(dirs: list[str]) -> dict[str, float | None]:
    """Mean seconds per training step and per expert's mask calibration, and the largest extra peak RSS of a
    training loop, as recorded when the experts trained (same batch size and steps for every method)."""
    infos = [json.loads((Path(d) / "done.json").read_text()) for d in dirs]

    def mean_of(key: str) -> float | None:
        values = [i[key] for i in infos if i.get(key) is not None]
        return sum(values) / len(values) if values else None

    peaks = [i["peak_extra_mb"] for i in infos if i.get("peak_extra_mb") is not None]
    return {
        "seconds_per_step": mean_of("seconds_per_step"),
        "calibration_seconds": mean_of("calibration_seconds"),
        "peak_extra_mb": max(peaks) if peaks else None,
    }


class Harness:
    """Runs the whole experiment and returns a JSON-ready dict."""

    def __init__(self, base, scorer, tasks: dict, settings: RunSettings, cache: ExpertCache) -> None:
        self.base, self.scorer, self.tasks, self.settings, self.cache = base, scorer, tasks, settings, cache
        self.base.eval()
        self.base.requires_grad_(False)
        self.generation: dict[str, dict[str, dict]] = {}  # label -> task -> generation metrics (causal scorer)

    def _evaluation_tag(self) -> str:
        """Empty for the encoder; else a digest of the scorer's evaluation settings (generation length, ...), so
        changing how models are scored re-scores them without retraining the experts."""
        settings = getattr(self.scorer, "settings", {})
        return "-" + hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8] if settings else ""

    def _record(self, label: str | None, task: str, result: dict) -> None:
        """Keep what a scorer reports beside accuracy (generation metrics and samples) for the report."""
        extra = {k: v for k, v in result.items() if k != "accuracy"}
        if label and extra:
            self.generation.setdefault(label, {})[task] = extra

    def expert_score(self, method: Method, task, lr: float, split: str) -> float:
        """Score of a cached expert on its own task (stored next to the expert)."""
        path = self.cache.get_or_train(self.base, self.scorer, method, task, lr, self.settings)
        score_file = path / f"score-{split}-{self.settings.max_eval}{self._evaluation_tag()}.json"
        if score_file.exists():
            result = json.loads(score_file.read_text())
        else:
            model = load_expert(self.base, method, str(path))
            result = self.scorer.evaluate(model, _eval_split(task, split, self.settings.max_eval))
            atomic_write_text(score_file, json.dumps(result))
        if split == "test":
            self._record(method.name, task.name, result)
        return result["accuracy"]

    def search_lr(self, method: Method) -> dict:
        """Pick the learning rate with the best mean validation accuracy on the first held-in tasks.

        A grid of two or more rates whose best sits on an edge is extended one half-decade past that edge, up to
        ``lr_extensions`` times per side (while the newest rate still wins), so a method is not held back by where
        the grid happened to stop.
        """
        search_tasks = [self.tasks[t] for t in self.settings.held_in[: self.settings.lr_search_tasks]]
        table: dict[float, float] = {}

        def evaluate(lr: float) -> None:
            table[lr] = sum(self.expert_score(method, t, lr, "validation") for t in search_tasks) / len(search_tasks)

        grid = sorted(lr_grid_for(self.settings, method))
        for lr in grid:
            evaluate(lr)
        extended = []
        while len(grid) >= 2:
            best = max(table, key=lambda lr: (table[lr], -lr))
            side = 1 if best == max(table) else -1 if best == min(table) else 0
            if side == 0 or extended.count(side) >= self.settings.lr_extensions:
                break
            extended.append(side)
            evaluate(next_half_decade(best, side))
        best = max(table, key=lambda lr: (table[lr], -lr))
        grid_scores = {f"{lr:g}": table[lr] for lr in sorted(table)}
        return {"grid": grid_scores, "best_lr": best, "tasks": [t.name for t in search_tasks], "extended": extended}

    def cached_scores(
        self, label: str, key: list, build, eval_tasks: list[str], record: str | None = None
    ) -> dict[str, float]:
        """Test scores of the model ``build()`` on ``eval_tasks``, kept on disk under a digest of ``key``.

        The model is only built when some score is missing, so a resumed run re-merges nothing it has scored.
        Generation metrics (causal scorer) are kept for the report under ``record``.
        """
        digest = hashlib.sha1(json.dumps([key, self.settings.max_eval]).encode()).hexdigest()[:16]
        digest += self._evaluation_tag()
        path = self.cache.root / "scores" / f"{label.replace(':', '_')}-{digest}.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        entry = {t: f"{t}-{self.tasks[t].fingerprint}" for t in eval_tasks}
        missing = [t for t in eval_tasks if entry[t] not in stored]
        if missing:
            model = build()
            for t in tqdm(missing, desc=f"evaluating {label}", leave=False):
                examples = _eval_split(self.tasks[t], "test", self.settings.max_eval)
                result = self.scorer.evaluate(model, examples)
                stored[entry[t]] = result["accuracy"] if len(result) == 1 else result
            del model
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(stored, indent=1, sort_keys=True))
        scores = {}
        for t in eval_tasks:
            value = stored[entry[t]]
            result = value if isinstance(value, dict) else {"accuracy": value}
            self._record(record, t, result)
            scores[t] = result["accuracy"]
        return scores

    def merged_scores(
        self, method: Method, dirs: list[str], combination: str, eval_tasks: list[str], record: str | None = None
    ) -> dict:
        key = [method.name, combination, [os.path.relpath(d, self.cache.root) for d in dirs]]
        return self.cached_scores(
            f"{method.name}:{combination}:n{len(dirs)}",
            key,
            lambda: merge_experts(self.base, method, dirs, combination),
            eval_tasks,
            record,
        )

    def run(self) -> dict:
        s = self.settings
        all_tasks = s.held_in + s.held_out
        results: dict = {
            "individual": {},
            "merged": {},
            "merge_curve": {},
            "lr_search": {},
            "trainable_params": {},
            "mask_overlap": {},
            "training_cost": {},
            "test_items": {t: len(_eval_split(self.tasks[t], "test", s.max_eval)) for t in all_tasks},
        }
        if s.reuse:
            results["reuse"], results["reuse_clusters"] = {}, {}
        results["individual"]["base"] = self.cached_scores("base", ["base"], lambda: self.base, all_tasks, "base")
        methods = [parse_method(m) for m in s.methods if m != "base"]
        for method in tqdm(methods, desc="methods"):
            search = self.search_lr(method)
            results["lr_search"][method.name] = search
            lr = search["best_lr"]
            scores = {t: self.expert_score(method, self.tasks[t], lr, "test") for t in s.held_in}
            results["individual"][method.name] = scores
            dirs = [str(self.cache.path(method, self.tasks[t], lr, s)) for t in s.held_in]
            info = json.loads((Path(dirs[0]) / "done.json").read_text())
            results["trainable_params"][method.name] = info["trainable_params"]
            results["training_cost"][method.name] = training_cost(dirs)
            if method.kind == "sparse":
                results["mask_overlap"][method.name] = mask_overlap(dirs)
            for combination in MERGES.get(method.kind, ()):
                label = f"{method.name}:{combination}"
                results["merged"][label] = self.merged_scores(method, dirs, combination, all_tasks, label)
            combination = MERGES.get(method.kind, (None,))[0]
            if combination is not None:
                curve = {}
                for n in sorted({k for k in s.merge_sizes if k < len(s.held_in)} | {len(s.held_in)}):
                    merged = self.merged_scores(method, dirs[:n], combination, s.held_in[:n])
                    curve[n] = sum(merged.values()) / n
                results["merge_curve"][f"{method.name}:{combination}"] = curve
            if s.reuse:
                from .reuse import evaluate_reuse

                scores, clusters = evaluate_reuse(self, method, dirs, lr)
                results["reuse"].update(scores)
                results["reuse_clusters"].update(clusters)
        if self.generation:
            results["generation"] = self.generation
        results["experts_trained"] = self.cache.trained
        return results
