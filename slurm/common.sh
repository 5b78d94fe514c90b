# Sourced by slurm/{pt,sft,dpo}.sh inside the batch job: start train.py once per task with srun.
#
# DeepSpeed does not read Slurm's variables, and with mpi4py installed a plain `srun python train.py`
# gives every task an MPI world of one (all of them rank 0). So each task gets the variables that
# torch.distributed reads: RANK, LOCAL_RANK, WORLD_SIZE from SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS;
# MASTER_ADDR is the job's first host and MASTER_PORT follows from the job id (two jobs that share a
# node do not collide).
#
# Environment: CONFIG, DS_CONFIG (set by the calling script, overridable), OUTPUT_DIR (the run folder,
# default: the config's output_dir), EXTRA_ARGS (more train.py arguments, split on spaces), MASTER_PORT.
set -euo pipefail

cd "$SLURM_SUBMIT_DIR"
# The project's own environment where there is one, else whatever python is on PATH.
# DeepSpeed's compiled ops go to ~/.cache/astrai_ds/torch_extensions/<versions, CPU, environment> (train.py sets
# TORCH_EXTENSIONS_DIR unless it is set): built once per machine, or once per CPU model on a shared home folder.
[ -f .venv/bin/activate ] && source .venv/bin/activate

MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 50000))}"
export MASTER_ADDR MASTER_PORT PYTHONUNBUFFERED=1

ARGS=(--config "$CONFIG" --ds_config "$DS_CONFIG")
[ -n "${OUTPUT_DIR:-}" ] && ARGS+=(--set "output_dir=$OUTPUT_DIR")
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ARGS+=("${EXTRA[@]}")

echo "job $SLURM_JOB_ID: $SLURM_NTASKS tasks on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT"
echo "train.py ${ARGS[*]}"

# Near the time limit Slurm sends USR1 to this script (#SBATCH --signal=B:USR1@300). It is passed on to the
# ranks through srun: train.py finishes its step, saves a checkpoint and exits. Then the job goes back in
# the queue; it starts again later and, with resume "auto", continues from that checkpoint.
REQUEUE=0
on_usr1() {
  echo "time limit near: asking the ranks for a checkpoint (job $SLURM_JOB_ID)"
  REQUEUE=1
  kill -USR1 "$SRUN" 2>/dev/null || true
}
trap on_usr1 USR1

# The single quotes matter: each task expands SLURM_PROCID and SLURM_LOCALID for itself.
srun --kill-on-bad-exit=1 bash -c \
  'RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS exec python -u train.py "$@"' \
  train.py "${ARGS[@]}" &
# srun runs in the background and the script waits for it: bash runs a trap only between commands, so
# with srun in the foreground USR1 would wait until training ends.
SRUN=$!
status=0
while true; do
  wait "$SRUN" && status=0 || status=$?
  kill -0 "$SRUN" 2>/dev/null || break  # srun has ended (a trap interrupts `wait` without ending it)
done
if [ "$REQUEUE" = 1 ]; then
  echo "checkpoint saved (train.py exited $status): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"
