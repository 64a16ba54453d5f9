#!/usr/bin/env bash
# GPU benchmark on one H100/H200: ViT-S/16 paper recipe (batch 64, 2x224 + 10x96 crops,
# out_dim 65536) in bf16 with synthetic crops: dino-bench eager, the reference-style step
# against ours in one process (eager, then compiled), dino-bench with torch.compile of the
# whole models (--compile) and with the training's per-block compile (train.compile=true), and
# the data pipeline on this machine's CPU. Each part prints one JSON line and writes it to
# $OUT/<part>.json (or benchmarks/out); their stderr goes to stderr.log.
# Under 8 minutes on an H100 including compilation (each part has its own time limit).
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir=${OUT:-benchmarks/out}
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export DINO_DIST_CACHE=${DINO_DIST_CACHE:-/tmp/dino_dist_cache}
config=configs/vit_small_16.yaml
recipe=(train.precision=bf16 optim.batch_size_per_gpu=64 data.global_crops_number=2
        data.global_crop_size=224 data.local_crops_number=10 data.local_crop_size=96
        model.out_dim=65536)
steps=40
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then  # a dry run of this script on a CPU, tiny model
  recipe+=(model.arch=vit_mini model.patch_size=8 model.img_size=16 data.global_crop_size=16
           data.local_crop_size=8 data.local_crops_number=2 model.out_dim=256
           model.head_hidden_dim=64 model.head_bottleneck_dim=32 optim.batch_size_per_gpu=4)
  steps=4
fi

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  echo "== $name"
  local began=$SECONDS
  timeout "$limit" "$@" >"$out_dir/$name.json" 2>"$out_dir/part.err"
  local rc=$?
  cat "$out_dir/$name.json"
  echo "   ($name: exit $rc, $((SECONDS - began)) s)"
  { echo "== $name (exit $rc)"; cat "$out_dir/part.err"; } >>"$out_dir/stderr.log"
  [ "$rc" -eq 0 ] || tail -n 25 "$out_dir/part.err"
  rm -f "$out_dir/part.err"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
part bench_eager 90 python3 -m dino_dist.cli.bench --config "$config" --steps "$steps" --rounds 4 "${recipe[@]}"
part reference_step 100 python3 benchmarks/reference_step.py --config "$config" --steps "$steps" --rounds 4 "${recipe[@]}"
part data_only 40 python3 -m dino_dist.cli.bench --data-only --rounds 4
part data_profile 40 python3 benchmarks/data_profile.py
part bench_compile 180 python3 -m dino_dist.cli.bench --config "$config" --compile --steps "$steps" --rounds 4 "${recipe[@]}"
part bench_train_compile 180 python3 -m dino_dist.cli.bench --config "$config" --steps "$steps" --rounds 4 "${recipe[@]}" train.compile=true
part reference_step_compiled 180 python3 benchmarks/reference_step.py --config "$config" --compile --steps "$steps" --rounds 4 "${recipe[@]}"
