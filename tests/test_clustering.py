"""MBC clustering: sparse similarities against dense references, planted groups, per-cluster merges, caching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_cli import write_adapter

import peft_sparse.clustering as clustering_module
from peft_sparse import ExpertLibrary, cluster_experts
from peft_sparse.adapter_files import AdapterFormatError, SparseAdapterFile
from peft_sparse.clustering import expert_similarity
from peft_sparse.merging import merge_adapters_from_disk

PREFIX = "base_model.model."
SHAPES = {"layers.0.q": [16, 16], "layers.0.v": [16, 12]}


def write_entries(path: Path, layers: dict[str, tuple[torch.Tensor, torch.Tensor]], shapes=SHAPES, block=None):
    """A saved adapter with the given (sorted indices, values) per layer."""
    tensors, pattern = {}, {}
    for name, (idx, val) in layers.items():
        tensors[f"{PREFIX}{name}.sparse_adapter_indices"] = idx.to(torch.int32)
        tensors[f"{PREFIX}{name}.sparse_adapter_values"] = val.reshape(-1).float()
        pattern[name] = idx.numel()
    config = {
        "peft_type": "SPARSE_ADAPTER",
        "block_size": block,
        "entries_pattern": pattern,
        "weight_shapes": shapes,
        "target_modules": ["q", "v"],
        "base_model_name_or_path": "fake/model",
    }
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def dense_flat_delta(path: Path) -> torch.Tensor:
    """All layers' ΔW, written entry by entry (fp64, sorted layer order), concatenated into one vector."""
    config = json.loads((path / "adapter_config.json").read_text())
    tensors = load_file(str(path / "adapter_model.safetensors"))
    block = config["block_size"]
    parts = []
    for name in sorted(config["entries_pattern"]):
        rows, cols = config["weight_shapes"][name]
        delta = torch.zeros(rows, cols, dtype=torch.float64)
        idx = tensors[f"{PREFIX}{name}.sparse_adapter_indices"].tolist()
        val = tensors[f"{PREFIX}{name}.sparse_adapter_values"].double()
        if block is None:
            for i, v in zip(idx, val.tolist(), strict=True):
                delta[i // cols, i % cols] = v
        else:
            grid_cols = math.ceil(cols / block)
            val = val.view(len(idx), block, block)
            for k, b in enumerate(idx):
                r0, c0 = (b // grid_cols) * block, (b % grid_cols) * block
                h, w = min(block, rows - r0), min(block, cols - c0)
                delta[r0 : r0 + h, c0 : c0 + w] = val[k, :h, :w]
        parts.append(delta.flatten())
    return torch.cat(parts)


def dense_cosine(vectors: list[torch.Tensor]) -> torch.Tensor:
    stacked = torch.stack(vectors)
    normed = stacked / stacked.norm(dim=1, keepdim=True)
    return normed @ normed.T


def keep_top(vector: torch.Tensor, fraction: float) -> torch.Tensor:
    """Zero all but the top ``ceil(fraction * stored)`` |entries| of a dense delta (stored = non-zero here)."""
    stored = vector[vector != 0].abs()
    keep = max(1, math.ceil(fraction * stored.numel()))
    threshold = torch.sort(stored, descending=True).values[keep - 1]
    return torch.where(vector.abs() >= threshold, vector, torch.zeros_like(vector))


def planted(tmp_path: Path, groups: int = 3, per_group: int = 4, seed: int = 0) -> tuple[list[Path], list[int]]:
    """Experts as noise around ``groups`` centres; members store most of their centre's entries plus a few own."""
    gen = torch.Generator().manual_seed(seed)
    centres = []
    for _ in range(groups):
        centre = {}
        for name, (rows, cols) in SHAPES.items():
            idx = torch.randperm(rows * cols, generator=gen)[:60]
            centre[name] = (idx, torch.randn(60, generator=gen))
        centres.append(centre)
    dirs, truth = [], []
    for member in range(groups * per_group):
        group = member % groups
        layers = {}
        for name, (rows, cols) in SHAPES.items():
            idx, val = centres[group][name]
            keep = torch.randperm(60, generator=gen)[:48]
            extra = torch.randperm(rows * cols, generator=gen)[:8]
            positions = torch.cat([idx[keep], extra])
            values = torch.cat([val[keep] + 0.2 * torch.randn(48, generator=gen), 0.2 * torch.randn(8, generator=gen)])
            unique, inverse = torch.unique(positions, return_inverse=True)
            merged = torch.zeros(unique.numel()).index_add_(0, inverse, values)
            layers[name] = (unique, merged)
        dirs.append(write_entries(tmp_path / f"expert{member:02d}", layers))
        truth.append(group)
    return dirs, truth


def same_partition(a: list[int], b: list[int]) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


# --- similarity ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsify_top", [None, 0.3])
def test_similarity_matches_dense_reference(tmp_path, sparsify_top):
    shapes = {"a": [7, 10], "b": [10, 7]}
    dirs = [write_adapter(tmp_path / f"u{i}", seed=i, shapes=shapes, rows=25) for i in range(3)]
    dirs += [write_adapter(tmp_path / f"b{i}", seed=10 + i, block=3, shapes=shapes, rows=5) for i in range(2)]
    dirs.append(write_adapter(tmp_path / "b4", seed=20, block=4, shapes=shapes, rows=3))  # ragged edge blocks
    vectors = [dense_flat_delta(d) for d in dirs]
    if sparsify_top is not None:
        vectors = [keep_top(v, sparsify_top) for v in vectors]
    expected = dense_cosine(vectors)
    adapters = [SparseAdapterFile(d) for d in dirs]
    try:
        got = expert_similarity(adapters, sparsify_top=sparsify_top, progress=False)
    finally:
        for adapter in adapters:
            adapter.close()
    torch.testing.assert_close(got["similarity"], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got["gram"], torch.stack(vectors) @ torch.stack(vectors).T, rtol=1e-9, atol=1e-9)
    assert bool((expected.abs() > 0.01).sum() > len(dirs))  # masks overlap: the test sees real products
    result = cluster_experts(dirs, 2, sparsify_top=sparsify_top, progress=False)
    torch.testing.assert_close(result.similarity, expected, rtol=1e-9, atol=1e-9)


def test_recovers_planted_groups(tmp_path):
    dirs, truth = planted(tmp_path)
    result = cluster_experts(dirs, 3, progress=False)
    assert len(result.labels) == len(dirs) and set(result.labels) == {0, 1, 2}
    assert same_partition(result.labels, truth)
    assert result.labels[0] == 0  # ids numbered by first appearance
    assert result.silhouette is not None and result.silhouette > 0.5
    assert result.names == [d.name for d in dirs]
    assert result.clusters == [[result.names[i] for i in range(len(dirs)) if result.labels[i] == c] for c in range(3)]
    # a wrong k still gives a valid, lower-quality assignment
    worse = cluster_experts(dirs, 5, progress=False)
    assert worse.silhouette is None or worse.silhouette < result.silhouette


def test_k_bounds_and_silhouette_definition(tmp_path):
    dirs, _ = planted(tmp_path, groups=2, per_group=2)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"1 <= k <= 4"):
            cluster_experts(dirs, bad, progress=False)
    one = cluster_experts(dirs, 1, progress=False)
    assert one.labels == [0, 0, 0, 0] and one.silhouette is None
    each = cluster_experts(dirs, 4, progress=False)
    assert sorted(each.labels) == [0, 1, 2, 3] and each.silhouette is None
    with pytest.raises(ValueError, match="sparsify_top"):
        cluster_experts(dirs, 2, sparsify_top=0.0, progress=False)
    with pytest.raises(ValueError, match="no experts"):
        cluster_experts([], 1, progress=False)
    with pytest.raises(TypeError, match="unexpected merge options"):
        cluster_experts(dirs, 2, weights=[1, 2], progress=False)
    with pytest.raises(ValueError, match="needs density"):
        cluster_experts(dirs, 2, combination_type="ties", out_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_incompatible_experts_refused(tmp_path):
    a = write_adapter(tmp_path / "a", seed=0)
    b = write_adapter(tmp_path / "b", seed=1, shapes={"encoder.layer.0.attention.self.query": [8, 12]})
    with pytest.raises(AdapterFormatError, match="target layers differ"):
        cluster_experts([a, b], 1, progress=False)
    shapes = {"a": [7, 10]}
    u = write_adapter(tmp_path / "u", seed=0, shapes=shapes)
    blk = write_adapter(tmp_path / "blk", seed=1, shapes=shapes, block=2, rows=4)
    assert cluster_experts([u, blk], 1, progress=False).labels == [0, 0]  # similarity works across block sizes
    with pytest.raises(AdapterFormatError, match="block_size differs"):
        cluster_experts([u, blk], 1, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# --- merged cluster experts ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("combination_type", "options"), [("sparse_average", {}), ("ties", {"density": 0.5, "drop_zeros": True})]
)
def test_merged_cluster_experts_equal_merging_their_members(tmp_path, combination_type, options):
    dirs, truth = planted(tmp_path / "in", groups=2, per_group=3)
    out = tmp_path / "clusters"
    plot = tmp_path / "sim.png"
    result = cluster_experts(
        dirs, 2, combination_type=combination_type, out_dir=out, plot=plot, progress=False, seed=3, **options
    )
    assert same_partition(result.labels, truth)
    assert result.merged_dirs == [out / "cluster_0", out / "cluster_1"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and result.plot == plot
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["labels"] == result.labels and summary["names"] == result.names
    assert summary["merged_dirs"] == ["cluster_0", "cluster_1"] and summary["combination_type"] == combination_type
    for cluster, merged in enumerate(result.merged_dirs):
        members = [dirs[i] for i in range(len(dirs)) if result.labels[i] == cluster]
        reference = merge_adapters_from_disk(
            members, tmp_path / f"ref{cluster}", combination_type=combination_type, seed=3, progress=False, **options
        )
        got, want = load_file(merged / "adapter_model.safetensors"), load_file(reference / "adapter_model.safetensors")
        assert got.keys() == want.keys()
        for key in got:
            assert torch.equal(got[key], want[key]), key
    if combination_type == "sparse_average":  # independent check: entrywise mean over members storing an entry
        members = [dirs[i] for i in range(len(dirs)) if result.labels[i] == 0]
        dense = torch.stack([dense_flat_delta(m) for m in members])
        count = (dense != 0).sum(0).clamp_min(1)
        torch.testing.assert_close(dense_flat_delta(out / "cluster_0"), dense.sum(0) / count)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(FileExistsError, match="not empty"):
        cluster_experts(dirs, 2, out_dir=out, progress=False)
    again = cluster_experts(dirs, 3, out_dir=out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["cluster_0", "cluster_1", "cluster_2", "clusters.json"]
    assert again.num_clusters == 3


def test_failed_cluster_merge_writes_nothing(tmp_path, monkeypatch):
    dirs, _ = planted(tmp_path / "in", groups=2, per_group=2)
    calls = []
    real = clustering_module.merging.merge_adapters_from_disk

    def fail_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(clustering_module.merging, "merge_adapters_from_disk", fail_second)
    with pytest.raises(RuntimeError, match="simulated"):
        cluster_experts(dirs, 2, out_dir=tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# --- with a library -----------------------------------------------------------------------------------------------
def test_library_input_caches_similarity_and_adds_cluster_experts(tmp_path, monkeypatch):
    dirs, truth = planted(tmp_path / "in", groups=2, per_group=3)
    library = ExpertLibrary(tmp_path / "lib", create=True)
    for d in dirs:
        library.add(d, d.name)
    calls = []
    real = clustering_module.expert_similarity

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(clustering_module, "expert_similarity", counting)
    first = cluster_experts(library, 2, progress=False)
    second = cluster_experts(library, 2, progress=False, seed=1)
    assert len(calls) == 1 and torch.equal(first.similarity, second.similarity)
    assert same_partition(first.labels, truth) and first.names == library.names()
    cluster_experts(library, 2, sparsify_top=0.5, progress=False)
    assert len(calls) == 2  # other parameters: another cache entry
    subset = cluster_experts(library, 1, names=library.names()[:2], progress=False)
    assert subset.names == library.names()[:2] and len(calls) == 3

    library.add(
        write_entries(tmp_path / "changed", {n: (torch.arange(5), torch.ones(5)) for n in SHAPES}),
        dirs[0].name,
        overwrite=True,
    )
    cluster_experts(library, 2, progress=False)
    assert len(calls) == 4  # replacing an expert invalidated the cached matrix

    result = cluster_experts(library, 2, add_to=library, cluster_prefix="mbc-", progress=False)
    assert library.names()[-2:] == ["mbc-0", "mbc-1"] and result.merged_dirs is None
    entry = library.entry("mbc-0")
    assert entry["metrics"]["mbc_members"] == result.clusters[0]
    with pytest.raises(ValueError, match="already has"):
        cluster_experts(library, 2, names=[d.name for d in dirs], add_to=library, cluster_prefix="mbc-", progress=False)


def test_all_zero_expert_is_named_and_dissimilar(tmp_path):
    dirs, _ = planted(tmp_path, groups=2, per_group=2)
    zero = write_entries(tmp_path / "zero", {n: (torch.arange(4), torch.zeros(4)) for n in SHAPES})
    with pytest.warns(UserWarning, match=r"all-zero delta.*\['zero'\]"):
        result = cluster_experts([*dirs, zero], 2, progress=False)
    assert result.similarity[4].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_missing_scikit_learn_is_reported_before_any_work(tmp_path, monkeypatch):
    import builtins

    dirs, _ = planted(tmp_path / "in", groups=2, per_group=1)
    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    monkeypatch.setattr(clustering_module, "expert_similarity", lambda *a, **k: pytest.fail("computed"))
    with pytest.raises(ImportError, match=r"pip install 'peft-sparse\[cluster\]'"):
        cluster_experts(dirs, 1, out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
