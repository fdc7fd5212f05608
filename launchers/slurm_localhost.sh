#!/usr/bin/env bash
# A real Slurm on this one machine, for trying the sbatch scripts and for the tests: one slurmctld and N slurmd
# "nodes" (n1..nN) sharing the host, with their own munged, all state under DIR. Stopped by PID, never by name.
#
#   bash launchers/slurm_localhost.sh start DIR [NODES]    then: export SLURM_CONF=DIR/slurm.conf
#   bash launchers/slurm_localhost.sh stop DIR
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge (apt-get install slurmctld slurmd slurm-client munge)
# and root, since slurmd starts jobs as their user. FTC_SLURM_PORT (default 16817) is slurmctld's port; node i
# listens on FTC_SLURM_PORT + i: two slurmd sharing a port fail with "Job credential replayed".
set -euo pipefail
cmd=${1:?usage: slurm_localhost.sh start|stop DIR [NODES]}
dir=$(realpath -m "${2:?usage: slurm_localhost.sh start|stop DIR [NODES]}")
nodes=${3:-2}
port=${FTC_SLURM_PORT:-16817}

stop() {
  if [ -f "$dir/slurm.conf" ] && [ -f "$dir/slurmctld.pid" ]; then
    # Jobs first, so their steps (and any Ray they started) get Slurm's own SIGTERM-then-SIGKILL.
    SLURM_CONF=$dir/slurm.conf scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
    for _ in $(seq 60); do
      [ -z "$(SLURM_CONF=$dir/slurm.conf squeue -h 2>/dev/null)" ] && break
      sleep 1
    done
  fi
  local pids=()
  for f in "$dir"/slurmd-n*.pid "$dir/slurmctld.pid" "$dir/munged.pid"; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
    rm -f "$f"
  done
  for pid in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  done
}

start() {
  for exe in munged slurmctld slurmd sbatch; do
    command -v "$exe" >/dev/null || { echo "slurm_localhost: $exe not found: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 3; }
  done
  mkdir -p "$dir/state" "$dir/munge"
  chmod 700 "$dir/munge"
  [ -f "$dir/munge/munge.key" ] || { head -c 1024 /dev/urandom > "$dir/munge/munge.key"; chmod 400 "$dir/munge/munge.key"; }
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/seed"
  # Ray advertises the host's routable address even when told 127.0.0.1; the nodes must carry the same one.
  addr=$(hostname -I 2>/dev/null | awk '{print $1}') || true
  [ -n "$addr" ] || addr=$(python3 -c 'import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect(("192.0.2.1", 9)); print(s.getsockname()[0])' 2>/dev/null) || addr=127.0.0.1
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))
  names=$(seq -s, -f 'n%g' 1 "$nodes")
  {
    echo "ClusterName=ftclocal"
    echo "SlurmctldHost=localhost($addr)"
    echo "SlurmctldPort=$port"
    echo "SlurmUser=$(id -un)"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire is also how long a requeued job waits before it may start again (120 s by default).
    echo "AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmdSpoolDir=$dir/spool-%n"
    echo "SlurmctldPidFile=$dir/slurmctld.pid"
    echo "SlurmdPidFile=$dir/slurmd-%n.pid"
    echo "SlurmctldLogFile=$dir/slurmctld.log"
    echo "SlurmdLogFile=$dir/slurmd-%n.log"
    echo "ProctrackType=proctrack/pgid"
    echo "TaskPlugin=task/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "JobCompType=jobcomp/filetxt"
    echo "JobCompLoc=$dir/jobcomp.txt"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "KillWait=60"
    for i in $(seq 1 "$nodes"); do
      echo "NodeName=n$i NodeAddr=$addr NodeHostname=$(hostname) Port=$((port + i)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
  } > "$dir/slurm.conf"
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -f "$SLURM_CONF"
  for i in $(seq 1 "$nodes"); do slurmd -f "$SLURM_CONF" -N "n$i"; done
  for _ in $(seq 60); do
    idle=$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)
    [ "$idle" -ge "$nodes" ] && { echo "slurm_localhost: $nodes node(s) idle; export SLURM_CONF=$SLURM_CONF"; return; }
    sleep 1
  done
  echo "slurm_localhost: the nodes did not come up; see $dir/*.log" >&2
  sinfo -N >&2 || true
  stop
  exit 1
}

case $cmd in
  start) start ;;
  stop) stop ;;
  *) echo "usage: slurm_localhost.sh start|stop DIR [NODES]" >&2; exit 2 ;;
esac
