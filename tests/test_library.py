"""ExpertLibrary: add / list / remove / load round trips, refusals, atomicity, corrupt manifests, cache keys."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import lm_batches, set_random_values, tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from test_cli import write_adapter

import peft_sparse.library as library_module
from peft_sparse import ExpertLibrary, LibraryError, SparseAdapterConfig

IDS = lm_batches(1, seed=3)[0]["input_ids"]
TARGETS = ["q_proj", "v_proj"]


def logits(model, adapter: str | None = None) -> torch.Tensor:
    if adapter is not None:
        model.set_adapter(adapter)
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def trained(seed: int, adapter_name: str = "default", **kwargs) -> PeftModel:
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("keep_ratio", 0.1)
    model = get_peft_model(tiny_llama(), SparseAdapterConfig(**kwargs), adapter_name=adapter_name)
    set_random_values(model, seed=seed, std=0.3)
    return model


def saved(tmp_path: Path, name: str, seed: int, **kwargs) -> Path:
    directory = tmp_path / "src" / name
    trained(seed, **kwargs).save_pretrained(directory)
    return directory


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (except the lock) with its bytes."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".library.lock"
    }


@pytest.fixture
def fake_lib(tmp_path: Path) -> ExpertLibrary:
    library = ExpertLibrary(tmp_path / "lib", create=True)
    for i in range(3):
        library.add(write_adapter(tmp_path / f"a{i}", seed=i), f"e{i}", task=f"task {i}", metrics={"acc": i / 10})
    return library


# --- round trips --------------------------------------------------------------------------------------------------
def test_add_list_load_round_trip_matches_from_pretrained(tmp_path):
    first = saved(tmp_path, "math", seed=1)
    live = trained(2, adapter_name="code", block_size=4)
    library = ExpertLibrary(tmp_path / "lib", create=True)
    library.add(first, "math", task="arithmetic", metrics={"acc": 0.5})
    library.add(live, "code", adapter_name="code")
    assert library.names() == ["math", "code"] and len(library) == 2 and "math" in library and "x" not in library
    entry = library.entry("math")
    assert entry["task"] == "arithmetic" and entry["metrics"] == {"acc": 0.5} and entry["block_size"] is None
    assert library.entry("code")["block_size"] == 4
    assert entry["digest"].startswith("sha256:") and entry["shapes_digest"] == library.entry("code")["shapes_digest"]
    assert not Path(entry["path"]).is_absolute()
    assert (first / "adapter_model.safetensors").read_bytes() == (
        library.adapter_dir("math") / "adapter_model.safetensors"
    ).read_bytes()
    # every path in the manifest is relative: the library still opens after moving the directory
    moved = tmp_path / "moved"
    shutil.move(str(library.root), moved)
    library = ExpertLibrary(moved)

    loaded = library.load_into(tiny_llama())
    assert set(loaded.peft_config) == {"math", "code"} and loaded.active_adapter == "math"
    reference_math = PeftModel.from_pretrained(tiny_llama(), first)
    torch.testing.assert_close(logits(loaded, "math"), logits(reference_math), rtol=0, atol=0)
    live.save_pretrained(tmp_path / "live")
    reference_code = PeftModel.from_pretrained(tiny_llama(), tmp_path / "live" / "code")
    torch.testing.assert_close(logits(loaded, "code"), logits(reference_code), rtol=0, atol=0)
    torch.testing.assert_close(logits(loaded, "code"), logits(live), rtol=0, atol=0)
    assert not torch.allclose(logits(loaded, "math"), logits(loaded, "code"))

    # into an existing PeftModel: adds adapters, keeps the active one; a clash changes nothing
    host = PeftModel.from_pretrained(tiny_llama(), first, adapter_name="own")
    library.load_into(host, ["code"])
    assert set(host.peft_config) == {"own", "code"} and host.active_adapter == "own"
    with pytest.raises(LibraryError, match="already has adapters named"):
        library.load_into(host, ["math", "code"])
    assert set(host.peft_config) == {"own", "code"}


def test_fresh_process_loads_library(tmp_path):
    library = ExpertLibrary(tmp_path / "lib", create=True)
    library.add(saved(tmp_path, "alpha", seed=4), "alpha")
    library.add(saved(tmp_path, "beta", seed=5), "beta")
    expected = logits(library.load_into(tiny_llama(), ["beta", "alpha"]), "alpha")
    out = tmp_path / "out.pt"
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from conftest import tiny_llama, lm_batches
        from peft_sparse import ExpertLibrary
        library = ExpertLibrary({str(library.root)!r})
        assert library.names() == ["alpha", "beta"], library.names()
        model = library.load_into(tiny_llama(), ["beta", "alpha"])
        model.set_adapter("alpha")
        with torch.no_grad():
            torch.save(model(input_ids=lm_batches(1, seed=3)[0]["input_ids"]).logits, {str(out)!r})
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    torch.testing.assert_close(torch.load(out), expected, rtol=0, atol=0)


def test_remove_and_empty_library_resets_targets(fake_lib, tmp_path):
    path = fake_lib.adapter_dir("e1")
    fake_lib.remove("e1")
    assert fake_lib.names() == ["e0", "e2"] and not path.exists() and not path.parent.exists()
    assert ExpertLibrary(fake_lib.root).names() == ["e0", "e2"]
    with pytest.raises(KeyError, match="no expert named 'e1'"):
        fake_lib.remove("e1")
    fake_lib.remove("e0")
    fake_lib.remove("e2")
    assert len(fake_lib) == 0 and fake_lib.targets is None and fake_lib.base_model is None
    other = write_adapter(tmp_path / "other", seed=9, shapes={"x": [4, 4]}, base_model_name_or_path="other/model")
    fake_lib.add(other, "x")  # an empty library accepts a new base
    assert fake_lib.base_model == "other/model" and fake_lib.targets == {"x": [4, 4]}


def test_overwrite_keeps_position_and_replaces_files(fake_lib, tmp_path):
    old = fake_lib.adapter_dir("e1")
    with pytest.raises(LibraryError, match="already exists"):
        fake_lib.add(write_adapter(tmp_path / "n", seed=7), "e1")
    fake_lib.add(tmp_path / "n", "e1", overwrite=True, task="new")
    assert fake_lib.names() == ["e0", "e1", "e2"] and fake_lib.entry("e1")["task"] == "new"
    assert not old.exists() and fake_lib.adapter_dir("e1") != old
    assert (fake_lib.adapter_dir("e1") / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "n" / "adapter_model.safetensors"
    ).read_bytes()


# --- refusals -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"base_model_name_or_path": "another/model"}, "base model 'another/model' differs from the library's"),
        ({"shapes": {"encoder.layer.0.attention.self.query": [8, 12]}}, "library layers missing"),
        (
            {"shapes": {"encoder.layer.0.attention.self.query": [8, 12], "encoder.layer.1.output.dense": [12, 9]}},
            r"weight_shapes\['encoder.layer.1.output.dense'\] is \[12, 9\], the library has \[12, 8\]",
        ),
        (
            {"shapes": {"encoder.layer.0.attention.self.query": [8, 12], "other": [12, 8]}},
            r"layers not in the library: \['other'\]",
        ),
    ],
)
def test_mismatched_expert_refused_library_unchanged(fake_lib, tmp_path, kwargs, match):
    before = snapshot(fake_lib.root)
    with pytest.raises(LibraryError, match=match):
        fake_lib.add(write_adapter(tmp_path / "bad", seed=8, **kwargs), "bad")
    assert snapshot(fake_lib.root) == before and fake_lib.names() == ["e0", "e1", "e2"]
    assert ExpertLibrary(fake_lib.root).names() == ["e0", "e1", "e2"]


def test_base_model_override(fake_lib, tmp_path):
    fake_lib.add(
        write_adapter(tmp_path / "p", seed=8, base_model_name_or_path="/local/fake"), "p", base_model="fake/model"
    )
    assert fake_lib.entry("p")["base_model"] == "fake/model"


@pytest.mark.parametrize(
    ("source", "name", "match"),
    [
        ("lora", "x", "peft_type is 'LORA'"),
        ("modules_to_save", "x", "modules_to_save"),
        ("nan", "x", "non-finite"),
        ("missing", "x", "adapter directory not found"),
        ("ok", "../evil", "invalid expert name"),
        ("ok", "E0", "only by case"),
        ("ok", "", "invalid expert name"),
    ],
)
def test_bad_sources_and_names_refused(fake_lib, tmp_path, source, name, match):
    if source == "lora":
        model = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS))
        model.save_pretrained(tmp_path / "lora")
        path = tmp_path / "lora"
    elif source == "modules_to_save":
        extra = {"tensors": {"base_model.model.classifier.modules_to_save.default.weight": torch.ones(2)}}
        path = write_adapter(tmp_path / "m", seed=1, **extra)
    elif source == "nan":
        path = write_adapter(tmp_path / "nan", seed=1)
        from safetensors.torch import load_file, save_file

        tensors = load_file(path / "adapter_model.safetensors")
        key = next(k for k in tensors if k.endswith("values"))
        tensors[key][0] = float("nan")
        save_file(tensors, str(path / "adapter_model.safetensors"))
    elif source == "missing":
        path = tmp_path / "nowhere"
    else:
        path = write_adapter(tmp_path / "ok", seed=1)
    before = snapshot(fake_lib.root)
    with pytest.raises(LibraryError, match=match):
        fake_lib.add(path, name)
    assert snapshot(fake_lib.root) == before


def test_bad_metrics_and_models_refused(fake_lib, tmp_path):
    with pytest.raises(LibraryError, match="metrics must be a JSON object"):
        fake_lib.add(write_adapter(tmp_path / "q", seed=1), "q", metrics=[1, 2])
    with pytest.raises(LibraryError, match="not JSON-serialisable"):
        fake_lib.add(tmp_path / "q", "q", metrics={"acc": float("nan")})
    with pytest.raises(LibraryError, match="has no adapter 'nope'"):
        fake_lib.add(trained(1), "q", adapter_name="nope")
    with pytest.raises(LibraryError, match="not a sparse adapter"):
        fake_lib.add(get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS)), "q")
    assert fake_lib.names() == ["e0", "e1", "e2"]


def test_create_refuses_non_empty_directory_and_open_needs_manifest(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "file.txt").write_text("x")
    with pytest.raises(LibraryError, match="not an empty directory"):
        ExpertLibrary(tmp_path / "stuff", create=True)
    with pytest.raises(LibraryError, match="not an expert library"):
        ExpertLibrary(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


# --- atomicity ----------------------------------------------------------------------------------------------------
def test_failed_manifest_write_leaves_old_library(fake_lib, tmp_path, monkeypatch):
    before = snapshot(fake_lib.root)

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(library_module, "atomic_write_text", fail)
    with pytest.raises(OSError, match="simulated"):
        fake_lib.add(write_adapter(tmp_path / "new", seed=5), "new")
    with pytest.raises(OSError, match="simulated"):
        fake_lib.add(tmp_path / "new", "e1", overwrite=True)
    with pytest.raises(OSError, match="simulated"):
        fake_lib.remove("e0")
    assert snapshot(fake_lib.root) == before  # no half expert, no staging leftovers, same manifest
    monkeypatch.undo()
    assert ExpertLibrary(fake_lib.root).names() == ["e0", "e1", "e2"]


def test_failed_copy_midway_leaves_no_half_expert(fake_lib, tmp_path, monkeypatch):
    before = snapshot(fake_lib.root)
    real_copy = shutil.copyfile
    calls = []

    def copy_then_fail(src, dst, *args, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError("I/O error (simulated)")
        return real_copy(src, dst, *args, **kwargs)

    monkeypatch.setattr(library_module.shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="simulated"):
        fake_lib.add(write_adapter(tmp_path / "new", seed=5), "new")
    assert len(calls) == 2 and snapshot(fake_lib.root) == before


def test_crash_between_rename_and_manifest_keeps_old_manifest(fake_lib, tmp_path):
    """A process killed after moving the new expert into place but before the manifest write."""
    source = write_adapter(tmp_path / "new", seed=5)
    manifest = (fake_lib.root / "library.json").read_bytes()
    old_dir = fake_lib.adapter_dir("e1")
    script = textwrap.dedent(
        f"""
        import os
        import peft_sparse.library as lib
        def crash(*args, **kwargs):
            os._exit(17)
        lib.atomic_write_text = crash
        library = lib.ExpertLibrary({str(fake_lib.root)!r})
        library.add({str(source)!r}, "e1", overwrite=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    assert subprocess.run([sys.executable, "-c", script], env=env, timeout=300).returncode == 17
    assert (fake_lib.root / "library.json").read_bytes() == manifest
    versions = sorted(p.name for p in (fake_lib.root / "experts" / "e1").iterdir())
    assert len(versions) == 2  # the orphaned new version sits next to the old one
    reopened = ExpertLibrary(fake_lib.root)
    assert reopened.names() == ["e0", "e1", "e2"] and reopened.adapter_dir("e1") == old_dir
    reopened.verify()
    reopened.add(write_adapter(tmp_path / "later", seed=6), "later")  # the next write collects the orphan
    assert [p.name for p in (fake_lib.root / "experts" / "e1").iterdir()] == [old_dir.name]
    assert not any(p.name.startswith(".staging") for p in (fake_lib.root / "experts").iterdir())


# --- corrupted manifests ------------------------------------------------------------------------------------------
def _edit(root: Path, fn) -> None:
    path = root / "library.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda root: (root / "library.json").write_text("{not json"), "not valid JSON"),
        (lambda root: _edit(root, lambda d: d.pop("targets")), "missing field 'targets'"),
        (lambda root: _edit(root, lambda d: d["experts"][1].pop("digest")), r"missing fields \['digest'\]"),
        (lambda root: _edit(root, lambda d: d.update(format_version=99)), "newer than this peft-sparse"),
        (lambda root: _edit(root, lambda d: d.update(format="x")), "not a peft-sparse expert library"),
        (lambda root: _edit(root, lambda d: d["experts"][1].update(digest="sha256:00")), "digest does not match"),
        (lambda root: _edit(root, lambda d: d["experts"].append(d["experts"][0])), "appears twice"),
        (lambda root: _edit(root, lambda d: d["targets"].update(extra=[1, 1])), "targets_digest does not match"),
        (lambda root: _edit(root, lambda d: d["experts"][0].update(base_model="x")), "base_model 'x' differs"),
        (
            lambda root: _edit(root, lambda d: d["experts"][0].update(path=str(root / d["experts"][0]["path"]))),
            "must be the relative path",
        ),
        (lambda root: _edit(root, lambda d: d["experts"][0].update(path="experts/e0/../../x")), "relative path"),
        (lambda root: shutil.rmtree(root / "experts" / "e1"), "is missing"),
        (
            lambda root: (
                next((root / "experts" / "e2").iterdir()).joinpath("adapter_model.safetensors").write_bytes(b"x")
            ),
            "modified or truncated",
        ),
    ],
)
def test_corrupted_manifest_raises_clear_error(fake_lib, edit, match):
    edit(fake_lib.root)
    with pytest.raises(LibraryError, match=match):
        ExpertLibrary(fake_lib.root)


