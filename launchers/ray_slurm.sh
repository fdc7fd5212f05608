#!/usr/bin/env bash
# Inside an sbatch allocation: start a Ray cluster across its nodes, run the ftcluster driver on it, tear the
# cluster down when the driver ends (or fails), and requeue the job if the driver stopped early with a checkpoint.
# The slurm/*.sh scripts call it. Everything a site changes is one of these variables, set in the environment or
# at the top of the slurm/*.sh script:
#
#   FTC_CONFIG         the recipe (required), e.g. configs/llama3_70b_qlora.yaml
#   FTC_ACTIVATE       shell code run first on every node to enter the Python environment,
#                      e.g. "module load cuda/12.4 && source ~/venvs/ftc/bin/activate" (default: none)
#   FTC_GPUS_PER_NODE  GPUs per node (default: SLURM_GPUS_ON_NODE, else 0)
#   FTC_CPUS_PER_NODE  CPUs Ray may use per node (default: SLURM_CPUS_ON_NODE)
#   FTC_NET_IFNAME     the network interface between nodes (e.g. ib0): Ray binds to its address, and NCCL and
#                      gloo use it (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME). Default: the node's Slurm address.
#   FTC_STORAGE        output.storage_path: where checkpoints go, on a filesystem every node sees
#                      (default: runs/ under the submit directory)
#   FTC_PORT_BASE      the head's port (default 6379); node i uses FTC_PORT_BASE + i * FTC_PORT_STRIDE and up
#   FTC_PORT_STRIDE    ports per node (default 100), so that several Slurm nodes may share one host
#   FTC_WAIT_S         how long every node has to join before the job fails naming the missing ones (default 300)
#   FTC_DRAIN_S        when a Ray node itself is sent SIGTERM (scancel, preemption), how long it keeps running so
#                      that the workers can checkpoint (default 120; sets RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S)
#   FTC_REQUEUE        1 (default): when the run stopped early with a checkpoint (the driver exits 75, e.g. after
#                      sbatch --signal=B:TERM@300 near the time limit), requeue the job; it resumes there
#   arguments          overrides for the driver, e.g. training.max_steps=100 output.name=my-run
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
FTC_REQUEUE=${FTC_REQUEUE:-1}
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${FTC_DRAIN_S:-120}
if [ -n "${FTC_NET_IFNAME:-}" ]; then
  export NCCL_SOCKET_IFNAME=$FTC_NET_IFNAME GLOO_SOCKET_IFNAME=$FTC_NET_IFNAME
