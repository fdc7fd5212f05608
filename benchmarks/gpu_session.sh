#!/usr/bin/env bash
# One device call: install the carried wheels, make shape-only model dirs, and time ftcluster on peer shapes.
#   bash benchmarks/gpu_session.sh "<shape>:<method>:<attn>[:<extra overrides>]" ...   (logs under $OUT)
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  >/dev/null 2>&1 || true
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
[ -d /root/tok ] || python3 -c "from pathlib import Path; from benchmarks.shapes import build_tokenizer; build_tokenizer(Path('/root/tok'))"
for spec in "$@"; do
  IFS=: read -r shape method attn extra <<<"$spec"
  [ -d "/root/shapes/$shape" ] || python3 -m benchmarks.shapes "$shape" "/root/shapes/$shape" --tokenizer /root/tok >/dev/null
  name="$shape-$method-$attn-$(date +%s)"
  timeout 280 python3 -m ftcluster.train --config "configs/smollm2_135m_$method.yaml" \
    model.name_or_path=/root/shapes/$shape model.random_init=true model.gradient_checkpointing=true \
    model.attn_implementation=$attn data.max_seq_len=2048 training.micro_batch_size=2 training.max_steps=30 \
    training.log_every=10 training.eval_every=0 training.save_every=0 lora.r=8 lora.alpha=16 \
    "lora.target_modules=[q_proj,v_proj]" output.storage_path=/tmp/bench output.name=$name \
    output.save_final_model=false $extra > "$out/$name.log" 2>&1
  echo "== $spec rc=$?"
  grep -E "TrainController.*step [0-9]+/" "$out/$name.log" | sed 's/.*\] step/step/' | tail -2
  python3 - "$name" <<'PY'
import json, sys
recs = [json.loads(l) for l in open(f"/tmp/bench/{sys.argv[1]}/metrics.jsonl")]
last = [r for r in recs if "loss" in r][-1]
print(f"   steady tok/s {last['tokens_per_s_total']:,.0f}  MFU {100*last['mfu']:.1f}%  peak alloc {max(r['peak_allocated_gib'] for r in recs if 'loss' in r):.2f} GiB  reserved {max(r['peak_reserved_gib'] for r in recs if 'loss' in r):.2f} GiB")
PY
done