def test_same_size_modification_caught_by_verify_and_load(tmp_path):
    library = ExpertLibrary(tmp_path / "lib", create=True)
    library.add(saved(tmp_path, "a", seed=1), "a")
    weights = library.adapter_dir("a") / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # flip bits of the last value: same size, different content
    weights.write_bytes(bytes(data))
    reopened = ExpertLibrary(library.root)  # the cheap checks (sizes) pass
    with pytest.raises(LibraryError, match="does not match its SHA-256"):
        reopened.verify()
    model = tiny_llama()
    with pytest.raises(LibraryError, match="does not match its SHA-256"):
        reopened.load_into(model)
    assert not any("sparse_adapter" in n for n, _ in model.named_modules())


# --- derived-data cache -------------------------------------------------------------------------------------------
def test_cache_hits_and_invalidates_on_replace(fake_lib, tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3.0) + len(calls)}

    first = fake_lib.cached("proto", ["e0", "e1"], {"iters": 5}, compute)
    again = fake_lib.cached("proto", ["e0", "e1"], {"iters": 5}, compute)
    assert len(calls) == 1 and torch.equal(first["x"], again["x"])
    assert ExpertLibrary(fake_lib.root).cached("proto", ["e0", "e1"], {"iters": 5}, compute)["x"].tolist() == [
        1.0,
        2.0,
        3.0,
    ]  # persisted
    fake_lib.cached("proto", ["e0", "e1"], {"iters": 6}, compute)  # other params: a miss
    fake_lib.cached("proto", ["e1", "e0"], {"iters": 5}, compute)  # other order: a miss
    fake_lib.cached("proto", ["e2"], {"iters": 5}, compute)
    assert len(calls) == 4
    cache_files = sorted((fake_lib.root / "cache" / "proto").iterdir())
    assert len(cache_files) == 4

    fake_lib.add(tmp_path / "a1", "e1", overwrite=True, task="same content")  # same digest: still a hit
    fake_lib.cached("proto", ["e0", "e1"], {"iters": 5}, compute)
    assert len(calls) == 4
    fake_lib.add(write_adapter(tmp_path / "changed", seed=11), "e1", overwrite=True)
    assert sorted((fake_lib.root / "cache" / "proto").iterdir()) == [fake_lib.cache_path("proto", ["e2"], {"iters": 5})]
    fresh = fake_lib.cached("proto", ["e0", "e1"], {"iters": 5}, compute)
    assert len(calls) == 5 and fresh["x"].tolist() == [5.0, 6.0, 7.0]
    fake_lib.remove("e2")
    assert fake_lib.cache_path("proto", ["e0", "e1"], {"iters": 5}).exists()
    assert len(list((fake_lib.root / "cache" / "proto").iterdir())) == 1


