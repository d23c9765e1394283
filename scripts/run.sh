#!/usr/bin/env bash
# Set up from nothing (idempotent) and run the main job: the reduced real-model benchmark
# (all-MiniLM-L6-v2, 4 held-in + 2 held-out WordNet tasks, sparse vs LoRA experts, merged), printing the table
# and writing JSON/Markdown/PNG into benchmarks/results/. Extra arguments go to the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m benchmarks.quality.run --reduced "$@"
