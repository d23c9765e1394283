"""MBC (model-based clustering) of sparse experts: group experts by the similarity of their deltas, keep one
merged expert per group.

Following Ostapenko et al. (2024), "Towards Modular LLMs by Building and Reusing a Library of LoRAs": cosine
similarity between the experts' flattened parameter deltas (here: sparse dot products over the union of stored
entries, layer by layer), optional magnitude sparsification, k-means on the rows of the similarity matrix, and
one expert per cluster merged from its members (any ``combination_type`` of :mod:`peft_sparse.merging`).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import adapter_files, merging
from .adapter_files import SparseAdapterFile
from .files import atomic_write_bytes
from .library import ExpertLibrary, check_expert_name
from .similarity import cosine_from_gram, entry_positions, sparse_gram, top_fraction_threshold

RESULT_NAME = "clusters.json"
SIMILARITY_VERSION = 1  # bump when the similarity definition changes (invalidates library caches)
MERGE_OPTIONS = ("density", "majority_sign_method", "drop_zeros")


@dataclass
class ClusterResult:
    """Outcome of :func:`cluster_experts`.

    ``labels[i]`` is the cluster id of ``names[i]`` (ids ``0..num_clusters-1`` numbered by first appearance);
    ``similarity`` is the ``n x n`` cosine similarity (float64); ``silhouette`` is scikit-learn's silhouette
    score on the similarity rows, None when undefined (fewer than 2 or more than ``n - 1`` clusters).
    """

    names: list[str]
    labels: list[int]
    similarity: torch.Tensor
    silhouette: float | None
    k: int
    clusters: list[list[str]] = field(default_factory=list)
    merged_dirs: list[Path] | None = None
    plot: Path | None = None

    @property
    def num_clusters(self) -> int:
        """Non-empty clusters (k-means can return fewer than ``k`` when experts coincide)."""
        return len(self.clusters)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (what ``clusters.json`` holds)."""
        return {
            "names": self.names,
            "labels": self.labels,
            "k": self.k,
            "num_clusters": self.num_clusters,
            "clusters": self.clusters,
            "silhouette": self.silhouette,
            "similarity": self.similarity.tolist(),
            "merged_dirs": None if self.merged_dirs is None else [p.name for p in self.merged_dirs],
        }


def _resolve_experts(
    experts: ExpertLibrary | Sequence[str | os.PathLike], names: Sequence[str] | None
) -> tuple[list[str], list[Path], ExpertLibrary | None]:
    if isinstance(experts, ExpertLibrary):
        selected = experts._select(names)
        return selected, [experts.adapter_dir(n) for n in selected], experts
    if isinstance(experts, str | os.PathLike):
        raise TypeError("experts must be a list of adapter directories or an ExpertLibrary, not one path")
    if names is not None:
        raise ValueError("names selects experts of an ExpertLibrary; with directories pass only those you want")
    dirs = [Path(d) for d in experts]
    labels = [d.name or str(d) for d in dirs]
    if len(set(labels)) != len(labels):
        labels = [str(d) for d in dirs]
    return labels, dirs, None


