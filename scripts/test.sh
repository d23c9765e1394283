#!/usr/bin/env bash
# Set up from nothing (idempotent) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/python -m ruff check peft_sparse tests benchmarks examples
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
