#!/usr/bin/env bash
# A benchmark longer than one device call (10 minutes at most): started detached from the call, it runs on while
# the host stays warm, and the next calls wait for it and bring back what it wrote so far.
#
#   bash benchmarks/detached.sh start NAME COMMIT COMMAND...   # after `source benchmarks/gpu_setup.sh`
#   bash benchmarks/detached.sh wait NAME SECONDS             # each later call, until it prints "finished"
#
# start copies the tree to /root/detached/NAME/tree (a later call's tree replaces the call's own copy, not this
# one), runs COMMAND there under setsid with FTCLUSTER_COMMIT=COMMIT (the host's copy has no history), its output
# in NAME/command.log and its exit status in NAME/rc, and samples the GPU's and the host's memory in use every 15 s
# into NAME/memory.log. Give COMMAND an output directory under /root/detached/NAME (e.g. `--out
# /root/detached/NAME/out`). wait returns when the command has ended or SECONDS have passed, and copies NAME's
# logs and its small records (.md, .json, .jsonl, .log under 5 MB) to $OUT/NAME every 20 s, so a call cut short
# still brings back what was there.
set -uo pipefail
action=$1 name=$2
dir=/root/detached/$name
case $action in
  start)
    commit=$3; shift 3
    rm -rf "$dir" && mkdir -p "$dir/tree"
    tar cf - --exclude=./.stage --exclude=./.whl --exclude=./.venv . | tar xf - -C "$dir/tree"
    (
      cd "$dir/tree" || exit 1
      export FTCLUSTER_COMMIT=$commit PYTHONPATH="/tmp/site:$dir/tree${PYTHONPATH:+:$PYTHONPATH}"
      setsid nohup bash -c '
        ( while [ ! -f "$0/rc" ]; do
            gpu=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null | paste -sd, -)
            echo "$(date -u +%H:%M:%S) gpu ${gpu:-none} host $(free -m | awk "/Mem:/{print \$3}") MiB used" >> "$0/memory.log"
            sleep 15
          done ) &
        "$@" > "$0/command.log" 2>&1
        echo $? > "$0/rc"' "$dir" "$@" < /dev/null > /dev/null 2>&1 &
    )
    echo "started $name: $*"
    ;;
  wait)
    end=$((SECONDS + $3))
    copy() {
      mkdir -p "$OUT/$name"
      (cd "$dir" && find . -path ./tree -prune -o -type f \( -name '*.md' -o -name '*.json' -o -name '*.jsonl' \
        -o -name '*.log' -o -name rc \) -size -5M -print | tar cf - -T - | tar xf - -C "$OUT/$name")
    }
    while [ $SECONDS -lt $end ] && [ ! -f "$dir/rc" ]; do sleep 20; copy; done
    copy
    tail -3 "$dir/memory.log" 2>/dev/null
    if [ -f "$dir/rc" ]; then echo "finished $name: exit status $(cat "$dir/rc")"; else echo "running $name"; fi
    ;;
  *)
    echo "usage: $0 start NAME COMMIT COMMAND... | wait NAME SECONDS" >&2
    exit 2
    ;;
esac
