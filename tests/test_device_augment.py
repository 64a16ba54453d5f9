"""Tests for data.augment_on=gpu: parameters drawn in the loader, crops made batched on the device.

The device path runs here on CPU tensors. It is checked four ways: each op against
torchvision's functional op, the whole chain against torchvision on pixel-aligned boxes, the
drawn parameters against the recipe's distributions, and the output pixels against the CPU
pipeline (MultiCropAugmentation) in distribution, with planted bugs that must be caught.
"""
from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from dino_dist.config import DataConfig
from dino_dist.data import (CropRecipe, DecodedBatch, MultiCropAugmentation, MultiCropDataset,
                            build_train_loader, crops_on_device)
from dino_dist.data import crop_params, device_augment
from dino_dist.data.crop_params import (BLUR_ON, BRIGHTNESS, CONTRAST, COLUMNS, FLIP, GRAY, HEIGHT,
                                        HUE, JITTER_ON, LEFT, ORDER, SATURATION, SIGMA,
                                        SOLARIZE_ON, TOP, WIDTH, CropParamSampler,
                                        draw_crop_params)
from dino_dist.data.recipe import IMAGENET_MEAN, IMAGENET_STD
from dino_dist.data.device_augment import (augment_batch, collate_decoded, colour_jitter,
                                           cut_and_resize, gaussian_blur, grayscale, normalise_,
                                           solarize)

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")

GLOBAL_SIZE, LOCAL_SIZE = 32, 16
RECIPE = CropRecipe(2, GLOBAL_SIZE, (0.4, 1.0), 2, LOCAL_SIZE, (0.05, 0.4), (0.1, 2.0))
PHOTOS = 40
SAMPLES = 3000  # device path: 75 visits of each photo, 12,000 crops
MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Other test processes share the two cores: per-op threads would mostly wait on each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def data_config(path: str | Path = "unused", **overrides) -> DataConfig:
    settings = dict(
        path=str(path), num_workers=0, prefetch_factor=2, demo_dir="", augment_on="gpu",
        batched_crops=True, global_crops_number=2, global_crop_size=GLOBAL_SIZE,
        global_crops_scale=[0.4, 1.0], local_crops_number=2, local_crop_size=LOCAL_SIZE,
        local_crops_scale=[0.05, 0.4], blur_sigma=[0.1, 2.0])
    settings.update(overrides)
    return DataConfig(**settings)


