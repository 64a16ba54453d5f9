#!/usr/bin/env bash
# GPU benchmark on one H100/H200, the paper's crops (2x224 + 10x96), out_dim 65536, bf16:
#   ViT-S/16 batch 64 from synthetic crops: eager, packed crops (one pass over all crops),
#     whole-model compile; our step against the official code's way (reference_step.py);
#   ViT-S/16 end to end from real JPEG files on local disk, data.augment_on=cpu and =gpu,
#     and the loader processes' own images/s for both (how many feed the GPU);
#   ViT-B/16 and ViT-L/16 (MFU), and the largest batch that fits for S, B and L;
#   a profile of ViT-S/16 from synthetic crops and from JPEGs (augment on the GPU): kernels
#     per step, the GPU-busy share, the top kernels, and the device augmentation's own cost;
#   the DINOv2 recipe (Sinkhorn-Knopp, KoLeo, iBOT, LayerScale) as its configs set it:
#     ViT-S/14 batch 64 and ViT-L/14 batch 32, 2x224 + 8x98 crops, synthetic.
# Each part prints one JSON line into $OUT/<part>.json (or benchmarks/out), its stderr goes to
# stderr.log, and the end prints one markdown table of all parts (benchmarks/gpu_table.py).
# Parts have their own time limits, under 9 minutes in all on an H100. GPU_BENCH_PARTS="a b"
# runs only the named parts; GPU_BENCH_SMOKE=1 is a dry run on a CPU with a tiny model.
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
steps=40 jpegs=1024 cpu_workers=14 gpu_workers=8 max_batch=(--start 64 --tries 4)
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then  # a dry run of this script on a CPU, tiny model
  recipe+=(model.arch=vit_mini model.patch_size=8 model.img_size=16 data.global_crop_size=16
           data.local_crop_size=8 data.local_crops_number=2 model.out_dim=256
           model.head_hidden_dim=64 model.head_bottleneck_dim=32 optim.batch_size_per_gpu=4
           train.precision=fp32)
  steps=4 jpegs=16 cpu_workers=1 gpu_workers=1 max_batch=(--start 2 --tries 2 --steps 1)
fi
dinov2_tiny=()  # the DINOv2 parts keep their configs' crops, heads and batch
if [ "${GPU_BENCH_SMOKE:-0}" = 1 ]; then
  dinov2_tiny=(model.arch=vit_mini model.patch_size=8 model.img_size=16 data.global_crop_size=16
               data.local_crop_size=8 data.local_crops_number=2 model.out_dim=256
               model.head_hidden_dim=64 model.head_bottleneck_dim=32 optim.batch_size_per_gpu=4
               train.precision=fp32 model.ffn=mlp ibot.out_dim=0 ibot.separate_head=false)
fi
smoke_arch() {  # the smoke run keeps its tiny model whatever the part asks for
  [ "${GPU_BENCH_SMOKE:-0}" = 1 ] && echo model.arch=vit_mini || echo "model.arch=$1"
}

part() {  # part NAME LIMIT_S COMMAND...
  local name=$1 limit=$2; shift 2
  if [ -n "${GPU_BENCH_PARTS:-}" ] && [[ " $GPU_BENCH_PARTS " != *" $name "* ]]; then return; fi
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

bench=(python3 -m dino_dist.cli.bench --config "$config" --steps "$steps" --rounds 2 --phase-steps 0)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
jpeg_dir="$DINO_DIST_CACHE/gpu_bench_jpegs"
python3 -c "import sys; from pathlib import Path; from dino_dist.bench.images import ensure_bench_images; ensure_bench_images(Path(sys.argv[1]), count=int(sys.argv[2]))" "$jpeg_dir" "$jpegs"
part vit_s_eager 60 "${bench[@]}" "${recipe[@]}"
part vit_s_packed 60 "${bench[@]}" "${recipe[@]}" model.packed_crops=true
part reference_step 70 python3 benchmarks/reference_step.py --config "$config" --steps "$steps" --rounds 2 "${recipe[@]}"
part vit_s_jpeg_augment_cpu 60 "${bench[@]}" --data folder "${recipe[@]}" data.path="$jpeg_dir" data.augment_on=cpu data.num_workers="$cpu_workers"
part vit_s_jpeg_augment_gpu 60 "${bench[@]}" --data folder "${recipe[@]}" data.path="$jpeg_dir" data.augment_on=gpu data.num_workers="$gpu_workers"
# Where the time goes: kernels per step, GPU-busy share and the top kernels (dino-bench --profile).
part profile_vit_s 60 "${bench[@]}" --profile 5 "${recipe[@]}"
part profile_vit_s_jpeg_gpu 70 "${bench[@]}" --profile 5 --data folder "${recipe[@]}" data.path="$jpeg_dir" data.augment_on=gpu data.num_workers="$gpu_workers"
part loader_augment_cpu 30 python3 -m dino_dist.cli.bench --data-only --rounds 2 --images "$jpeg_dir" data.augment_on=cpu
part loader_augment_gpu 30 python3 -m dino_dist.cli.bench --data-only --rounds 2 --images "$jpeg_dir" data.augment_on=gpu
part vit_b_eager 50 "${bench[@]}" "${recipe[@]}" "$(smoke_arch vit_base)"
part vit_l_eager 60 "${bench[@]}" "${recipe[@]}" "$(smoke_arch vit_large)"
part vit_s_compiled 120 "${bench[@]}" --compile "${recipe[@]}"
part max_batch_vit_s 60 python3 benchmarks/max_batch.py --config "$config" "${max_batch[@]}" "${recipe[@]}"
part max_batch_vit_b 60 python3 benchmarks/max_batch.py --config "$config" "${max_batch[@]}" "${recipe[@]}" "$(smoke_arch vit_base)"
part max_batch_vit_l 60 python3 benchmarks/max_batch.py --config "$config" "${max_batch[@]}" "${recipe[@]}" "$(smoke_arch vit_large)"
dinov2=(python3 -m dino_dist.cli.bench --steps "$steps" --rounds 2 --phase-steps 0)
part dinov2_vit_s14 90 "${dinov2[@]}" --config configs/dinov2_vit_small_14.yaml "${dinov2_tiny[@]}"
# One GPU: DDP (no sharding) in place of the config's FSDP.
part dinov2_vit_l14 120 "${dinov2[@]}" --config configs/dinov2_vit_large_14.yaml train.parallel=ddp "${dinov2_tiny[@]}"
echo
python3 benchmarks/gpu_table.py "$out_dir"
