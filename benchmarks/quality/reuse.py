"""Reusing a method's held-in experts without merging them all (issue 10 item 4; ``run.py --reuse``).

Per method with experts that can be routed (``sparse-*`` and ``lora``), on the same experts, tasks and seed as the
merges:

- **Arrow** (zero-shot per-token routing), ``top_k`` in :data:`ARROW_TOP_K` capped at the number of experts,
  with and without **GenKnowSub**: peft-sparse's ``create_arrow_model`` over sparse experts
  (``<method>:arrow[-gks]-k<k>``), PEFT's own ``peft.create_arrow_model`` over the LoRA experts
  (``lora:peft-arrow[-gks]-k<k>``).
- **MBC** (sparse only): ``cluster_experts`` groups the held-in experts into ``c`` clusters (:func:`mbc_sizes`)
  and merges each cluster with ``sparse_average``. Scored two ways: each held-in task by its own cluster's expert
  (``<method>:mbc<c>-own``, to compare with the per-task experts) and Arrow over the ``c`` cluster experts on all
  tasks (``<method>:mbc<c>-arrow-k<k>``). The same again with one expert *trained* per cluster on the pooled
  training data of its tasks (``<method>:mbc<c>-pooled-own`` / ``-pooled-arrow-k<k>``; same steps, batch, rate and
  seed as a task expert, so each task gets a 1/|cluster| share of the steps; ``--no-pooled`` skips these).

GenKnowSub's "general" experts: the research trains them on general text; this benchmark has no general task, so
the general set is **the held-in experts themselves** (GenKnowSub then subtracts their mean, the knowledge they
share, from each). The same choice is used for the sparse and the LoRA Arrow (PEFT subtracts the mean of the A
and B factors separately, an approximation; peft-sparse subtracts the mean delta exactly).

Scores are cached like the merges (``Harness.cached_scores``, keyed by the expert directories and the strategy),
so a resumed run rebuilds no routed model it has scored; MBC clusterings are cached under ``<cache>/mbc/``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import peft
from torch import nn

import peft_sparse
from peft_sparse.clustering import RESULT_NAME

from .methods import Method, load_expert
from .tasks import Task

REUSE_VERSION = 1  # part of every cache key: bump when a strategy's definition changes
ARROW_TOP_K = (1, 2, 4)
MBC_TOP_K = 2
ROUTABLE = ("sparse", "lora")


def top_ks(num_experts: int) -> list[int]:
    """:data:`ARROW_TOP_K` capped at the number of experts (duplicates dropped)."""
    return sorted({min(k, num_experts) for k in ARROW_TOP_K})


def mbc_sizes(num_experts: int) -> list[int]:
    """Cluster counts tried: 2 and half the experts, each strictly between 1 and the number of experts."""
    return sorted({c for c in (2, num_experts // 2) if 2 <= c < num_experts})


@dataclass(frozen=True)
class ArrowStrategy:
    """Arrow over a method's held-in experts."""

    label: str
    top_k: int
    use_gks: bool


def arrow_strategies(method: Method, num_experts: int) -> list[ArrowStrategy]:
    """The Arrow variants evaluated for ``method`` (none for methods that cannot be routed)."""
    if method.kind not in ROUTABLE:
        return []
    name = "arrow" if method.kind == "sparse" else "peft-arrow"
    return [
        ArrowStrategy(f"{method.name}:{name}{'-gks' if gks else ''}-k{k}", k, gks)
        for gks in (False, True)
        for k in top_ks(num_experts)
    ]


def build_arrow(base: nn.Module, method: Method, dirs: list[str], top_k: int, use_gks: bool, seed: int) -> nn.Module:
    """A routed copy of ``base``: peft-sparse Arrow for sparse experts, PEFT's LoRA Arrow for LoRA experts.

    With ``use_gks`` the general experts are ``dirs`` themselves (see the module docstring).
    """
    general = list(dirs) if use_gks else None
    model = copy.deepcopy(base)
    if method.kind == "sparse":
        config = peft_sparse.ArrowConfig(top_k=top_k, use_gks=use_gks, rng_seed=seed)
        routed = peft_sparse.create_arrow_model(model, list(dirs), config, general_adapter_paths=general)
    elif method.kind == "lora":
        config = peft.ArrowConfig(top_k=top_k, use_gks=use_gks, rng_seed=seed)
        routed = peft.create_arrow_model(model, list(dirs), config, general_adapter_paths=general)
    else:
        raise ValueError(f"no Arrow routing for method {method.name}")
    routed.eval()
    return routed