def test_cache_recomputes_damaged_file_and_checks_arguments(fake_lib):
    fake_lib.cached("k", ["e0"], {}, lambda: {"v": torch.ones(2)})
    fake_lib.cache_path("k", ["e0"], {}).write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert fake_lib.cached("k", ["e0"], {}, lambda: {"v": torch.zeros(2)})["v"].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="invalid cache kind"):
        fake_lib.cached("../x", ["e0"], {}, lambda: {})
    with pytest.raises(KeyError, match="unknown experts"):
        fake_lib.cached("k", ["nope"], {}, lambda: {})
    with pytest.raises(TypeError, match=r"dict\[str, torch.Tensor\]"):
        fake_lib.cached("k2", ["e0"], {}, lambda: {"v": [1, 2]})


def test_failed_load_rolls_back_added_adapters(tmp_path, monkeypatch):
    library = ExpertLibrary(tmp_path / "lib", create=True)
    for i, name in enumerate(["one", "two", "three"]):
        library.add(saved(tmp_path, name, seed=i), name)
    host = PeftModel.from_pretrained(tiny_llama(), library.adapter_dir("one"), adapter_name="own")
    real = PeftModel.load_adapter

    def fail_on_three(self, model_id, adapter_name, *args, **kwargs):
        if adapter_name == "three":
            raise RuntimeError("load failed (simulated)")
        return real(self, model_id, adapter_name, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "load_adapter", fail_on_three)
    with pytest.raises(RuntimeError, match="simulated"):
        library.load_into(host, ["one", "two", "three"])
    assert set(host.peft_config) == {"own"} and host.active_adapter == "own"
    base = tiny_llama()
    with pytest.raises(RuntimeError, match="simulated"):
        library.load_into(base, ["two", "three"])
    assert not any("sparse_adapter" in n for n, _ in base.named_modules())


