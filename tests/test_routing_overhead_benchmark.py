"""Smoke test of the routing-overhead benchmark: a tiny run writes complete, consistent results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "benchmarks.reuse.overhead", "--quick", "--experts", "2", "3"]
    command += ["--top-k", "1", "3", "--threads", "1", "--rounds", "1", "--warmup", "0", "--length", "8"]
    command += ["--out", str(tmp_path)]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "routing_overhead.json").read_text())
    # top_k=3 is skipped for 2 experts; every (experts, top_k, input) row is there once
    keys = {(r["experts"], r["top_k"], r["input"]) for r in result["rows"]}
    assert keys == {(e, k, i) for e, k in ((2, 1), (3, 1), (3, 3)) for i in ("prefill", "decode")}
    for row in result["rows"]:
        assert row["routed_ms"] > 0 and row["merged_weights_ms"] > 0
        assert abs(row["ratio_vs_merged_weights"] - row["routed_ms"] / row["merged_weights_ms"]) < 1e-9
    assert len(result["verdicts"]) == 4  # the largest expert count: 2 top_k values x 2 inputs
    table = (tmp_path / "routing_overhead.md").read_text()
    assert table.count("\n| 3 |") == 4 and "Target" in table
