#!/usr/bin/env bash
# Launches a training stage on one or many nodes with torchrun.
# Usage: [NNODES=N NODE_RANK=i MASTER_ADDR=host MASTER_PORT=port] GPUS_PER_NODE=g \
#        bash scripts/train.sh CONFIG [--SECTION.key value ...]
# Every node runs the same command with its own NODE_RANK. MASTER_PORT has a fixed default so that all nodes
# agree on it (the reference drew a random port per node). Output is also written to logs/.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: bash scripts/train.sh CONFIG [--SECTION.key value ...]}
shift
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29517}
if [[ -n ${GPUS_PER_NODE:-} ]]; then
  gpus=$GPUS_PER_NODE
elif command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi --list-gpus | wc -l)
else
  gpus=1
fi
python=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3 )}
mkdir -p logs
log="logs/$(basename "${config%.*}")_node${node_rank}_$(date +%Y%m%d_%H%M%S).log"
echo "training ${config} on ${nnodes} node(s) x ${gpus} process(es), node ${node_rank}, master ${master_addr}:${master_port}; log: ${log}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TOKENIZERS_PARALLELISM=false
"$python" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$gpus" \
  --master_addr "$master_addr" --master_port "$master_port" \
  -m perceptiondlm.training.train --config "$config" "$@" 2>&1 | tee "$log"
exit "${PIPESTATUS[0]}"
