#!/usr/bin/env bash
# WORK IN PROGRESS (issue 4): not yet run against a real Slurm; see the branch's last commit message.
#
# Inside an sbatch allocation: start a Ray cluster across its nodes, run the ftcluster driver on it, and tear the
# cluster down on exit, on error and on SIGTERM. The slurm/*.sh scripts call it; everything a site changes is a
# variable below or in the environment.
#
#   FTC_CONFIG         the recipe (required), e.g. configs/llama3_70b_qlora.yaml
#   FTC_ACTIVATE       a command run first on every node to activate the Python environment
#   FTC_GPUS_PER_NODE  GPUs per node (default: SLURM_GPUS_ON_NODE, else 0)
#   FTC_CPUS_PER_NODE  CPUs Ray may use per node (default: SLURM_CPUS_ON_NODE)
#   FTC_PORT_BASE      first port of the head (default 6379); node i uses FTC_PORT_BASE + i * FTC_PORT_STRIDE
#   FTC_PORT_STRIDE    ports reserved per node (default 100), so several Slurm nodes may share one host
#   FTC_NET_IFNAME     network interface for NCCL and gloo (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME)
#   FTC_STORAGE        output.storage_path on a filesystem every node sees (default: runs under the submit dir)
#   FTC_WAIT_S         how long to wait for every node to join (default 300)
#   arguments          more overrides for the driver, e.g. training.max_steps=100
set -euo pipefail
: "${FTC_CONFIG:?set FTC_CONFIG to a recipe, e.g. configs/llama3_70b_qlora.yaml}"
: "${SLURM_JOB_NODELIST:?run this inside a Slurm allocation (sbatch or salloc)}"
FTC_ACTIVATE=${FTC_ACTIVATE:-true}
FTC_GPUS_PER_NODE=${FTC_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
FTC_CPUS_PER_NODE=${FTC_CPUS_PER_NODE:-${SLURM_CPUS_ON_NODE:-1}}
FTC_PORT_BASE=${FTC_PORT_BASE:-6379}
FTC_PORT_STRIDE=${FTC_PORT_STRIDE:-100}
FTC_STORAGE=${FTC_STORAGE:-${SLURM_SUBMIT_DIR:-$PWD}/runs}
FTC_WAIT_S=${FTC_WAIT_S:-300}
if [ -n "${FTC_NET_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=$FTC_NET_IFNAME GLOO_SOCKET_IFNAME=$FTC_NET_IFNAME
fi

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
node_addr() { scontrol show node "$1" | grep -oP '(?<=NodeAddr=)\S+'; }
HEAD=${NODES[0]}
HEAD_ADDR=$(node_addr "$HEAD")
HEAD_PORT=$FTC_PORT_BASE
# One token per job, handed to every node through the environment srun passes on: authentication stays on.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
export RAY_AUTH_TOKEN

node_ports() {  # the ports of the i-th node: distinct per node even when two nodes share a host
  local b=$((FTC_PORT_BASE + $1 * FTC_PORT_STRIDE))
  echo "--node-manager-port=$((b + 1)) --object-manager-port=$((b + 2)) --metrics-export-port=$((b + 3))" \
       "--dashboard-agent-listen-port=$((b + 4)) --dashboard-agent-grpc-port=$((b + 5))" \
       "--runtime-env-agent-port=$((b + 6)) --min-worker-port=$((b + 20)) --max-worker-port=$((b + 99))"
}

STEPS=()
teardown() {
  trap - EXIT TERM INT
  # srun forwards SIGTERM to `ray start --block`, which stops the processes it started.
  for pid in "${STEPS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${STEPS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap teardown EXIT
on_term() {
  if [ -z "${DRIVER:-}" ]; then echo "ray_slurm: SIGTERM before the driver started"; exit 143; fi
  echo "ray_slurm: SIGTERM, stopping the driver"
  kill -TERM "$DRIVER" 2>/dev/null || true
}
trap on_term TERM INT
# bash runs a trap only between commands: run long ones in the background and `wait`, which a signal interrupts.
run() { "$@" & wait $!; }

start_node() {  # index node address extra-args...
  local i=$1 node=$2 addr=$3; shift 3
  srun --overlap --nodes=1 --ntasks=1 -w "$node" bash -c "$FTC_ACTIVATE && exec ray start --block \
    --node-ip-address=$addr --node-name=$node --num-cpus=$FTC_CPUS_PER_NODE --num-gpus=$FTC_GPUS_PER_NODE \
    $(node_ports "$i") $*" &
  STEPS+=($!)
}

echo "ray_slurm: head $HEAD ($HEAD_ADDR:$HEAD_PORT), ${#NODES[@]} node(s), $FTC_GPUS_PER_NODE GPU(s) each"
start_node 0 "$HEAD" "$HEAD_ADDR" --head --port="$HEAD_PORT" --dashboard-host="$HEAD_ADDR" \
  --dashboard-port=$((FTC_PORT_BASE + 7))
eval "$FTC_ACTIVATE"
run python3 -m launchers.wait_for_cluster --address "$HEAD_ADDR:$HEAD_PORT" --nodes "$HEAD" --timeout "$FTC_WAIT_S"
for i in $(seq 1 $((${#NODES[@]} - 1))); do
  start_node "$i" "${NODES[$i]}" "$(node_addr "${NODES[$i]}")" --address="$HEAD_ADDR:$HEAD_PORT"
done
run python3 -m launchers.wait_for_cluster --address "$HEAD_ADDR:$HEAD_PORT" --nodes "${NODES[@]}" \
  --gpus-per-node "$FTC_GPUS_PER_NODE" --timeout "$FTC_WAIT_S"

python3 -m ftcluster.train --config "$FTC_CONFIG" \
  "scaling.num_workers=$(( ${#NODES[@]} * (FTC_GPUS_PER_NODE > 0 ? FTC_GPUS_PER_NODE : 1) ))" \
  "ray.address=$HEAD_ADDR:$HEAD_PORT" "output.storage_path=$FTC_STORAGE" "$@" &
DRIVER=$!
set +e
# A trapped SIGTERM interrupts `wait`; keep waiting while the driver winds down.
while true; do wait "$DRIVER"; code=$?; kill -0 "$DRIVER" 2>/dev/null || break; done
set -e
echo "ray_slurm: driver exited with $code"
exit "$code"
