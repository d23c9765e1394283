"""Train (or load cached) task experts, merge them per method, and evaluate everything.

Experts are cached under ``cache_dir/<model>/<method>/<task>/lr<lr>-s<steps>-seed<seed>/`` together with their
scores, so an interrupted run resumes where it stopped and finished experts are never retrained.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from peft_sparse import calibrate_masks
from peft_sparse.files import atomic_write_text
from peft_sparse.inspection import inspect_adapters, mean_off_diagonal

from .methods import MERGES, Method, build_trainable, load_expert, merge_experts, parse_method, trainable_count
from .scorer import accuracy, batch_loss


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
    calibration_batches: int = 8
    max_eval: int | None = None
    merge_sizes: list[int] = field(default_factory=lambda: [2, 4, 8])


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


def train_expert(base, tokenizer, method: Method, task, lr: float, settings: RunSettings) -> nn.Module:
    """Train one expert for ``settings.steps`` AdamW steps at ``lr``."""
    torch.manual_seed(settings.seed)
    model = build_trainable(base, method, settings.rank, settings.seed)
    batches = list(_batches(task.train, settings.batch_size, settings.steps, settings.seed))
    if method.kind == "sparse" and method.mask_init in ("snip", "gradient", "warmup"):
        calibrate_masks(
            model,
            batches[: settings.calibration_batches],
            loss_fn=lambda m, b: batch_loss(m, tokenizer, b),
            progress=False,
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for batch in tqdm(batches, desc=f"{method.name} on {task.name} lr={lr:g}", leave=False):
        loss = batch_loss(model, tokenizer, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return model


class ExpertCache:
    """Trained experts on disk, keyed by model, method, task, lr, steps and seed."""

    def __init__(self, cache_dir: str | os.PathLike, model_id: str) -> None:
        self.root = Path(cache_dir) / hashlib.sha1(model_id.encode()).hexdigest()[:10]
        self.trained = 0  # experts trained (not loaded) by this process

    def path(self, method: Method, task, lr: float, settings: RunSettings) -> Path:
        key = f"lr{lr:g}-s{settings.steps}-b{settings.batch_size}-r{settings.rank}-seed{settings.seed}"
        return self.root / method.name / f"{task.name}-{task.fingerprint}" / key

    def get_or_train(self, base, tokenizer, method: Method, task, lr: float, settings: RunSettings) -> Path:
        path = self.path(method, task, lr, settings)
        if (path / "done.json").exists():
            return path
        model = train_expert(base, tokenizer, method, task, lr, settings)
        self.trained += 1
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".tmp-"))
        try:
            from .methods import save_expert

            save_expert(model, base, method, str(tmp))
            info = {"trainable_params": trainable_count(model), "lr": lr, "task": task.name, "method": method.name}
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


class Harness:
    """Runs the whole experiment and returns a JSON-ready dict."""

    def __init__(self, base, tokenizer, tasks: dict, settings: RunSettings, cache: ExpertCache) -> None:
        self.base, self.tokenizer, self.tasks, self.settings, self.cache = base, tokenizer, tasks, settings, cache
        self.base.eval()
        self.base.requires_grad_(False)

    def expert_score(self, method: Method, task, lr: float, split: str) -> float:
        """Score of a cached expert on its own task (stored next to the expert)."""
        path = self.cache.get_or_train(self.base, self.tokenizer, method, task, lr, self.settings)
        score_file = path / f"score-{split}-{self.settings.max_eval}.json"
        if score_file.exists():
            return json.loads(score_file.read_text())["accuracy"]
        model = load_expert(self.base, method, str(path))
        value = accuracy(model, self.tokenizer, _eval_split(task, split, self.settings.max_eval))
        atomic_write_text(score_file, json.dumps({"accuracy": value}))
        return value

    def search_lr(self, method: Method) -> dict:
        """Pick the learning rate with the best mean validation accuracy on the first held-in tasks.

        A grid of two or more rates whose best sits on an edge is extended one half-decade past that edge
        (once per side), so a method is not held back by where the grid happened to stop.
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
            if side == 0 or side in extended:
                break
            extended.append(side)
            evaluate(next_half_decade(best, side))
        best = max(table, key=lambda lr: (table[lr], -lr))
        grid_scores = {f"{lr:g}": table[lr] for lr in sorted(table)}
        return {"grid": grid_scores, "best_lr": best, "tasks": [t.name for t in search_tasks], "extended": extended}

    def cached_scores(self, label: str, key: list, build, eval_tasks: list[str]) -> dict[str, float]:
        """Test scores of the model ``build()`` on ``eval_tasks``, kept on disk under a digest of ``key``.

        The model is only built when some score is missing, so a resumed run re-merges nothing it has scored.
        """
        digest = hashlib.sha1(json.dumps([key, self.settings.max_eval]).encode()).hexdigest()[:16]
        path = self.cache.root / "scores" / f"{label.replace(':', '_')}-{digest}.json"
        stored = json.loads(path.read_text()) if path.exists() else {}
        entry = {t: f"{t}-{self.tasks[t].fingerprint}" for t in eval_tasks}
        missing = [t for t in eval_tasks if entry[t] not in stored]
        if missing:
            model = build()
            for t in tqdm(missing, desc=f"evaluating {label}", leave=False):
                examples = _eval_split(self.tasks[t], "test", self.settings.max_eval)
                stored[entry[t]] = accuracy(model, self.tokenizer, examples)
            del model
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(stored, indent=1, sort_keys=True))
        return {t: stored[entry[t]] for t in eval_tasks}

    def merged_scores(self, method: Method, dirs: list[str], combination: str, eval_tasks: list[str]) -> dict:
        key = [method.name, combination, [os.path.relpath(d, self.cache.root) for d in dirs]]
        return self.cached_scores(
            f"{method.name}:{combination}:n{len(dirs)}",
            key,
            lambda: merge_experts(self.base, method, dirs, combination),
            eval_tasks,
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
            "test_items": {t: len(_eval_split(self.tasks[t], "test", s.max_eval)) for t in all_tasks},
        }
        results["individual"]["base"] = self.cached_scores("base", ["base"], lambda: self.base, all_tasks)
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
            if method.kind == "sparse":
                results["mask_overlap"][method.name] = mask_overlap(dirs)
            for combination in MERGES.get(method.kind, ()):
                results["merged"][f"{method.name}:{combination}"] = self.merged_scores(
                    method, dirs, combination, all_tasks
                )
            combination = MERGES.get(method.kind, (None,))[0]
            if combination is not None:
                curve = {}
                for n in sorted({k for k in s.merge_sizes if k < len(s.held_in)} | {len(s.held_in)}):
                    merged = self.merged_scores(method, dirs[:n], combination, s.held_in[:n])
                    curve[n] = sum(merged.values()) / n
                results["merge_curve"][f"{method.name}:{combination}"] = curve
        results["experts_trained"] = self.cache.trained
        return results