def test_from_hub_opens_the_snapshot(fake_lib, monkeypatch):
    import huggingface_hub

    seen = {}

    def fake_snapshot(repo_id, revision=None, **kwargs):
        seen.update(repo_id=repo_id, revision=revision)
        return str(fake_lib.root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    library = ExpertLibrary.from_hub("user/experts", revision="v1")
    assert library.names() == ["e0", "e1", "e2"] and seen == {"repo_id": "user/experts", "revision": "v1"}


def test_push_to_hub_uploads_plain_files_without_lock(fake_lib, monkeypatch):
    import huggingface_hub

    seen = {}
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: seen.update(kwargs))
    fake_lib.push_to_hub("user/experts", commit_message="add experts")
    assert seen["folder_path"] == str(fake_lib.root) and seen["repo_id"] == "user/experts"
    assert ".library.lock" in seen["ignore_patterns"] and seen["commit_message"] == "add experts"
    assert seen["delete_patterns"] == ["experts/**", "cache/**"]  # replaced versions do not linger remotely


def test_concurrent_adds_from_two_processes_keep_every_expert(fake_lib, tmp_path):
    """Both processes open the library, wait at a barrier, then interleave their adds."""
    sources = {
        f"p{p}x{i}": write_adapter(tmp_path / f"p{p}x{i}", seed=20 + 4 * p + i) for p in range(2) for i in range(4)
    }
    go = tmp_path / "go"
    scripts = []
    for p in range(2):
        mine = {name: str(path) for name, path in sources.items() if name.startswith(f"p{p}")}
        scripts.append(
            textwrap.dedent(
                f"""
                import pathlib, time
                from peft_sparse.library import ExpertLibrary
                library = ExpertLibrary({str(fake_lib.root)!r})  # opened before the other process writes
                pathlib.Path({str(tmp_path / f"ready{p}")!r}).touch()
                while not pathlib.Path({str(go)!r}).exists():
                    time.sleep(0.01)
                for name, path in {mine!r}.items():
                    library.add(path, name)
                    time.sleep(0.05)
                """
            )
        )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", s], env=env) for s in scripts]
    deadline = time.monotonic() + 240
    while not all((tmp_path / f"ready{p}").exists() for p in range(2)):
        assert time.monotonic() < deadline and all(proc.poll() is None for proc in procs)
        time.sleep(0.05)
    go.touch()
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    names = ExpertLibrary(fake_lib.root).names()
    assert sorted(names) == sorted(["e0", "e1", "e2", *sources]) and names[:3] == ["e0", "e1", "e2"]
