#!/usr/bin/env bash
# WORK IN PROGRESS (issue 4). QLoRA of a 70B model across the allocation's nodes and GPUs:
#   sbatch slurm/qlora_70b.sh [override ...]          (e.g. training.max_steps=200)
#SBATCH --job-name=ftc-qlora-70b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
export FTC_CONFIG=${FTC_CONFIG:-configs/llama3_70b_qlora.yaml}
cd "${SLURM_SUBMIT_DIR:-.}"
exec bash launchers/ray_slurm.sh "$@"
