#!/bin/bash
# Multi-node DP prefix tuning on SLURM: one task per GPU; Lightning reads the SLURM environment.
#   sbatch examples/slurm_dp_ddp.sh
#SBATCH --job-name=pflat-dp-ddp
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --signal=SIGUSR1@90   # Lightning saves a checkpoint and requeues before the time limit

set -euo pipefail
source .venv/bin/activate
srun pflat fit \
  --config examples/configs/movie_reviews_dp.yaml \
  --config examples/configs/movie_reviews_dp_ddp.yaml \
  --trainer.accelerator gpu --trainer.devices "${SLURM_NTASKS_PER_NODE}" --trainer.num_nodes "${SLURM_NNODES}" \
  --trainer.default_root_dir "runs/slurm_${SLURM_JOB_ID}"
