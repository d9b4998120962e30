#!/usr/bin/env bash
# Builds the tiny world's PerceptionDLM from nothing: synthetic data -> tokenizer -> "pretrained" tiny LLaDA and
# SigLIP -> the five training stages of configs/tiny -> evaluation on the held-out synthetic benchmark -> export
# to perceptiondlm/assets/ (the embedded default model). Work files go to work_dirs/tiny/.
# Usage: bash scripts/build_tiny_model.sh          (after bash scripts/setup.sh dev)
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
rm -rf work_dirs/tiny
"$python" -m perceptiondlm.tiny_world
