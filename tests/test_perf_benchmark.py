"""Smoke test of the performance benchmark: ``--quick`` runs end to end and writes complete, sane outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("perf")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.perf.run", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_outputs_exist(quick_run: Path) -> None:
    for name in ("perf.json", "perf.md", "perf.png"):
        path = quick_run / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (quick_run / "perf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(quick_run.glob(".*tmp*")), "temporary files left behind"


def test_json_has_every_method_and_metric(quick_run: Path) -> None:
    from benchmarks.perf.methods import METHODS
    from benchmarks.perf.run import METRICS, NOT_APPLICABLE

    data = json.loads((quick_run / "perf.json").read_text())
    assert data["meta"]["quick"] is True
    assert set(data["models"]) == {"minilm", "llama"}
    for model_name, model in data["models"].items():
        assert set(model["methods"]) == set(METHODS)
        for method in METHODS:
            row = model["methods"][method]
            for metric in METRICS:
                assert metric in row, (model_name, method, metric)
                value = row[metric]
                if metric in NOT_APPLICABLE.get(method, set()):
                    assert value is None, (model_name, method, metric)
                else:
                    assert isinstance(value, int | float) and math.isfinite(value) and value > 0, (
                        model_name,
                        method,
                        metric,
                        value,
                    )
        merges = model["merge_experts"]["merges"]
        assert len(merges) >= 5
        assert all(math.isfinite(m["cpu_s"]) and m["cpu_s"] > 0 for m in merges.values())
    rows = data["swap_scaling"]["rows"]
    assert rows and all(r["swap_merged_s"] > 0 for r in rows)


def test_targets_table(quick_run: Path) -> None:
    data = json.loads((quick_run / "perf.json").read_text())
    targets = data["targets"]
    assert len(targets) >= 10
    for target in targets:
        assert isinstance(target["met"], bool)
        assert target["measured"] is not None and math.isfinite(target["measured"]) and target["measured"] > 0
    md = (quick_run / "perf.md").read_text()
    assert "## Targets" in md and ("met" in md or "MISSED" in md)
    for model in ("minilm", "llama"):
        assert f"## {model}" in md