def _layer_entries(adapter: SparseAdapterFile, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    indices, values = adapter.read_layer(layer)
    return entry_positions(indices, values, adapter.shape(layer), adapter.block_size)


def expert_similarity(
    adapters: Sequence[SparseAdapterFile], sparsify_top: float | None = None, progress: bool = True
) -> dict[str, torch.Tensor]:
    """``{"similarity": n x n cosine, "gram": n x n dot products}`` (float64) of opened experts, layer by layer.

    With ``sparsify_top`` only each expert's top fraction of stored entries by |delta| (over all its layers;
    ties at the threshold are kept) enter the products, as in MBC's sparsified similarity.
    """
    from tqdm.auto import tqdm

    adapter_files.check_same_targets(adapters)
    layers = adapters[0].layer_names
    thresholds = [0.0] * len(adapters)
    if sparsify_top is not None:
        for i, adapter in enumerate(tqdm(adapters, desc="sparsify thresholds", unit="expert", disable=not progress)):
            magnitudes = torch.cat([_layer_entries(adapter, layer)[1].abs().reshape(-1) for layer in layers])
            thresholds[i] = top_fraction_threshold(magnitudes, sparsify_top)
    gram = torch.zeros(len(adapters), len(adapters), dtype=torch.float64)
    for layer in tqdm(layers, desc="similarity", unit="layer", disable=not progress):
        positions, values = [], []
        for adapter, threshold in zip(adapters, thresholds, strict=True):
            pos, val = _layer_entries(adapter, layer)
            if sparsify_top is not None:
                keep = val.abs() >= threshold
                pos, val = pos[keep], val[keep]
            positions.append(pos)
            values.append(val)
        gram += sparse_gram(positions, values)
    return {"similarity": cosine_from_gram(gram), "gram": gram}


def _require_sklearn() -> None:
    try:
        import sklearn  # noqa: F401
    except ImportError as error:
        raise ImportError("clustering needs scikit-learn: pip install 'peft-sparse[cluster]'") from error


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError("the similarity plot needs matplotlib: pip install 'peft-sparse[cluster]'") from error


def _kmeans_labels(similarity: torch.Tensor, k: int, seed: int) -> list[int]:
    """k-means (scikit-learn, ``n_init=10``) on the similarity rows, relabelled by first appearance."""
    from sklearn.cluster import KMeans

    rows = similarity.numpy()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Number of distinct clusters")  # reported via num_clusters
        raw = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(rows).labels_.tolist()
    order: dict[int, int] = {}
    for label in raw:
        order.setdefault(label, len(order))
    return [order[label] for label in raw]


def _silhouette(similarity: torch.Tensor, labels: list[int]) -> float | None:
    from sklearn.metrics import silhouette_score

    clusters = len(set(labels))
    if not 2 <= clusters <= len(labels) - 1:
        return None
    return float(silhouette_score(similarity.numpy(), labels))


def render_similarity_png(result: ClusterResult) -> bytes:
    """PNG bytes of the similarity matrix with experts ordered by cluster (matplotlib Agg, no pyplot state)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(result.names)
    order = sorted(range(n), key=lambda i: (result.labels[i], i))
    matrix = result.similarity[order][:, order].numpy()
    size = min(4 + 0.35 * n, 20)
    fig = Figure(figsize=(size + 1.5, size), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots()
    # colours span the off-diagonal range (trained experts are often only ~0.1 similar); the diagonal saturates
    off_diagonal = abs(matrix[~torch.eye(n, dtype=torch.bool).numpy()]) if n > 1 else abs(matrix).ravel()
    limit = float(off_diagonal.max()) if off_diagonal.size and off_diagonal.max() > 0 else 1.0
    image = axes.imshow(matrix, vmin=-limit, vmax=limit, cmap="RdBu_r")
    labels = [f"{result.names[i]} [{result.labels[i]}]" for i in order]
    if n <= 60:
        axes.set_xticks(range(n), labels, rotation=90, fontsize=7)
        axes.set_yticks(range(n), labels, fontsize=7)
    boundaries = [i for i in range(1, n) if result.labels[order[i]] != result.labels[order[i - 1]]]
    for b in boundaries:
        axes.axhline(b - 0.5, color="black", linewidth=1)
        axes.axvline(b - 0.5, color="black", linewidth=1)
    silhouette = "n/a" if result.silhouette is None else f"{result.silhouette:.3f}"
    axes.set_title(f"expert cosine similarity, {result.num_clusters} clusters (silhouette {silhouette})")
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity (scale: largest off-diagonal |value|)")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def cluster_experts(
    experts: ExpertLibrary | Sequence[str | os.PathLike],
    k: int,
    *,
    names: Sequence[str] | None = None,
    sparsify_top: float | None = None,
    combination_type: str = "sparse_average",
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    add_to: ExpertLibrary | None = None,
    cluster_prefix: str = "cluster_",
    seed: int = 0,
    plot: str | os.PathLike | None = None,
    progress: bool = True,
    **merge_kwargs: Any,
) -> ClusterResult:
    """Cluster experts by the cosine similarity of their sparse deltas (MBC) and merge each cluster.

    Args:
        experts: saved adapter directories, or an :class:`ExpertLibrary` (``names`` picks a subset; the
            similarity matrix is then cached in the library, keyed by the experts' content digests).
        k: number of k-means clusters, ``1 <= k <= len(experts)``.
        sparsify_top: keep only each expert's top fraction of |delta| (in ``(0, 1]``) for the similarity.
        combination_type, merge_kwargs: how a cluster's members are merged (:func:`merging.merge_adapters_from_disk`;
            ``density``, ``majority_sign_method``, ``drop_zeros``); ``seed`` also seeds dare's drops.
        out_dir: write one merged adapter per cluster (``<cluster_prefix><id>/``) plus ``clusters.json``;
            the directory appears atomically and must be absent or empty unless ``overwrite``.
        add_to: also add the merged cluster experts to this library as ``<cluster_prefix><id>``
            (``overwrite`` replaces existing ones).
        seed: k-means ``random_state`` (``n_init=10``).
        plot: write a PNG of the similarity matrix ordered by cluster.
    """
    labels_in, dirs, library = _resolve_experts(experts, names)
    n = len(dirs)
    if n == 0:
        raise ValueError("no experts to cluster")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer with 1 <= k <= {n} (the number of experts), got {k!r}")
    if sparsify_top is not None and (
        isinstance(sparsify_top, bool) or not isinstance(sparsify_top, int | float) or not 0.0 < sparsify_top <= 1.0
    ):
        raise ValueError(f"sparsify_top must be None or in (0, 1], got {sparsify_top!r}")
    unknown = sorted(set(merge_kwargs) - set(MERGE_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected merge options {unknown}; cluster_experts passes on {list(MERGE_OPTIONS)}")
    merging.check_merge_options(
        1, None, combination_type, merge_kwargs.get("density"), merge_kwargs.get("majority_sign_method", "total")
    )
    merge = out_dir is not None or add_to is not None
    if out_dir is not None:
        adapter_files.check_output_dir(out_dir, overwrite)
    if plot is not None and not Path(plot).parent.is_dir():
        raise FileNotFoundError(f"directory {Path(plot).parent} for {plot} does not exist")
    if add_to is not None and not overwrite:
        taken = [f"{cluster_prefix}{c}" for c in range(k) if f"{cluster_prefix}{c}" in add_to]
        if taken:
            raise ValueError(f"library {add_to.root} already has {taken}; pass overwrite=True to replace them")
    if add_to is not None:
        check_expert_name(f"{cluster_prefix}0")
    _require_sklearn()
    if plot is not None:
        _require_matplotlib()
    if library is not None:
        library.verify(labels_in)

    with ExitStack() as stack:
        adapters = [stack.enter_context(SparseAdapterFile(d)) for d in dirs]
        adapter_files.check_same_targets(adapters)
        if merge:
            adapter_files.check_compatible(adapters)

        def compute() -> dict[str, torch.Tensor]:
            return expert_similarity(adapters, sparsify_top, progress)

        if library is not None:
            params = {"sparsify_top": sparsify_top, "version": SIMILARITY_VERSION}
            data = library.cached("mbc_similarity", labels_in, params, compute)
        else:
            data = compute()
    similarity = data["similarity"]
    zero = [labels_in[i] for i in range(n) if float(data["gram"][i, i]) == 0.0]
    if zero:
        warnings.warn(f"experts with an all-zero delta (similarity 0 to all others): {zero}", stacklevel=2)
    labels = _kmeans_labels(similarity, k, seed)
    clusters = [[labels_in[i] for i in range(n) if labels[i] == c] for c in range(max(labels) + 1)]
    if len(clusters) < k:
        warnings.warn(f"k-means found only {len(clusters)} distinct clusters for k={k}", stacklevel=2)
    result = ClusterResult(labels_in, labels, similarity, _silhouette(similarity, labels), k, clusters)
    png = render_similarity_png(result) if plot is not None else None
    if merge:
        result.merged_dirs = _merge_clusters(
            result, dirs, combination_type, out_dir, overwrite, cluster_prefix, seed, progress, merge_kwargs, add_to
        )
    if png is not None:
        atomic_write_bytes(plot, png)
        result.plot = Path(plot)
    return result


def _merge_clusters(
    result: ClusterResult,
    dirs: Sequence[Path],
    combination_type: str,
    out_dir: str | os.PathLike | None,
    overwrite: bool,
    prefix: str,
    seed: int,
    progress: bool,
    merge_kwargs: dict[str, Any],
    add_to: ExpertLibrary | None,
) -> list[Path] | None:
    """Merge each cluster into ``<staging>/<prefix><id>``, then move the whole set into ``out_dir`` at once."""
    parent = Path(out_dir).parent if out_dir is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=".clusters-", suffix=".tmp"))
    try:
        merged = []
        for cluster in range(result.num_clusters):
            members = [dirs[i] for i in range(len(dirs)) if result.labels[i] == cluster]
            merged.append(
                merging.merge_adapters_from_disk(
                    members,
                    staging / f"{prefix}{cluster}",
                    combination_type=combination_type,
                    seed=seed,
                    progress=progress,
                    **merge_kwargs,
                )
            )
        summary = result.to_dict() | {"merged_dirs": [p.name for p in merged], "combination_type": combination_type}
        (staging / RESULT_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if add_to is not None:
            for cluster, path in enumerate(merged):
                add_to.add(
                    path,
                    f"{prefix}{cluster}",
                    task=f"MBC cluster {cluster} of {result.k}",
                    metrics={"mbc_members": result.clusters[cluster], "combination_type": combination_type},
                    overwrite=overwrite,
                )
        if out_dir is None:
            return None
        out = Path(out_dir)
        adapter_files.check_output_dir(out, overwrite)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / "old")
            os.replace(staging, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, out)
        return [out / p.name for p in merged]
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def similarity_summary(result: ClusterResult) -> str:
    """A short text report: cluster members, silhouette, mean within/between-cluster similarity."""
    lines = [f"{len(result.names)} experts, k={result.k}, {result.num_clusters} clusters"]
    lines.append(
        "silhouette: "
        + ("n/a (needs 2 <= clusters <= n-1)" if result.silhouette is None else f"{result.silhouette:.4f}")
    )
    for c, members in enumerate(result.clusters):
        lines.append(f"  cluster {c}: {', '.join(members)}")
    within, between = [], []
    n = len(result.names)
    for i in range(n):
        for j in range(i + 1, n):
            (within if result.labels[i] == result.labels[j] else between).append(float(result.similarity[i, j]))
    for label, values in (("within clusters", within), ("between clusters", between)):
        mean = "n/a" if not values else f"{sum(values) / len(values):.4f}"
        lines.append(f"mean similarity {label}: {mean}")
    return "\n".join(lines)


__all__ = [
    "ClusterResult",
    "cluster_experts",
    "expert_similarity",
    "render_similarity_png",
    "similarity_summary",
]
