#!/bin/bash
# Pretraining on a Slurm cluster (by default the 1B model, configs/train/pt_1b.json).
# Submit from the project folder:
#   sbatch slurm/pt.sh
#   sbatch --nodes 2 --ntasks-per-node 8 slurm/pt.sh
#   CONFIG=configs/train/pt_small.json DS_CONFIG=zero2.json EXTRA_ARGS='--set max_steps=20' sbatch slurm/pt.sh
# One task per GPU (tasks per node = GPUs per node); OUTPUT_DIR sets the run folder; the log goes to
# logs/<job name>-<job id>.out. Submitting the job again resumes from its last checkpoint.
# Where GPUs are a Slurm resource, ask for them too: sbatch --gpus-per-node 8 slurm/pt.sh
#SBATCH --job-name=astrai-pt
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

CONFIG="${CONFIG:-configs/train/pt_1b.json}"
DS_CONFIG="${DS_CONFIG:-zero3.json}"
[ -f "${SLURM_SUBMIT_DIR:-}/slurm/common.sh" ] ||
  { echo "error: submit this with sbatch from the project folder: sbatch slurm/pt.sh" >&2; exit 2; }
source "$SLURM_SUBMIT_DIR/slurm/common.sh"