def cluster_once(dirs: list[str], k: int, out_dir: Path, seed: int) -> dict:
    """MBC of ``dirs`` into ``k`` clusters merged with ``sparse_average`` (``clusters.json``; reused if on disk)."""
    summary = out_dir / RESULT_NAME
    if not summary.exists():
        peft_sparse.cluster_experts(list(dirs), k, out_dir=out_dir, seed=seed, progress=False)
    return json.loads(summary.read_text())


def pooled_task(name: str, members: list[Task]) -> Task:
    """One training task from the pooled training data of ``members`` (evaluation stays per member task)."""
    train = [example for task in members for example in task.train]
    return Task(name, False, train, [], [], description="MBC cluster: " + ", ".join(t.name for t in members))


def _digest(value) -> str:
    return hashlib.sha1(json.dumps(value).encode()).hexdigest()[:12]


def evaluate_reuse(harness, method: Method, dirs: list[str], lr: float) -> tuple[dict[str, dict], dict]:
    """Scores of every reuse strategy for ``method``'s held-in experts ``dirs`` (trained at ``lr``).

    Returns ``(scores, clusters)``: ``scores[label]`` maps task -> test accuracy (held-in and held-out tasks for
    routed models, the held-in tasks only for the ``-own`` rows); ``clusters`` records each MBC clustering.
    """
    s, cache = harness.settings, harness.cache
    all_tasks = s.held_in + s.held_out
    relative = [os.path.relpath(d, cache.root) for d in dirs]
    scores: dict[str, dict] = {}
    clusters: dict[str, dict] = {}

    def routed(label: str, expert_dirs: list[str], top_k: int, use_gks: bool, key: list) -> None:
        scores[label] = harness.cached_scores(
            label,
            ["reuse", REUSE_VERSION, method.name, *key, top_k, use_gks, s.seed],
            lambda: build_arrow(harness.base, method, expert_dirs, top_k, use_gks, s.seed),
            all_tasks,
            label,
        )

    for strategy in arrow_strategies(method, len(dirs)):
        routed(strategy.label, dirs, strategy.top_k, strategy.use_gks, ["arrow", relative])
    if method.kind != "sparse":
        return scores, clusters
    for k in mbc_sizes(len(dirs)):
        out_dir = cache.root / "mbc" / f"{method.name}-k{k}-{_digest([relative, k, s.seed, REUSE_VERSION])}"
        info = cluster_once(dirs, k, out_dir, s.seed)
        groups = [
            [s.held_in[i] for i, c in enumerate(info["labels"]) if c == cid] for cid in range(len(info["merged_dirs"]))
        ]
        clusters[f"{method.name}:mbc{k}"] = {
            "k": k,
            "clusters": groups,
            "silhouette": info["silhouette"],
            "labels": info["labels"],
        }
        merged = [str(out_dir / name) for name in info["merged_dirs"]]
        variants = [("", merged)]
        if s.reuse_pooled:
            pooled = []
            for cid, members in enumerate(groups):
                task = pooled_task(f"mbc{k}-c{cid}-" + "+".join(members), [harness.tasks[t] for t in members])
                pooled.append(str(harness.cache.get_or_train(harness.base, harness.scorer, method, task, lr, s)))
            variants.append(("-pooled", pooled))
        top_k = min(MBC_TOP_K, len(merged))
        for variant, expert_dirs in variants:
            relative_experts = [os.path.relpath(d, cache.root) for d in expert_dirs]
            own: dict[str, float] = {}
            for cid, members in enumerate(groups):
                label = f"{method.name}:mbc{k}{variant}-own-c{cid}"
                own.update(
                    harness.cached_scores(
                        label,
                        ["reuse", REUSE_VERSION, method.name, "own", relative_experts[cid]],
                        lambda d=expert_dirs[cid]: load_expert(harness.base, method, d),
                        members,
                        label,
                    )
                )
            scores[f"{method.name}:mbc{k}{variant}-own"] = {t: own[t] for t in s.held_in}
            label = f"{method.name}:mbc{k}{variant}-arrow-k{top_k}"
            routed(label, expert_dirs, top_k, False, ["mbc-arrow", relative_experts])
    return scores, clusters


__all__ = [
    "ARROW_TOP_K",
    "ArrowStrategy",
    "arrow_strategies",
    "build_arrow",
    "cluster_once",
    "evaluate_reuse",
    "mbc_sizes",
    "pooled_task",
    "top_ks",
]