fi
log() { echo "ray_slurm: $*"; }

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
WORKERS=$(( ${#NODES[@]} * (FTC_GPUS_PER_NODE > 0 ? FTC_GPUS_PER_NODE : 1) ))
ARGS=("scaling.num_workers=$WORKERS" "output.storage_path=$FTC_STORAGE" "$@")

eval "$FTC_ACTIVATE"
# A wrong recipe or override fails here, naming the field, before any node or GPU is touched.
python3 -m ftcluster.train --config "$FTC_CONFIG" "${ARGS[@]}" --print-config > /dev/null

node_ip() {  # the address Ray binds to on a node: that of FTC_NET_IFNAME, else the node's Slurm address
  if [ -n "${FTC_NET_IFNAME:-}" ]; then
    srun --overlap --nodes=1 --ntasks=1 -w "$1" ip -4 -o addr show "$FTC_NET_IFNAME" | awk '{split($4, a, "/"); print a[1]; exit}'
  else
    getent ahostsv4 "$(scontrol show node "$1" | grep -oP '(?<=NodeAddr=)\S+')" | awk '{print $1; exit}'
  fi
}
node_ports() {  # the ports of the i-th node: distinct per node even when two nodes share a host
  local b=$((FTC_PORT_BASE + $1 * FTC_PORT_STRIDE))
  echo "--node-manager-port=$((b + 1)) --object-manager-port=$((b + 2)) --metrics-export-port=$((b + 3))" \
       "--dashboard-agent-listen-port=$((b + 4)) --dashboard-agent-grpc-port=$((b + 5))" \
       "--runtime-env-agent-port=$((b + 6)) --min-worker-port=$((b + 20)) --max-worker-port=$((b + 99))"
}

HEAD=${NODES[0]}
HEAD_ADDR=$(node_ip "$HEAD")
HEAD_PORT=$FTC_PORT_BASE
[ -n "$HEAD_ADDR" ] || { log "no address for $HEAD${FTC_NET_IFNAME:+ on interface $FTC_NET_IFNAME}"; exit 1; }
# Authentication stays on: one token per job, handed to every node in the environment srun passes on.
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c 'import secrets; print(secrets.token_hex(32))')}
export RAY_AUTH_TOKEN

STEPS=()
teardown() {
  trap - EXIT
  [ ${#STEPS[@]} -eq 0 ] && return
  log "stopping the Ray cluster"
  for pid in "${STEPS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${STEPS[@]}"; do wait "$pid" 2>/dev/null || true; done
  STEPS=()
}
trap teardown EXIT
on_term() {
  if [ -z "${DRIVER:-}" ]; then log "SIGTERM before the driver started"; exit 143; fi
  log "SIGTERM: the driver asks the workers to checkpoint and stop"
  kill -TERM "$DRIVER" 2>/dev/null || true
}
trap on_term TERM INT
# bash runs a trap only between commands: long ones run in the background under `wait`, which a signal interrupts.
run() { "$@" & wait $!; }

start_node() {  # index node address extra-args...
  local i=$1 node=$2 addr=$3; shift 3
  srun --overlap --nodes=1 --ntasks=1 -w "$node" bash -c "$FTC_ACTIVATE && exec ray start --block \
    --node-ip-address=$addr --node-name=$node --num-cpus=$FTC_CPUS_PER_NODE --num-gpus=$FTC_GPUS_PER_NODE \
    --disable-usage-stats $(node_ports "$i") $*" &
  STEPS+=($!)
}

log "job ${SLURM_JOB_ID:-?} attempt $(( ${SLURM_RESTART_COUNT:-0} + 1 )): head $HEAD ($HEAD_ADDR:$HEAD_PORT)," \
    "${#NODES[@]} node(s) x $FTC_GPUS_PER_NODE GPU(s), $WORKERS worker(s), runs in $FTC_STORAGE"
start_node 0 "$HEAD" "$HEAD_ADDR" --head --port="$HEAD_PORT" --dashboard-host="$HEAD_ADDR" \
  --dashboard-port=$((FTC_PORT_BASE + 7))
run python3 -m launchers.wait_for_cluster --address "$HEAD_ADDR:$HEAD_PORT" --nodes "$HEAD" --timeout "$FTC_WAIT_S"
for i in $(seq 1 $((${#NODES[@]} - 1))); do
  start_node "$i" "${NODES[$i]}" "$(node_ip "${NODES[$i]}")" --address="$HEAD_ADDR:$HEAD_PORT"
done
run python3 -m launchers.wait_for_cluster --address "$HEAD_ADDR:$HEAD_PORT" --nodes "${NODES[@]}" \
  --gpus-per-node "$FTC_GPUS_PER_NODE" --timeout "$FTC_WAIT_S"

python3 -m ftcluster.train --config "$FTC_CONFIG" "ray.address=$HEAD_ADDR:$HEAD_PORT" "${ARGS[@]}" &
DRIVER=$!
set +e
# A trapped SIGTERM interrupts `wait`; keep waiting while the driver winds down.
while true; do wait "$DRIVER"; code=$?; kill -0 "$DRIVER" 2>/dev/null || break; done
set -e
log "driver exited with $code"
teardown
if [ "$code" -eq 75 ] && [ "$FTC_REQUEUE" = 1 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  log "stopped early with a checkpoint: requeueing job $SLURM_JOB_ID, which resumes from it"
  scontrol requeue "$SLURM_JOB_ID" || log "requeue refused (a cancelled job is not requeued); resubmit to resume"
fi
exit "$code"
