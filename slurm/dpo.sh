#!/bin/bash
# DPO on a Slurm cluster (set CONFIG to your DPO train config).
# Submit from the project folder:
#   sbatch slurm/dpo.sh
#   sbatch --nodes 2 --ntasks-per-node 8 slurm/dpo.sh
#   CONFIG=configs/train/dpo_tiny.json DS_CONFIG=zero3.json EXTRA_ARGS='--set max_steps=20' sbatch slurm/dpo.sh
# One task per GPU (tasks per node = GPUs per node); OUTPUT_DIR sets the run folder; the log goes to
# logs/<job name>-<job id>.out. Submitting the job again resumes from its last checkpoint.
# Where GPUs are a Slurm resource, ask for them too: sbatch --gpus-per-node 8 slurm/dpo.sh
#SBATCH --job-name=astrai-dpo
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

CONFIG="${CONFIG:-configs/train/dpo_tiny.json}"
DS_CONFIG="${DS_CONFIG:-zero3.json}"
[ -f "${SLURM_SUBMIT_DIR:-}/slurm/common.sh" ] ||
  { echo "error: submit this with sbatch from the project folder: sbatch slurm/dpo.sh" >&2; exit 2; }
source "$SLURM_SUBMIT_DIR/slurm/common.sh"
