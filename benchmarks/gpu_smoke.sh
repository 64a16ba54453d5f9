#!/usr/bin/env bash
# One GPU: the paper recipe (ViT-S/16, 2x224 + 10x96, out_dim 65536, batch 64) in bf16, fp16
# and fp32 for a few steps on synthetic JPEGs, then the demo on the GPU. Prints the console
# lines and a summary; metrics.jsonl of each run lands in $OUT (or /tmp/gpu_smoke).
set -euo pipefail
OUT=${OUT:-/tmp/gpu_smoke}
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"
DATA=/tmp/gpu_smoke_images
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python3 benchmarks/make_images.py "$DATA" --count 2048 --size 320 --workers 14
for precision in bf16 fp16 fp32; do
  steps=40; [ "$precision" = fp32 ] && steps=15
  python3 -m dino_dist.train --config configs/vit_small_16.yaml data.path="$DATA" \
    data.num_workers=14 train.precision=$precision train.max_steps=$steps log.every_steps=5 \
    train.output_dir=/tmp/run_$precision checkpoint.every_steps=0 2>&1 | grep -v Warning
  cp /tmp/run_$precision/metrics.jsonl "$OUT/metrics_$precision.jsonl"
done
python3 -m dino_dist.train data.demo_dir=/tmp/demo_cache train.output_dir=/tmp/run_demo \
  data.num_workers=8 2>&1 | grep -E "k-NN|step (100|200|300|400)/|training" || true
cp /tmp/run_demo/metrics.jsonl "$OUT/metrics_demo.jsonl" || true
