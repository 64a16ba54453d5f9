"""Where the multi-crop pipelines spend their time on this machine (one thread, as a worker).

Prints one JSON object: milliseconds per image for decoding and each step of the project's
pipeline (cut, colour jitter, grayscale, blur, solarize, whole call) and for the reference
pipeline, measured on the benchmark JPEGs at the paper's crop settings; and for
data.augment_on=gpu, the loader's parameter drawing and the device path run here on the CPU
(one batch of all the images).

    python benchmarks/data_profile.py [--images DIR] [--count 32]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_dist.bench.images import ensure_bench_images  # noqa: E402
from dino_dist.bench.reference_pipeline import ReferenceMultiCrop, pil_loader  # noqa: E402
from dino_dist.data import crop_group  # noqa: E402
from dino_dist.data.augment import MultiCropAugmentation  # noqa: E402
from dino_dist.data.crop_params import CropParamSampler  # noqa: E402
from dino_dist.data.recipe import CropRecipe  # noqa: E402
from dino_dist.data.device_augment import augment_batch, collate_decoded  # noqa: E402
from dino_dist.data.folder import decode_rgb, find_images  # noqa: E402

STEPS = ("colour_jitter", "random_grayscale", "random_blur", "random_solarize")


def timing(spent: dict, name: str, fn):
    def timed_call(*args, **kwargs):
        began = time.perf_counter()
        result = fn(*args, **kwargs)
        spent[name] = spent.get(name, 0.0) + time.perf_counter() - began
        return result
    return timed_call


def gpu_path_seconds(files: list[str], count: int) -> dict[str, float]:
    """augment_on=gpu: the loader's draws per image, then the whole batch's device path."""
    recipe = CropRecipe(2, 224, (0.4, 1.0), 10, 96, (0.05, 0.4))
    sampler = CropParamSampler(recipe)
    images = [decode_rgb(files[index % len(files)]) for index in range(count)]
    began = time.perf_counter()
    samples = [(sampler(image), 0, 0) for image in images]
    drawn = time.perf_counter()
    augment_batch(collate_decoded(samples, recipe)[0])
    return {"gpu_path_draw_params": drawn - began, "gpu_path_device_on_cpu": time.perf_counter() - drawn}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None)
    parser.add_argument("--count", type=int, default=32)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(1)
    files = find_images(args.images or ensure_bench_images())[0]
    spent: dict[str, float] = {}
    for name in STEPS:
        setattr(crop_group, name, timing(spent, name, getattr(crop_group, name)))
    crop_group.CropGroup._cut = timing(spent, "cut", crop_group.CropGroup._cut)
    augmentation = MultiCropAugmentation(CropRecipe(2, 224, (0.4, 1.0), 10, 96, (0.05, 0.4)),
                                         batched=True)
    reference = ReferenceMultiCrop((0.4, 1.0), (0.05, 0.4), 10)
    ours = timing(spent, "project_total", lambda f: augmentation(timing(spent, "decode", decode_rgb)(f)))
    theirs = timing(spent, "reference_total", lambda f: reference(timing(spent, "pil_load", pil_loader)(f)))
    for index in range(2):
        ours(files[index]), theirs(files[index])
    spent.clear()
    for index in range(args.count):
        torch.manual_seed(index)
        ours(files[index % len(files)])
        theirs(files[index % len(files)])
    spent.update(gpu_path_seconds(files, args.count))
    print(json.dumps({"ms_per_image": {k: round(v / args.count * 1e3, 2) for k, v in spent.items()},
                      "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
