#!/usr/bin/env bash
# QLoRA of a Llama-3-70B model over 2 nodes x 8 GPUs (ZeRO-3 over 4-bit weights, paged 8-bit AdamW).
#   sbatch slurm/qlora_70b.sh [override ...]        e.g. sbatch slurm/qlora_70b.sh training.max_steps=200
# Submit from the ftcluster checkout. Variables a site sets are listed in launchers/ray_slurm.sh; the common ones
# are below. Near the time limit Slurm sends SIGTERM (--signal): the run checkpoints and the job requeues itself.
# Memory per GPU: measured on 4 GPUs (4x H200) at PEFT's shape (micro batch 2, r=8, checkpoints on the GPU) with
# the frozen base in layer shards, 19.9 GiB allocated and 24.8 GiB in use (NVML)
# (reports/scaling-qlora-70b/2026-11-27-4xh200); estimated for this recipe on its 16 GPUs, 8.2 GiB allocated and
# 13.2 GiB in use while training (python -m ftcluster estimate --config configs/llama3_70b_qlora.yaml
# scaling.num_workers=16). Its model is a hub id: the driver downloads its snapshot once, into $FTC_STORAGE/.hub
# (model.hub_cache; HF_HOME's cache where HF_HOME is set), before the workers start; each GPU loads its share of it.
#SBATCH --job-name=ftc-qlora_70b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
export FTC_CONFIG=${FTC_CONFIG:-configs/llama3_70b_qlora.yaml}
# export FTC_ACTIVATE="module load cuda && source $HOME/venvs/ftcluster/bin/activate"
# export FTC_NET_IFNAME=ib0
# export FTC_STORAGE=/shared/$USER/ftcluster-runs
cd "${SLURM_SUBMIT_DIR:-.}"
[ -f launchers/ray_slurm.sh ] || { echo "submit from the ftcluster checkout (no launchers/ray_slurm.sh in $PWD)" >&2; exit 2; }
# Without FTC_ACTIVATE: the environment sbatch was called from (sbatch exports it), or ./.venv when there is one.
[ -n "${FTC_ACTIVATE:-}" ] || [ ! -f .venv/bin/activate ] || export FTC_ACTIVATE="source $PWD/.venv/bin/activate"
exec bash launchers/ray_slurm.sh "$@"
