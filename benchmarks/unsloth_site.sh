#!/usr/bin/env bash
# Builds .stage/u/unsloth-site.tar.xz: Unsloth and the packages it imports that the offline GPU host lacks, unpacked
# for Python 3.12 on x86-64 Linux, for `--baseline unsloth` there (benchmarks/gpu_setup.sh unpacks it to /tmp/usite).
# Unsloth's own wheel is 29 MB, 82 MB of it unpacked its web UI (studio/), which training never imports: left out,
# the archive is ~11 MB and travels with one device call. xformers and torchvision are not included: Unsloth falls
# back to PyTorch's attention and imports torchvision only for vision models. Unsloth pins datasets < 5; the host
# keeps the wheelhouse's datasets 5.2 (the benchmark hands Unsloth token tensors, not datasets).
set -euo pipefail
UNSLOTH=${UNSLOTH:-2026.10.9}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
pip download -q --no-deps --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$tmp/w" \
  "unsloth==$UNSLOTH" "unsloth_zoo==$UNSLOTH" "trl<=1.15" tyro docstring_parser typeguard shtab cut_cross_entropy \
  torchao msgspec sentencepiece hf_transfer json5 structlog einops nest_asyncio typer click rich markdown-it-py \
  mdurl pygments shellingham
mkdir -p "$tmp/site" .stage/u
for w in "$tmp"/w/*.whl; do unzip -q -o "$w" -d "$tmp/site"; done
rm -rf "$tmp/site/studio" "$tmp/site/unsloth_cli"
tar cJf .stage/u/unsloth-site.tar.xz -C "$tmp/site" .
ls -l .stage/u/unsloth-site.tar.xz
