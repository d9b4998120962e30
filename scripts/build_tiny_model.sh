#!/usr/bin/env bash
# Builds the tiny world's PerceptionDLM from nothing: synthetic data -> tokenizer -> "pretrained" tiny LLaDA and
# SigLIP -> the five training stages of configs/tiny -> evaluation on the held-out synthetic benchmark -> export
# to perceptiondlm/assets/ (the embedded default model). Work files go to work_dirs/tiny/.
# Usage: bash scripts/build_tiny_model.sh [--resume]   (after bash scripts/setup.sh dev)
#   --resume keeps work_dirs/tiny and reuses the steps an earlier (or interrupted) build finished with the same
#   configs: after a change of configs/tiny/region.yaml, only the region stages and the evaluation run again.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
[[ " $* " == *" --resume "* ]] || rm -rf work_dirs/tiny   # --resume: reuse the finished steps
"$python" -m perceptiondlm.tiny_world "$@"
