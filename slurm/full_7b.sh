#!/usr/bin/env bash
# Full fine-tuning of Llama-2-7B on one node of 8 GPUs (ZeRO-3).
#   sbatch slurm/full_7b.sh [override ...]        e.g. sbatch slurm/full_7b.sh training.max_steps=200
# Submit from the ftcluster checkout. Variables a site sets are listed in launchers/ray_slurm.sh; the common ones
# are below. Near the time limit Slurm sends SIGTERM (--signal): the run checkpoints and the job requeues itself.
#SBATCH --job-name=ftc-full_7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
export FTC_CONFIG=${FTC_CONFIG:-configs/llama2_7b_full.yaml}
# export FTC_ACTIVATE="module load cuda && source $HOME/venvs/ftcluster/bin/activate"
# export FTC_NET_IFNAME=ib0
# export FTC_STORAGE=/shared/$USER/ftcluster-runs
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f launchers/ray_slurm.sh ] || { echo "submit from the ftcluster checkout (no launchers/ray_slurm.sh in $PWD)" >&2; exit 2; }
# Without FTC_ACTIVATE: the environment sbatch was called from (sbatch exports it), or ./.venv when there is one.
[ -n "${FTC_ACTIVATE:-}" ] || [ ! -f .venv/bin/activate ] || export FTC_ACTIVATE="source $PWD/.venv/bin/activate"
exec bash launchers/ray_slurm.sh "$@"
