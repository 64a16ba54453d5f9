"""Tests for dino_dist.data: augmentation, folders, sampler, demo data and the loader."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dino_dist.config import DataConfig
from dino_dist.data import (
    CropRecipe,
    DataError,
    LabelledImageDataset,
    MultiCropAugmentation,
    MultiCropDataset,
    ShardedEpochSampler,
    build_train_loader,
    collate_multicrop,
    ensure_demo_dataset,
    eval_transform,
    find_images,
    resolve_data_root,
    sample_seed,
)
from dino_dist.data.recipe import IMAGENET_MEAN, IMAGENET_STD
from dino_dist.data import demo
from dino_dist.data.demo import CLASS_FOLDERS

GLOBAL_SIZE, LOCAL_SIZE = 24, 12

# torchvision 0.29 deprecates its decoders in favour of torchcodec; the data code
# still uses them on purpose, so the notice is noise here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def small_augmentation(n_global: int = 2, n_local: int = 3) -> MultiCropAugmentation:
    recipe = CropRecipe(n_global, GLOBAL_SIZE, (0.4, 1.0), n_local, LOCAL_SIZE, (0.05, 0.4))
    return MultiCropAugmentation(recipe, batched=False)


def write_image(path: Path, seed: int, size: int = 20, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def make_image_folder(root: Path, classes: int = 2, per_class: int = 6) -> Path:
    for label in range(classes):
        for number in range(per_class):
            write_image(root / f"class_{label}" / f"{number}.png", seed=label * 100 + number)
    return root


def data_config(path: str | Path, **overrides) -> DataConfig:
    settings = dict(
        path=str(path), num_workers=0, global_crops_number=2, global_crop_size=GLOBAL_SIZE,
        global_crops_scale=[0.4, 1.0], local_crops_number=3, local_crop_size=LOCAL_SIZE,
        local_crops_scale=[0.05, 0.4], blur_sigma=[0.1, 2.0], demo_dir="", prefetch_factor=2,
        batched_crops=False, augment_on="cpu",
    )
    settings.update(overrides)
    return DataConfig(**settings)


# ---------------------------------------------------------------- augmentation

def test_crops_have_expected_count_size_dtype_and_normalisation():
    torch.manual_seed(0)
    grey = torch.full((3, 40, 40), 128, dtype=torch.uint8)
    augmentation = small_augmentation(n_global=2, n_local=3)
    crops = augmentation(grey)
    assert len(crops) == 5 == len(augmentation)
    assert [tuple(c.shape) for c in crops] == [(3, GLOBAL_SIZE, GLOBAL_SIZE)] * 2 + [(3, LOCAL_SIZE, LOCAL_SIZE)] * 3
    assert all(c.dtype == torch.float32 for c in crops)
    # On uniform grey only the brightness jitter changes pixels (crop 1 is never
    # solarized), and its factor has median 1, so the median crop value must be
    # (128/255 - mean) / std: this fails without Normalize or without the /255 scale.
    expected = (128 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    first_crop_means = torch.stack([augmentation(grey)[0].mean(dim=(1, 2)) for _ in range(50)])
    assert torch.allclose(first_crop_means.median(dim=0).values, expected, atol=0.2)


def test_eval_transform_output_shape_and_dtype():
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    out = eval_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_sample_seed_changes_with_each_input_and_fits_63_bits():
    base = sample_seed(0, 1, 2)
    assert base == sample_seed(0, 1, 2)
    assert len({base, sample_seed(1, 1, 2), sample_seed(0, 2, 2), sample_seed(0, 1, 3), sample_seed(0, 2, 1)}) == 5
    assert all(0 <= sample_seed(s, e, i) < 2**63 for s, e, i in [(0, 0, 0), (2**40, 7, 10**9), (-5, 0, 1)])


# ---------------------------------------------------------------- dataset determinism

@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images", classes=2, per_class=6)


def test_crops_depend_only_on_seed_epoch_index(image_folder):
    dataset = MultiCropDataset(image_folder, small_augmentation(), seed=7)
    first, label, skipped = dataset[(3, 5)]
    torch.rand(1000)  # whatever ran before must not matter
    again, _, _ = dataset[(3, 5)]
    assert label == dataset.images.labels[5] and skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    other_epoch, _, _ = dataset[(4, 5)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_epoch))
    other_seed, _, _ = MultiCropDataset(image_folder, small_augmentation(), seed=8)[(3, 5)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other_seed))


def test_getitem_leaves_caller_rng_untouched(image_folder):
    dataset = MultiCropDataset(image_folder, small_augmentation(), seed=0)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    dataset[(0, 1)]
    assert torch.equal(torch.get_rng_state(), state)


def loader_batches(root: Path, workers: int, batch_size: int = 4, batched: bool = False) -> list:
    cfg = data_config(root, num_workers=workers, batched_crops=batched)
    loader, sampler, _ = build_train_loader(cfg, batch_size, rank=0, world_size=1, seed=3)
    sampler.set_epoch(2)
    return list(loader)


@pytest.mark.parametrize("batched", [False, True])
def test_loader_crops_identical_with_0_and_2_workers(image_folder, batched):
    serial = loader_batches(image_folder, workers=0, batched=batched)
    parallel = loader_batches(image_folder, workers=2, batched=batched)
    assert len(serial) == len(parallel) == 3
    for (crops_a, labels_a, skipped_a), (crops_b, labels_b, skipped_b) in zip(serial, parallel):
        assert torch.equal(labels_a, labels_b) and skipped_a == skipped_b == 0
        assert len(crops_a) == 5
        assert crops_a[0].shape == (4, 3, GLOBAL_SIZE, GLOBAL_SIZE)
        assert crops_a[4].shape == (4, 3, LOCAL_SIZE, LOCAL_SIZE)
        assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b))


def test_collate_multicrop_stacks_per_crop_position():
    sample = ([torch.zeros(3, 4, 4), torch.ones(3, 2, 2)], 1, 0)
    crops, labels, skipped = collate_multicrop([sample, (sample[0], 0, 2)])
    assert [tuple(c.shape) for c in crops] == [(2, 3, 4, 4), (2, 3, 2, 2)]
    assert labels.tolist() == [1, 0] and labels.dtype == torch.long and skipped == 2


# ---------------------------------------------------------------- sampler

def epoch_indices(sampler: ShardedEpochSampler, epoch: int, consumed: int = 0) -> list[int]:
    sampler.set_epoch(epoch, consumed=consumed)
    keys = list(sampler)
    assert len(keys) == len(sampler) and all(e == epoch for e, _ in keys)
    return [index for _, index in keys]


def test_two_ranks_cover_the_one_rank_epoch_without_overlap():
    single = epoch_indices(ShardedEpochSampler(20, 1, 0, seed=5), epoch=1)
    rank0 = epoch_indices(ShardedEpochSampler(20, 2, 0, seed=5), epoch=1)
    rank1 = epoch_indices(ShardedEpochSampler(20, 2, 1, seed=5), epoch=1)
    assert sorted(single) == list(range(20))
    assert not set(rank0) & set(rank1)
    assert set(rank0) | set(rank1) == set(single)


def test_uneven_length_drops_the_tail_instead_of_padding():
    ranks = [ShardedEpochSampler(11, 3, r, seed=0) for r in range(3)]
    seen = [epoch_indices(s, epoch=0) for s in ranks]
    assert all(len(indices) == 3 == s.samples_per_rank for indices, s in zip(seen, ranks))
    flat = [i for indices in seen for i in indices]
    assert len(flat) == len(set(flat)) == 9


def test_consumed_skips_the_first_samples_of_all_ranks():
    sampler = ShardedEpochSampler(20, 2, 1, seed=5)
    full = epoch_indices(sampler, epoch=3)
    resumed = epoch_indices(sampler, epoch=3, consumed=8)  # 4 per rank already seen
    assert resumed == full[4:] and len(sampler) == 6 and sampler.samples_per_rank == 10


@pytest.mark.parametrize("old_world, new_world, consumed", [(2, 1, 8), (2, 3, 6), (1, 2, 7), (3, 2, 9)])
def test_resharded_rest_of_epoch_neither_repeats_nor_skips(old_world, new_world, consumed):
    n, seed, epoch = 23, 4, 1
    order = epoch_indices(ShardedEpochSampler(n, 1, 0, seed=seed), epoch)
    before = [epoch_indices(ShardedEpochSampler(n, old_world, r, seed=seed), epoch)
              for r in range(old_world)]
    seen = [i for k in range(consumed // old_world) for r in range(old_world) for i in [before[r][k]]]
    after = [epoch_indices(ShardedEpochSampler(n, new_world, r, seed=seed), epoch, consumed)
             for r in range(new_world)]
    rest = [i for indices in after for i in indices]
    assert not set(seen) & set(rest) and len(set(rest)) == len(rest)
    # Only the tail that does not divide by the new world size is dropped, as in any epoch.
    assert set(seen) | set(rest) == set(order[:consumed + len(rest)])
    assert n - consumed - len(rest) < new_world


def test_permutation_changes_between_epochs():
    sampler = ShardedEpochSampler(50, 1, 0, seed=5)
    assert epoch_indices(sampler, 0) != epoch_indices(sampler, 1)
    assert epoch_indices(sampler, 1) == epoch_indices(ShardedEpochSampler(50, 1, 0, seed=5), 1)


def test_world_2_batch_b_matches_world_1_batch_2b():
    b = 3
    single = epoch_indices(ShardedEpochSampler(25, 1, 0, seed=9), epoch=2)
    per_rank = [epoch_indices(ShardedEpochSampler(25, 2, r, seed=9), epoch=2) for r in range(2)]
    for k in range(len(per_rank[0]) // b):
        global_batch = per_rank[0][k * b:(k + 1) * b] + per_rank[1][k * b:(k + 1) * b]
        assert sorted(global_batch) == sorted(single[k * 2 * b:(k + 1) * 2 * b])


def test_sampler_rejects_bad_rank_and_replicas():
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, 2, 2, seed=0)
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, 0, 0, seed=0)
    with pytest.raises(ValueError):
        ShardedEpochSampler(10, 2, 0, seed=0).set_epoch(0, consumed=11)


# ---------------------------------------------------------------- folders

def test_image_folder_tree_is_found_recursively_with_sorted_classes(tmp_path):
    write_image(tmp_path / "b_dog" / "nested" / "x.JPG", 1, fmt="JPEG")
    write_image(tmp_path / "a_cat" / "1.png", 2)
    write_image(tmp_path / "a_cat" / "2.bmp", 3)
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    files, labels, classes = find_images(tmp_path)
    assert classes == ["a_cat", "b_dog"]
    assert labels == [0, 0, 1]
    assert [Path(f).name for f in files] == ["1.png", "2.bmp", "x.JPG"]
    # A bmp goes through the PIL fallback; every file must decode to crops.
    dataset = MultiCropDataset(tmp_path, small_augmentation(), seed=0)
    assert all(dataset[(0, i)][2] == 0 for i in range(len(dataset)))


def test_plain_folder_of_images_has_no_labels(tmp_path):
    for number in range(3):
        write_image(tmp_path / f"{number}.png", number)
    files, labels, classes = find_images(tmp_path)
    assert len(files) == 3 and labels == [-1, -1, -1] and classes == []
    with pytest.raises(DataError, match="one sub-folder per class"):
        LabelledImageDataset(tmp_path, eval_transform(16))


@pytest.mark.parametrize("problem", ["missing", "empty", "file"])
def test_bad_data_path_raises_one_line_data_error(tmp_path, problem):
    target = tmp_path / "data"
    if problem == "empty":
        target.mkdir()
    elif problem == "file":
        target.write_text("x")
    with pytest.raises(DataError) as caught:
        resolve_data_root(data_config(target))
    message = str(caught.value)
    assert "\n" not in message and str(target) in message and "data.path" in message
    assert isinstance(caught.value, ValueError)


def test_corrupt_image_is_skipped_warned_about_and_counted(tmp_path):
    make_image_folder(tmp_path, classes=1, per_class=3)
    bad = tmp_path / "class_0" / "broken.jpg"
    bad.write_bytes(b"definitely not a jpeg" * 10)
    dataset = MultiCropDataset(tmp_path, small_augmentation(), seed=0)
    bad_index = dataset.images.files.index(str(bad))
    with pytest.warns(UserWarning, match="broken.jpg"):
        crops, label, skipped = dataset[(0, bad_index)]
    assert skipped == 1 and len(crops) == 5
    replacement, _, _ = dataset[(0, bad_index)]
    assert all(torch.equal(a, b) for a, b in zip(crops, replacement))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a second warning for the same file raises here
        assert dataset[(1, bad_index)][2] == 1


def test_labelled_dataset_returns_transformed_images_and_labels(image_folder):
    dataset = LabelledImageDataset(image_folder, eval_transform(16))
    image, label = dataset[7]
    assert image.shape == (3, 16, 16) and label == 1 and dataset.classes == ["class_0", "class_1"]


# ---------------------------------------------------------------- demo data

def test_demo_dataset_is_generated_once_and_reused(tmp_path, monkeypatch):
    root = ensure_demo_dataset(tmp_path, progress=False, per_class_train=3, per_class_val=2)
    for split, per_class in (("train", 3), ("val", 2)):
        files, labels, classes = find_images(root / split)
        assert classes == CLASS_FOLDERS and len(classes) == 10
        assert len(files) == 10 * per_class
        with Image.open(files[0]) as image:
            assert image.format == "PNG" and image.size == (48, 48) and image.mode == "RGB"
    marker = root / "train" / CLASS_FOLDERS[0] / "0000.png"
    mtime = marker.stat().st_mtime_ns

    def must_not_generate(*args):
        raise AssertionError("demo data generated a second time")

    monkeypatch.setattr(demo, "_generate", must_not_generate)
    assert ensure_demo_dataset(tmp_path, progress=False, per_class_train=3, per_class_val=2) == root
    assert marker.stat().st_mtime_ns == mtime
    monkeypatch.undo()
    other = ensure_demo_dataset(tmp_path, progress=False, per_class_train=2, per_class_val=2)
    assert other != root
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp folder renamed away


def test_demo_generation_is_deterministic(tmp_path):
    first = ensure_demo_dataset(tmp_path / "a", progress=False, per_class_train=1, per_class_val=1)
    second = ensure_demo_dataset(tmp_path / "b", progress=False, per_class_train=1, per_class_val=1)
    for folder in CLASS_FOLDERS:
        path = Path("train", folder, "0000.png")
        assert (first / path).read_bytes() == (second / path).read_bytes()


def test_demo_leftover_temp_folder_is_ignored(tmp_path):
    name = f"demo-v{demo.GENERATOR_VERSION}-train2-val1"
    leftover = tmp_path / f".{name}.tmp-otherhost-99999"
    (leftover / "train" / "junk").mkdir(parents=True)
    root = ensure_demo_dataset(tmp_path, progress=False, per_class_train=2, per_class_val=1)
    assert root.name == name
    assert sorted(os.listdir(root / "train")) == CLASS_FOLDERS


def test_demo_rename_race_loser_uses_the_winners_folder(tmp_path, monkeypatch):
    real_generate = demo._generate

    def generate_while_another_rank_finishes(target, per_split, progress, version):
        real_generate(target, per_split, progress, version)
        winner = tmp_path / f"demo-v{demo.GENERATOR_VERSION}-train1-val1"
        real_generate(winner, per_split, progress, version)
        (winner / "winner").touch()

    monkeypatch.setattr(demo, "_generate", generate_while_another_rank_finishes)
    root = ensure_demo_dataset(tmp_path, progress=False, per_class_train=1, per_class_val=1)
    assert (root / "winner").exists()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # the loser's temp folder is gone


def test_demo_classes_differ_in_shape_not_in_colour(tmp_path):
    root = ensure_demo_dataset(tmp_path, progress=False, per_class_train=20, per_class_val=1)
    files, labels, _ = find_images(root / "train")
    pixels = np.stack([np.asarray(Image.open(f), dtype=np.float32) for f in files])
    labels = np.array(labels)
    class_means = np.stack([pixels[labels == c].mean(axis=(0, 1, 2)) for c in range(10)])
    # Every class is grey: no colour channel tells the label.
    assert np.ptp(class_means, axis=1).max() < 3
    # Images of one class are not copies: shapes move, scale and turn.
    assert pixels[labels == 0].std(axis=0).mean() > 30


def test_demo_version_3_draws_version_2_shapes_in_one_polarity(tmp_path):
    old = ensure_demo_dataset(tmp_path, progress=False, per_class_train=6, per_class_val=1,
                              version=2)
    new = ensure_demo_dataset(tmp_path, progress=False, per_class_train=6, per_class_val=1)
    assert (old.name, new.name) == ("demo-v2-train6-val1", "demo-v3-train6-val1")
    inverted = 0
    for path in sorted(old.glob("train/*/*.png")):
        before = np.asarray(Image.open(path), dtype=np.float32)
        after = np.asarray(Image.open(new / path.relative_to(old)), dtype=np.float32)
        assert np.median(after[0]) < 128  # always a dark ground: the top row is ground
        if np.median(before[0]) > 128:  # version 2 drew it on a light ground: inverted
            inverted += 1
            # The same shape, inverted (its pixel noise is not: not bit for bit).
            assert np.corrcoef(255 - before.ravel(), after.ravel())[0, 1] > 0.9
        else:
            assert np.array_equal(before, after)
    assert 10 <= inverted <= 50  # about half of the 60 images


def test_demo_path_resolves_to_train_split(tmp_path, monkeypatch):
    monkeypatch.setattr("dino_dist.data.loader.ensure_demo_dataset",
                        lambda root: ensure_demo_dataset(root, progress=False, per_class_train=2, per_class_val=1))
    cfg = data_config("demo", demo_dir=str(tmp_path))
    loader, sampler, dataset = build_train_loader(cfg, batch_size=4, rank=1, world_size=2, seed=0)
    assert dataset.images.root.name == "train" and len(dataset) == 20 and dataset.images.classes == CLASS_FOLDERS
    assert len(sampler) == 10 and len(loader) == 2
