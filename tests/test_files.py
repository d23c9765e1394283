"""Saved adapter files get the mode a plain ``open()`` would give them under the current umask (0644 under 022)."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import set_random_values, tiny_llama
from peft import get_peft_model

from peft_sparse import SparseAdapterConfig
from peft_sparse.cli import main as cli_main
from peft_sparse.files import atomic_write_text


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def save_adapter(directory: Path, seed: int = 0) -> None:
    config = SparseAdapterConfig(target_modules=["q_proj"], mask_init="random", seed=seed)
    model = get_peft_model(tiny_llama(layers=1), config)
    set_random_values(model, seed=seed)
    model.save_pretrained(directory)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_save_pretrained_files_follow_the_umask(tmp_path, mask, expected):
    with umask(mask):
        save_adapter(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    for name in files:
        assert mode(tmp_path / "adapter" / name) == expected, name


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_merged_adapter_files_follow_the_umask(tmp_path, mask, file_mode, dir_mode):
    save_adapter(tmp_path / "a", seed=0)
    save_adapter(tmp_path / "b", seed=1)
    with umask(mask):
        cli_main(["merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m"), "--no-progress"])
    assert mode(tmp_path / "m") == dir_mode
    for path in (tmp_path / "m").iterdir():
        assert mode(path) == file_mode, path.name


def test_atomic_text_write_follows_the_umask(tmp_path):
    with umask(0o022):
        atomic_write_text(tmp_path / "note.md", "hello")
    assert mode(tmp_path / "note.md") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["note.md"]  # no temporary file left behind
