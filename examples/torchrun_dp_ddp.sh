#!/bin/bash
# Multi-node DP prefix tuning with torchrun (run the same command on every node, NODE_RANK=0..N-1).
#   MASTER_ADDR=node0 NODE_RANK=0 NNODES=2 bash examples/torchrun_dp_ddp.sh
set -euo pipefail
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}
torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${GPUS_PER_NODE}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  -m pflat_lightning.cli fit \
  --config examples/configs/movie_reviews_dp.yaml \
  --config examples/configs/movie_reviews_dp_ddp.yaml \
  --trainer.accelerator gpu --trainer.devices "${GPUS_PER_NODE}" --trainer.num_nodes "${NNODES:-1}"
