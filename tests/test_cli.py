"""The peft-sparse CLI on fake adapter directories written directly with safetensors + JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peft_sparse.adapter_files import check_output_dir, write_adapter_dir
from peft_sparse.cli import main
from peft_sparse.inspection import inspect_adapters
from peft_sparse.merging import merge_adapters_from_disk, merge_layer

SHAPES = {"encoder.layer.0.attention.self.query": [8, 12], "encoder.layer.1.output.dense": [12, 8]}
PREFIX = "base_model.model."


def grid(shape: list[int], block: int | None) -> int:
    return shape[0] * shape[1] if block is None else math.ceil(shape[0] / block) * math.ceil(shape[1] / block)


def write_adapter(
    path: Path, seed: int, block: int | None = None, shapes: dict | None = None, rows: int = 10, **extra
) -> Path:
    """A fake saved sparse adapter in the on-disk format of the core tuner."""
    shapes = shapes or SHAPES
    gen = torch.Generator().manual_seed(seed)
    width = 1 if block is None else block * block
    tensors, pattern = {}, {}
    for name, shape in shapes.items():
        n = min(rows, grid(shape, block))
        idx = torch.sort(torch.randperm(grid(shape, block), generator=gen)[:n]).values.to(torch.int32)
        tensors[f"{PREFIX}{name}.sparse_adapter_indices"] = idx
        tensors[f"{PREFIX}{name}.sparse_adapter_values"] = torch.randn(n * width, generator=gen)
        pattern[name] = n
    tensors.update(extra.pop("tensors", {}))
    config = {
        "peft_type": "SPARSE_ADAPTER",
        "block_size": block,
        "entries_pattern": pattern,
        "weight_shapes": shapes,
        "target_modules": ["query", "dense"],
        "keep_ratio": 0.1,
        "base_model_name_or_path": "fake/model",
        "task_type": None,
    }
    config.update(extra)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def read_layer(path: Path, name: str, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    tensors = load_file(str(path / "adapter_model.safetensors"))
    idx = tensors[f"{PREFIX}{name}.sparse_adapter_indices"]
    return idx, tensors[f"{PREFIX}{name}.sparse_adapter_values"].reshape(idx.numel(), width)


@pytest.fixture
def adapters(tmp_path: Path) -> list[Path]:
    return [write_adapter(tmp_path / f"a{i}", seed=i) for i in range(3)]


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize(
    ("method", "extra", "block"),
    [
        ("sparse_average", [], None),
        ("linear", ["--weights", "0.5", "1.0", "-0.25"], None),
        ("ties", ["--density", "0.5", "--majority-sign-method", "frequency"], None),
        ("dare_ties", ["--density", "0.6", "--seed", "5"], None),
        ("task_arithmetic", ["--drop-zeros"], 2),
        ("dare_linear", ["--density", "0.5", "--seed", "1"], 3),
    ],
)
def test_merge_matches_merge_layer(tmp_path, method, extra, block):
    shapes = {"q": [7, 10], "v": [10, 7]} if block else SHAPES
    dirs = [write_adapter(tmp_path / f"a{i}", seed=i, block=block, shapes=shapes, rows=6) for i in range(3)]
    out = tmp_path / "merged"
    rc = main(["merge", *map(str, dirs), "--out", str(out), "--method", method, "--no-progress", *extra])
    assert rc == 0
    config = json.loads((out / "adapter_config.json").read_text())
    source = json.loads((dirs[0] / "adapter_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "entries_pattern"} == {
        k: v for k, v in source.items() if k != "entries_pattern"
    }
    weights = [float(w) for w in extra[1:4]] if extra[:1] == ["--weights"] else None
    density = float(extra[extra.index("--density") + 1]) if "--density" in extra else None
    sign = extra[extra.index("--majority-sign-method") + 1] if "--majority-sign-method" in extra else "total"
    seed = int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 0
    gen = torch.Generator().manual_seed(seed)
    width = 1 if block is None else block * block
    for name in sorted(shapes):  # layers are merged in sorted order with one generator
        parts = [read_layer(d, name, width) for d in dirs]
        union, merged = merge_layer(
            [p[0] for p in parts],
            [p[1] for p in parts],
            weights,
            method,
            density=density,
            majority_sign_method=sign,
            drop_zeros="--drop-zeros" in extra,
            generator=gen,
        )
        got_idx, got_val = read_layer(out, name, width)
        assert got_idx.dtype == torch.int32
        assert got_idx.tolist() == union.tolist()
        torch.testing.assert_close(got_val, merged)
        assert config["entries_pattern"][name] == union.numel()
    readme = (out / "README.md").read_text()
    assert "pip install peft-sparse" in readme and "import peft_sparse" in readme
    assert "PeftModel.from_pretrained" in readme
    assert leftovers(tmp_path) == []


def test_merge_refuses_existing_then_overwrites(adapters, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["merge", *map(str, adapters), "--out", str(out), "--no-progress"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["merge", *map(str, adapters), "--out", str(out), "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert leftovers(tmp_path) == []


def test_cancelling_merge_writes_empty_layers(adapters, tmp_path):
    out = tmp_path / "nothing"
    twice = [adapters[0], adapters[0]]
    merge_adapters_from_disk(twice, out, "linear", weights=[1.0, -1.0], drop_zeros=True, progress=False)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["entries_pattern"] == {name: 0 for name in SHAPES}
    assert read_layer(out, "encoder.layer.1.output.dense", 1)[1].shape == (0, 1)
    report = inspect_adapters([out, adapters[1]])
    assert report["layers"]["encoder.layer.1.output.dense"]["jaccard"][0][1] == 0.0
    assert report["overall"]["sign_conflict"][0][1] is None


def test_merge_into_empty_existing_dir(adapters, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    merge_adapters_from_disk(adapters, out, "linear", progress=False)
    assert (out / "adapter_model.safetensors").is_file()


def _bad_config(tmp_path: Path, key: str, value) -> Path:
    path = write_adapter(tmp_path / "bad", seed=9)
    config = json.loads((path / "adapter_config.json").read_text())
    config[key] = value
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    ("make_bad", "message"),
    [
        (lambda t: write_adapter(t / "bad", seed=9, block=2), "block_size differs"),
        (
            lambda t: write_adapter(t / "bad", seed=9, shapes={**SHAPES, "extra.layer": [4, 4]}),
            "layers differ",
        ),
        (
            lambda t: write_adapter(
                t / "bad", seed=9, shapes={**SHAPES, "encoder.layer.1.output.dense": [12, 9]}
            ),
            "weight_shapes",
        ),
        (lambda t: _bad_config(t, "peft_type", "LORA"), "peft_type is 'LORA'"),
        (lambda t: t / "does-not-exist", "not found"),
        (
            lambda t: write_adapter(
                t / "bad",
                seed=9,
                tensors={f"{PREFIX}classifier.modules_to_save.default.weight": torch.ones(2)},
            ),
            "shared modules_to_save cannot be merged",
        ),
        (
            lambda t: _bad_config(t, "entries_pattern", {"encoder.layer.0.attention.self.query": 10}),
            "disagree",
        ),
    ],
)
def test_merge_errors_write_nothing(adapters, tmp_path, capsys, make_bad, message):
    bad = make_bad(tmp_path)
    out = tmp_path / "merged"
    assert main(["merge", str(adapters[0]), str(bad), "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and leftovers(tmp_path) == []


def test_merge_missing_weights_file(adapters, tmp_path, capsys):
    (adapters[1] / "adapter_model.safetensors").unlink()
    out = tmp_path / "merged"
    assert main(["merge", *map(str, adapters), "--out", str(out)]) == 2
    assert "missing adapter_model.safetensors" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "ties"], "needs density"),
        (["--weights", "1", "2"], "2 weights for 3 experts"),
        (["--method", "linear", "--weights", "1", "nan", "1"], "finite"),
        (["--method", "nope"], "invalid choice"),
    ],
)
def test_merge_option_errors(adapters, tmp_path, capsys, args, message):
    out = tmp_path / "merged"
    assert main(["merge", *map(str, adapters), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_corrupt_indices_rejected(tmp_path, capsys):
    good = write_adapter(tmp_path / "a0", seed=0)
    bad = write_adapter(tmp_path / "a1", seed=1)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = f"{PREFIX}encoder.layer.0.attention.self.query.sparse_adapter_indices"
    tensors[key] = torch.flip(tensors[key], [0]).contiguous()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    out = tmp_path / "merged"
    assert main(["merge", str(good), str(bad), "--out", str(out), "--no-progress"]) == 2
    assert "sorted" in capsys.readouterr().err and not out.exists()


def test_write_failure_leaves_nothing(tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(TypeError):
        write_adapter_dir(out, {"x": object()}, {"k": torch.ones(1)}, "readme")
    assert not out.exists() and leftovers(tmp_path) == []
    with pytest.raises(FileExistsError):
        (tmp_path / "file").write_text("x")
        check_output_dir(tmp_path / "file", overwrite=True)


def test_inspect_report_and_files(tmp_path, capsys):
    shapes = {"only": [4, 5]}
    a = tmp_path / "a"
    b = tmp_path / "b"
    for path, idx, vals in ((a, [0, 1, 2, 3], [1.0, -1.0, 2.0, 0.0]), (b, [2, 3, 4, 5, 6, 7], [-1.0] * 6)):
        path.mkdir()
        save_file(
            {
                f"{PREFIX}only.sparse_adapter_indices": torch.tensor(idx),
                f"{PREFIX}only.sparse_adapter_values": torch.tensor(vals),
            },
            str(path / "adapter_model.safetensors"),
        )
        config = {"peft_type": "SPARSE_ADAPTER", "block_size": None, "entries_pattern": {"only": len(idx)}}
        (path / "adapter_config.json").write_text(json.dumps({**config, "weight_shapes": shapes}))
    report_path, plot_path = tmp_path / "report.json", tmp_path / "plot.png"
    rc = main(["inspect", str(a), str(b), "--json", str(report_path), "--plot", str(plot_path)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "only" in printed and "jaccard" in printed
    report = json.loads(report_path.read_text())
    layer = report["layers"]["only"]
    assert layer["density"] == [4 / 20, 6 / 20]
    assert layer["params"] == [4, 6]
    assert layer["jaccard"] == [[1.0, 2 / 8], [2 / 8, 1.0]]
    # shared entries 2 and 3: values (2, -1) conflict, (0, -1) has no sign and does not
    assert layer["sign_conflict"][0][1] == 0.5
    assert layer["sign_conflict_rate"] == 0.5
    assert report["overall"]["jaccard"] == layer["jaccard"]
    assert layer["union_entries"] == report["overall"]["union_entries"] == len({0, 1, 2, 3} | {2, 3, 4, 5, 6, 7})
    assert "union of all masks" in printed
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(tmp_path) == []


def test_inspect_blocks_count_real_entries(tmp_path):
    shapes = {"q": [5, 3]}  # block 2: grid 3 x 2, edge blocks are partial
    dirs = [write_adapter(tmp_path / f"a{i}", seed=i, block=2, shapes=shapes, rows=6) for i in range(2)]
    report = inspect_adapters(dirs)
    layer = report["layers"]["q"]
    assert layer["entries"] == [15, 15] and layer["params"] == [24, 24]
    assert layer["density"] == [1.0, 1.0] and layer["jaccard"][0][1] == 1.0
    assert layer["union_entries"] == 15  # real entries, not the 24 padded block slots
    empty = write_adapter(tmp_path / "empty", seed=5, block=2, shapes=shapes, rows=0)
    layer = inspect_adapters([dirs[0], empty])["layers"]["q"]
    assert (
        layer["entries"] == [15, 0] and layer["jaccard"][0][1] == 0.0 and layer["sign_conflict_rate"] is None
    )


def test_inspect_errors_write_nothing(adapters, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    assert main(["inspect", str(adapters[0]), str(tmp_path / "missing"), "--json", str(report_path)]) == 2
    assert "not found" in capsys.readouterr().err and not report_path.exists()
    assert main(["inspect", str(adapters[0]), "--json", str(tmp_path / "no" / "dir" / "r.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "merge" in capsys.readouterr().out
    assert main([]) == 2


# --- library and cluster ------------------------------------------------------------------------------------------
def test_library_add_list_remove(tmp_path, capsys):
    lib = tmp_path / "lib"
    sources = [write_adapter(tmp_path / f"s{i}", seed=i) for i in range(2)]
    assert main(["library", "add", str(lib), str(sources[0]), "--name", "alpha", "--task", "t0",
                 "--metrics", '{"acc": 0.5}']) == 0
    assert main(["library", "add", str(lib), str(sources[1]), "--name", "beta"]) == 0
    capsys.readouterr()
    assert main(["library", "list", str(lib)]) == 0
    out = capsys.readouterr().out
    assert "2 experts, base model 'fake/model'" in out and "alpha\tt0\t20 entries\t{\"acc\": 0.5}" in out
    assert main(["library", "list", str(lib), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in records] == ["alpha", "beta"] and records[0]["metrics"] == {"acc": 0.5}
    assert main(["library", "remove", str(lib), "alpha"]) == 0
    assert "removed 'alpha'" in capsys.readouterr().out
    assert [e["name"] for e in json.loads((lib / "library.json").read_text())["experts"]] == ["beta"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["library", "add", "LIB", "SRC0", "--name", "beta"], "already exists"),
        (["library", "add", "LIB", "SRC0", "--name", "x", "--metrics", "{bad"], "--metrics is not valid JSON"),
        (["library", "add", "LIB", "SRC0", "--name", "x", "--metrics", "[1]"], "metrics must be a JSON object"),
        (["library", "add", "LIB", "OTHER", "--name", "x"], "target layers differ from the library's"),
        (["library", "remove", "LIB", "nope"], "no expert named 'nope'"),
        (["library", "list", "NOLIB"], "not an expert library"),
        (["cluster", "LIB", "--k", "3", "--out", "OUT"], "1 <= k <= 1"),
    ],
)
def test_library_and_cluster_errors_exit_2_and_change_nothing(tmp_path, capsys, argv, message):
    lib = tmp_path / "lib"
    source = write_adapter(tmp_path / "s0", seed=0)
    assert main(["library", "add", str(lib), str(source), "--name", "beta"]) == 0
    other = write_adapter(tmp_path / "other", seed=1, shapes={"x": [4, 4]})
    before = (lib / "library.json").read_bytes()
    replace = {"LIB": str(lib), "SRC0": str(source), "OTHER": str(other), "NOLIB": str(tmp_path / "none"),
               "OUT": str(tmp_path / "out")}
    capsys.readouterr()
    assert main([replace.get(a, a) for a in argv]) == 2
    assert message in capsys.readouterr().err
    assert (lib / "library.json").read_bytes() == before and not (tmp_path / "out").exists()


def test_failed_first_add_creates_no_library(tmp_path, capsys):
    bad = write_adapter(tmp_path / "bad", seed=0, tensors={"base_model.model.head.modules_to_save.w": torch.ones(1)})
    assert main(["library", "add", str(tmp_path / "lib"), str(bad), "--name", "x"]) == 2
    assert "modules_to_save" in capsys.readouterr().err and not (tmp_path / "lib").exists()


def test_cluster_command(tmp_path, capsys):
    lib = tmp_path / "lib"
    for i in range(4):
        source = write_adapter(tmp_path / f"s{i}", seed=i)
        assert main(["library", "add", str(lib), str(source), "--name", f"e{i}"]) == 0
    out, plot = tmp_path / "out", tmp_path / "sim.png"
    rc = main(["cluster", str(lib), "--k", "2", "--out", str(out), "--plot", str(plot), "--no-progress",
               "--combination-type", "ties", "--density", "0.5", "--add-to-library"])
    assert rc == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "clusters.json").read_text())
    assert summary["names"] == ["e0", "e1", "e2", "e3"] and len(summary["labels"]) == 4
    assert summary["combination_type"] == "ties" and f"wrote {summary['num_clusters']} merged" in printed
    assert "silhouette" in printed and plot.read_bytes()[:4] == b"\x89PNG"
    for c, members in enumerate(summary["clusters"]):
        reference = merge_adapters_from_disk(
            [tmp_path / f"s{e[1]}" for e in members], tmp_path / f"ref{c}", "ties", density=0.5, progress=False
        )
        got = load_file(str(out / f"cluster_{c}" / "adapter_model.safetensors"))
        want = load_file(str(reference / "adapter_model.safetensors"))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    names = [e["name"] for e in json.loads((lib / "library.json").read_text())["experts"]]
    assert names == ["e0", "e1", "e2", "e3"] + [f"cluster_{c}" for c in range(summary["num_clusters"])]