def write_photo(path: Path, rng: np.random.Generator) -> None:
    """A coloured gradient with a few coloured shapes: edges for blur to soften, colours
    for jitter and grayscale to change, bright and dark parts for solarize."""
    height, width = (int(v) for v in rng.integers(64, 97, 2))
    y, x = np.mgrid[0:height, 0:width]
    base, slope = rng.uniform(0, 255, 3), rng.uniform(-2, 2, (3, 2))
    pixels = base[:, None, None] + slope[:, 0, None, None] * y + slope[:, 1, None, None] * x
    image = Image.fromarray(np.clip(pixels.transpose(1, 2, 0), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        box = [x0, y0, x0 + int(rng.integers(8, 40)), y0 + int(rng.integers(8, 40))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    image.save(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for index in range(PHOTOS):
        write_photo(root / f"{index:03d}.png", rng)
    return root


def sample_keys(count: int) -> list[tuple[int, int]]:
    return [(index // PHOTOS, index % PHOTOS) for index in range(count)]


@pytest.fixture(scope="module")
def drawn(photos) -> list:
    """(DecodedSample, label, skipped) for SAMPLES keys, as a loader process makes them."""
    dataset = MultiCropDataset(photos, CropParamSampler(RECIPE), seed=0)
    return [dataset[key] for key in sample_keys(SAMPLES)]


def device_crops(samples: list, mutate=None, batch_size: int = 250) -> list[torch.Tensor]:
    """Crops per position over all samples; `mutate(params)` plants a bug in the draws."""
    batches = []
    for start in range(0, len(samples), batch_size):
        batch = collate_decoded(samples[start:start + batch_size], RECIPE)[0]
        if mutate is not None:
            mutate(batch.params, torch.Generator().manual_seed(start))
        batches.append(augment_batch(batch))
    return [torch.cat(position) for position in zip(*batches)]


def cpu_crops(photos: Path, batched: bool, count: int) -> list[torch.Tensor]:
    augmentation = MultiCropAugmentation(RECIPE, batched=batched)
    dataset = MultiCropDataset(photos, augmentation, seed=1)
    return [torch.stack(position) for position in zip(*(dataset[key][0] for key in sample_keys(count)))]


# ---------------------------------------------------------------- output pixels vs the CPU pipeline

FEATURES = ("mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b", "gray", "dark")


def crop_features(x: torch.Tensor) -> torch.Tensor:
    """Per crop: channel means and stds (normalised units: a blurred crop has a lower std),
    whether it is grey, and whether no pixel is above the solarize threshold."""
    raw = x * STD + MEAN
    is_gray = (raw[:, 0] - raw[:, 1]).abs().amax(dim=(1, 2)) < 2e-3
    is_dark = raw.amax(dim=(1, 2, 3)) <= 0.51
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3)), is_gray[:, None], is_dark[:, None]], 1)


def summary(crops: list[torch.Tensor]) -> dict:
    """Mean and standard error of each feature for the first global crop (always blurred),
    the second (sometimes solarized) and the local crops."""
    groups = {"global_1": crops[0], "global_2": crops[1], "local": torch.cat(crops[2:])}
    out = {}
    for name, x in groups.items():
        features = crop_features(x)
        out[name] = (features.mean(0), features.std(0) / math.sqrt(len(features)))
    return out


def mismatches(ours: dict, reference: dict, z_limit: float = 4.0) -> list[str]:
    """Features whose group means differ by more than z_limit standard errors."""
    found = []
    for group, (mean, error) in ours.items():
        ref_mean, ref_error = reference[group]
        z = (mean - ref_mean) / torch.sqrt(error ** 2 + ref_error ** 2)
        found += [f"{group}.{name} z={value:+.1f}" for name, value in zip(FEATURES, z.tolist())
                  if abs(value) > z_limit]
    return found


def swap_first_two_blur_probabilities(params: torch.Tensor, generator: torch.Generator) -> None:
    rows = params.shape[0]
    params[:, 0, BLUR_ON] = (torch.rand(rows, generator=generator) < 0.1).float()
    params[:, 1, BLUR_ON] = 1.0


def grayscale_twice_as_often(params: torch.Tensor, generator: torch.Generator) -> None:
    params[..., GRAY] = (torch.rand(params.shape[:2], generator=generator) < 0.4).float()


def solarize_the_first_global_crop(params: torch.Tensor, generator: torch.Generator) -> None:
    params[:, 0, SOLARIZE_ON] = params[:, 1, SOLARIZE_ON]
    params[:, 1, SOLARIZE_ON] = 0.0


def test_device_crops_match_the_cpu_pipeline_in_distribution(photos, drawn, monkeypatch):
    ours = summary(device_crops(drawn))
    for batched, count in ((True, 2000), (False, 600)):
        reference = summary(cpu_crops(photos, batched, count))
        assert mismatches(ours, reference) == [], f"batched_crops={batched}"
    # The same test catches planted bugs: blur probabilities on the wrong crop, a wrong
    # grayscale probability, solarize on the wrong crop, no normalisation.
    for bug in (swap_first_two_blur_probabilities, grayscale_twice_as_often,
                solarize_the_first_global_crop):
        assert mismatches(summary(device_crops(drawn, bug)), reference), bug.__name__
    monkeypatch.setattr(device_augment, "normalise_", lambda x: x)
    assert mismatches(summary(device_crops(drawn)), reference)


def test_each_crop_follows_its_own_grayscale_draw(drawn):
    crops = device_crops(drawn[:500])
    params = torch.stack([sample.params for sample, _, _ in drawn[:500]])
    for position, x in enumerate(crops):
        is_gray = crop_features(x)[:, FEATURES.index("gray")].bool()
        assert torch.equal(is_gray, params[:, position, GRAY].bool()), position


# ---------------------------------------------------------------- drawn parameters

def histogram(values: torch.Tensor, low: float, high: float, bins: int = 10) -> torch.Tensor:
    return torch.histc(values.float(), bins, low, high) / len(values)


def box_histograms(boxes: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Area fraction and log aspect ratio (w / h) of boxes [n, 4] in images of sizes [n, 2]."""
    area = boxes[:, 2] * boxes[:, 3] / (sizes[:, 0] * sizes[:, 1])
    log_ratio = torch.log(boxes[:, 3] / boxes[:, 2])
    return histogram(area, 0, 1, 20), histogram(log_ratio, -0.35, 0.35, 10)


def reference_boxes(sizes: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.tensor([RandomResizedCrop.get_params(torch.empty(1, h, w), list(scale), [3 / 4, 4 / 3])
                         for h, w in sizes.int().tolist()], dtype=torch.float32)


def test_crop_boxes_follow_random_resized_crop(drawn):
    params = torch.stack([sample.params for sample, _, _ in drawn])
    sizes = torch.tensor([sample.image.shape[-2:] for sample, _, _ in drawn], dtype=torch.float32)
    tolerance = 0.025  # per bin, about 4.5 standard errors of a difference with 6,000 boxes
    for group in RECIPE.groups:
        boxes = params[:, group.start:group.stop, TOP:WIDTH + 1].reshape(-1, 4)
        group_sizes = sizes.repeat_interleave(group.stop - group.start, dim=0)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= group_sizes).all()
        ours = box_histograms(boxes, group_sizes)
        theirs = box_histograms(reference_boxes(group_sizes, group.scale), group_sizes)
        for a, b in zip(ours, theirs):
            assert (a - b).abs().max() < tolerance, (group, a, b)
    # A slightly wrong aspect-ratio range, drawn by the same code, is caught.
    local = RECIPE.groups[1]
    group_sizes = sizes.repeat_interleave(2, dim=0)
    planted = torch.cat([crop_params.draw_boxes(int(h), int(w), 1, local.scale, (0.7, 1 / 0.7))
                         for h, w in group_sizes.int().tolist()])
    theirs = box_histograms(reference_boxes(group_sizes, local.scale), group_sizes)
    assert (box_histograms(planted, group_sizes)[1] - theirs[1]).abs().max() > tolerance


RECIPE_RATES = {  # per crop position: global 1, global 2, local, local
    FLIP: [0.5] * 4, JITTER_ON: [0.8] * 4, GRAY: [0.2] * 4,
    BLUR_ON: [1.0, 0.1, 0.5, 0.5], SOLARIZE_ON: [0.0, 0.2, 0.0, 0.0],
}


def test_random_op_rates_per_crop_position_are_the_recipes(drawn):
    params = torch.stack([sample.params for sample, _, _ in drawn])
    n = len(params)
    for column, expected in RECIPE_RATES.items():
        expected = torch.tensor(expected)
        tolerance = 4 * torch.sqrt(expected * (1 - expected) / n)  # 0 where p is 0 or 1
        assert ((params[:, :, column].mean(0) - expected).abs() <= tolerance).all(), column
    # 4 standard errors at n = 3000 stay below a 0.05 slip in any probability.
    assert 4 * math.sqrt(0.25 / n) < 0.05
    for column, low, high in ((BRIGHTNESS, 0.6, 1.4), (CONTRAST, 0.6, 1.4), (SATURATION, 0.8, 1.2),
                              (HUE, -0.1, 0.1), (SIGMA, 0.1, 2.0)):
        values = params[:, :, column].flatten()
        assert low <= values.min() and values.max() <= high
        assert abs(values.mean() - (low + high) / 2) < 0.02 * (high - low)
    order = params[:, :, ORDER:ORDER + 4].reshape(-1, 4)
    assert torch.equal(order.sort(dim=1).values, torch.arange(4.0).expand_as(order))
    slot_rates = torch.stack([(order == op).float().mean(0) for op in range(4)])
    assert (slot_rates - 0.25).abs().max() < 4 * math.sqrt(0.1875 / len(order))


# ---------------------------------------------------------------- each op against torchvision

def smooth_crops(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)


def random_params(count: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    params = torch.cat([draw_crop_params(64, 64, RECIPE) for _ in range(count // RECIPE.crops_number + 1)])
    return params[:count]


def torchvision_jitter(x: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op_index in row[ORDER:ORDER + 4].long().tolist():
        x = ops[op_index](x, float(row[BRIGHTNESS + op_index]))
    return x


def test_colour_jitter_matches_torchvision_in_each_crops_order():
    x, params = smooth_crops(48, 12), random_params(48)
    ours = colour_jitter(x.clone(), params)
    for crop, row, out in zip(x, params, ours):
        if row[JITTER_ON]:
            assert torch.allclose(out, torchvision_jitter(crop, row), atol=2e-5)
        else:
            assert torch.equal(out, crop)


def test_grayscale_blur_solarize_normalise_match_torchvision():
    x, params = smooth_crops(32, 16), random_params(32)
    for crop, row, gray, blurred, solarized in zip(
            x, params, grayscale(x, params), gaussian_blur(x, params, (0.1, 2.0)),
            solarize(x, params, RECIPE.solarize_threshold)):
        if row[GRAY]:
            assert torch.allclose(gray, TF.rgb_to_grayscale(crop, 3), atol=1e-6)
        else:
            assert torch.equal(gray, crop)
        if row[BLUR_ON]:
            assert torch.allclose(blurred, TF.gaussian_blur(crop, [13, 13], [float(row[SIGMA])] * 2),
                                  atol=1e-6)
        else:
            assert torch.equal(blurred, crop)
        assert torch.equal(solarized, TF.solarize(crop, 128 / 255) if row[SOLARIZE_ON] else crop)
    assert torch.allclose(normalise_(x.clone()), TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD), atol=1e-6)


def one_image_canvas(image: torch.Tensor) -> torch.Tensor:
    return device_augment.pad_to_canvas([image]).float()


def box_params(*boxes: tuple[int, int, int, int], flip: bool = False) -> torch.Tensor:
    params = torch.zeros(len(boxes), COLUMNS)
    params[:, [TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor(boxes, dtype=torch.float32)
    params[:, FLIP] = float(flip)
    return params


def test_cut_and_resize_samples_like_an_antialiased_resize():
    image = (smooth_crops(1, 80)[0] * 255).round().to(torch.uint8)[:, :, :70]
    canvas, size = one_image_canvas(image), 16
    reference = image.float() / 255
    # A box of the output size is a plain crop; twice the size is a 2x2 average.
    exact = cut_and_resize(canvas, box_params((3, 5, size, size), (8, 1, 2 * size, 2 * size)), 1, size)
    assert torch.equal(exact[0], reference[:, 3:3 + size, 5:5 + size])
    assert torch.allclose(exact[1], F.avg_pool2d(reference[None, :, 8:8 + 2 * size, 1:1 + 2 * size], 2)[0],
                          atol=1e-6)
    flipped = cut_and_resize(canvas, box_params((3, 5, size, size), flip=True), 1, size)
    assert torch.equal(flipped[0], exact[0].flip(-1))
    # Any other box: close to the CPU path's antialiased bicubic resized_crop.
    for box in ((5, 7, 50, 60), (0, 0, 80, 70), (10, 20, 12, 9)):
        ours = cut_and_resize(canvas, box_params(box), 1, 32)[0]
        theirs = TF.resized_crop(image, *box, [32, 32], interpolation=InterpolationMode.BICUBIC,
                                 antialias=True).float() / 255
        assert (ours - theirs).abs().mean() < 0.005, box


def test_whole_chain_matches_torchvision_step_by_step():
    """On pixel-aligned boxes (no resampling) every crop equals torchvision's ops applied in
    the recipe's order: crop, flip, jitter, grayscale, blur, solarize, normalise."""
    image = (smooth_crops(1, 60, seed=3)[0] * 255).round().to(torch.uint8)
    batch_size, crops_number = 6, RECIPE.crops_number
    params = random_params(batch_size * crops_number, seed=1).view(batch_size, crops_number, COLUMNS)
    for position, size in enumerate([GLOBAL_SIZE] * 2 + [LOCAL_SIZE] * 2):
        params[:, position, [TOP, LEFT, HEIGHT, WIDTH]] = torch.tensor([position * 3, 2, size, size],
                                                                       dtype=torch.float32)
    batch = DecodedBatch(device_augment.pad_to_canvas([image] * batch_size), params,
                         torch.tensor([[60, 60]] * batch_size), RECIPE)
    crops = augment_batch(batch)
    for position, size in enumerate([GLOBAL_SIZE] * 2 + [LOCAL_SIZE] * 2):
        for sample in range(batch_size):
            row = params[sample, position]
            x = image[:, position * 3:position * 3 + size, 2:2 + size].float() / 255
            x = x.flip(-1) if row[FLIP] else x
            x = torchvision_jitter(x, row) if row[JITTER_ON] else x
            x = TF.rgb_to_grayscale(x, 3) if row[GRAY] else x
            kernel = min(13, size - 1 if size % 2 == 0 else size)
            x = TF.gaussian_blur(x, [kernel, kernel], [float(row[SIGMA])] * 2) if row[BLUR_ON] else x
            x = TF.solarize(x, 128 / 255) if row[SOLARIZE_ON] else x
            x = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
            assert torch.allclose(crops[position][sample], x, atol=1e-4), (position, sample)


# ---------------------------------------------------------------- determinism

def test_a_samples_crops_are_bit_identical_in_any_batch(photos):
    dataset = MultiCropDataset(photos, CropParamSampler(RECIPE), seed=5)
    key = (3, 7)
    alone = augment_batch(collate_decoded([dataset[key]], RECIPE)[0])
    again = augment_batch(collate_decoded([dataset[key]], RECIPE)[0])
    others = [dataset[(0, index)] for index in (1, 11, 21, 31, 39)]
    mixed = augment_batch(collate_decoded(others[:3] + [dataset[key]] + others[3:], RECIPE)[0])
    first = augment_batch(collate_decoded([dataset[key]] + others[::-1], RECIPE)[0])
    for position in range(RECIPE.crops_number):
        assert torch.equal(alone[position][0], again[position][0])
        assert torch.equal(alone[position][0], mixed[position][3])
        assert torch.equal(alone[position][0], first[position][0])
    other_epoch = augment_batch(collate_decoded([dataset[(4, 7)]], RECIPE)[0])
    assert not torch.equal(alone[0], other_epoch[0])


def loader_crops(root: Path, workers: int, consumed: int = 0) -> list:
    loader, sampler, _ = build_train_loader(data_config(root, num_workers=workers), 4, rank=0,
                                            world_size=1, seed=3)
    sampler.set_epoch(2, consumed=consumed)
    return [(crops_on_device(batch, "cpu"), labels) for batch, labels, _ in loader]


def test_loader_gives_decoded_batches_that_resume_bit_exactly(photos):
    serial, parallel = loader_crops(photos, workers=0), loader_crops(photos, workers=1)
    resumed = loader_crops(photos, workers=0, consumed=8)
    assert len(serial) == len(parallel) == PHOTOS // 4 and len(resumed) == len(serial) - 2
    shapes = [(4, 3, GLOBAL_SIZE, GLOBAL_SIZE)] * 2 + [(4, 3, LOCAL_SIZE, LOCAL_SIZE)] * 2
    for (crops, labels), (crops_b, labels_b) in zip(serial, parallel):
        assert [tuple(c.shape) for c in crops] == shapes
        assert all(c.dtype == torch.float32 for c in crops)
        assert labels.tolist() == [-1] * 4 and torch.equal(labels, labels_b)
        assert all(torch.equal(a, b) for a, b in zip(crops, crops_b))
    for (crops, _), (crops_b, _) in zip(serial[2:], resumed):
        assert all(torch.equal(a, b) for a, b in zip(crops, crops_b))


def test_cpu_crop_lists_are_only_moved():
    crops = [torch.rand(2, 3, 8, 8), torch.rand(2, 3, 4, 4)]
    moved = crops_on_device(crops, torch.device("cpu"))
    assert all(a is b for a, b in zip(crops, moved))


# ---------------------------------------------------------------- the device never waits for the host

SYNCING_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def test_device_path_never_reads_a_tensor_on_the_host(drawn, monkeypatch):
    batch = collate_decoded(drawn[:8], RECIPE)[0]
    calls = collections.Counter()
    for name in SYNCING_METHODS:
        original = getattr(torch.Tensor, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counted)
    bool(torch.tensor(True))  # the counters do count
    assert calls == {"__bool__": 1}
    calls.clear()
    crops = crops_on_device(batch, "cpu")
    assert calls == {} and len(crops) == RECIPE.crops_number


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_path_queues_without_a_cuda_synchronisation(drawn):
    batch = collate_decoded(drawn[:8], RECIPE)[0].pin_memory()
    torch.cuda.set_sync_debug_mode("error")
    try:
        crops = crops_on_device(batch, torch.device("cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    reference = augment_batch(batch)
    assert all(torch.allclose(a.cpu(), b, atol=1e-4) for a, b in zip(crops, reference))


def test_decoded_batch_is_pinned_by_the_data_loader(drawn, monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self)
    batch = collate_decoded(drawn[:3], RECIPE)
    out = pin_memory(batch)
    assert isinstance(out[0], DecodedBatch) and len(out[0]) == 3
    assert any(t is batch[0].images for t in pinned) and any(t is batch[0].params for t in pinned)


# ---------------------------------------------------------------- large images, bad settings, bench

def test_large_image_is_shrunk_in_the_loader_without_changing_its_crops():
    big = (smooth_crops(1, 640, seed=2)[0] * 255).round().to(torch.uint8)[:, :480]
    torch.manual_seed(0)
    sample = CropParamSampler(RECIPE)(big)
    torch.manual_seed(0)
    full_params = draw_crop_params(480, 640, RECIPE)
    assert sample.image.shape[-1] < 640 / 2
    spare = torch.minimum(sample.params[:, HEIGHT], sample.params[:, WIDTH]) / RECIPE.output_sizes()
    assert spare.min() >= crop_params.SHRINK_TO * 0.99
    shrunk = augment_batch(collate_decoded([(sample, 0, 0)], RECIPE)[0])
    full = augment_batch(collate_decoded([(crop_params.DecodedSample(big, full_params), 0, 0)], RECIPE)[0])
    for a, b in zip(shrunk, full):
        assert (a - b).abs().mean() < 0.02


def test_data_bench_measures_decode_and_draw_for_the_gpu_path(photos):
    from dino_dist.bench.data_bench import run_data_benchmark

    report = run_data_benchmark(data_config(), photos, images_per_round=4, rounds=1)
    assert report["augment_on"] == "gpu" and report["project_images_per_s_per_worker"] > 0
