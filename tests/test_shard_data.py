"""Shard sets as datasets, in-process: read back sample for sample, brace patterns, the order
each data.order gives, bad samples skipped and named, evaluation sets with labels, and every
problem with a shard set found when the run starts, in one line."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dino_dist.config import DataConfig
from dino_dist.data import LabelledImageDataset, build_train_loader, eval_transform, open_images
from dino_dist.data.images import decode_bytes
from dino_dist.data.order import GlobalOrder, ShardWindowOrder
from dino_dist.data.shard_images import ShardImages
from dino_dist.data.shard_set import expand_braces, split_location
from dino_dist.data.shard_store import S3Store, with_retries
from dino_dist.errors import DataError
from tests.conftest import REPO, subprocess_env, tiny_overrides
from tests.test_shard_training import PER_SHARD, SAMPLES, png_bytes, write_shards

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(tmp_path_factory.mktemp("shard_data") / "set")


def data_config(path, **overrides) -> DataConfig:
    settings = dict(path=str(path), num_workers=0, global_crop_size=16, local_crops_number=2,
                    local_crop_size=8)
    settings.update(overrides)
    return DataConfig(**settings)


def test_every_sample_reads_back_with_its_bytes_and_label(shards):
    images = open_images(shards)
    assert isinstance(images, ShardImages) and len(images) == SAMPLES
    for position in range(SAMPLES):
        # webdataset.ShardWriter writes in order, so position i is the i-th sample written.
        assert images.label(position) == position
        assert images.shards.read_image_bytes(position) == png_bytes(position)
        assert torch.equal(images.decode(position), decode_bytes(png_bytes(position)))
    assert images.name(5).endswith("000000.tar:sample0005")


def test_a_batch_is_fetched_together_and_decodes_the_same(shards):
    images = open_images(shards)
    batch = [3, 17, 40, 41]
    images.prefetch(batch)
    assert sorted(images._fetched) == batch
    assert all(torch.equal(images.decode(p), decode_bytes(png_bytes(p))) for p in batch)
    assert images._fetched == {}


def test_brace_patterns_select_shards_in_one_folder(shards):
    assert expand_braces("a{08..10}b{x,y}") == ["a08bx", "a08by", "a09bx", "a09by", "a10bx", "a10by"]
    assert split_location("s3://b/p/{0..3}.tar") == ("s3://b/p", "{0..3}.tar")
    assert split_location("/data/set/") == ("/data/set", None)
    images = open_images(f"{shards}/{{000001..000002}}.tar")
    assert len(images) == 2 * PER_SHARD
    assert [images.label(p) for p in range(len(images))] == list(range(PER_SHARD, 3 * PER_SHARD))
    with pytest.raises(DataError, match="only select shard names inside one folder"):
        open_images(f"{shards}/{{a,b}}/000000.tar")
    with pytest.raises(DataError, match="does not list"):
        open_images(f"{shards}/{{000005..000007}}.tar")


@pytest.mark.parametrize("order", ["random", "shard_windows"])
def test_the_loader_covers_every_sample_once_an_epoch_in_the_configured_order(shards, order):
    cfg = data_config(shards, order=order, window_shards=2)
    seen = []
    for rank in range(2):
        loader, sampler, _ = build_train_loader(cfg, batch_size=4, rank=rank, world_size=2, seed=3)
        expected = GlobalOrder if order == "random" else ShardWindowOrder
        assert isinstance(sampler.order, expected)
        sampler.set_epoch(1)
        seen += [label for _, labels, _ in loader for label in labels.tolist()]
    assert sorted(seen) == list(range(SAMPLES))
    if order == "shard_windows":  # each batch of 4 comes from one window of 2 shards
        loader, sampler, _ = build_train_loader(cfg, batch_size=8, rank=0, world_size=1, seed=3)
        sampler.set_epoch(0)
        for _, labels, _ in loader:
            assert len({label // PER_SHARD for label in labels.tolist()}) <= 2


def test_shard_windows_on_a_folder_is_refused(tmp_path):
    from tests.conftest import write_image_folder
    with pytest.raises(DataError, match="data.order=shard_windows needs a shard set"):
        build_train_loader(data_config(write_image_folder(tmp_path / "f"), order="shard_windows"),
                           batch_size=4, rank=0, world_size=1, seed=0)


def test_unreadable_sample_is_skipped_counted_and_named_with_shard_and_key(tmp_path):
    shards = write_shards(tmp_path / "bad", bad=(9,))
    cfg = data_config(shards)
    loader, sampler, dataset = build_train_loader(cfg, batch_size=SAMPLES, rank=0, world_size=1, seed=0)
    with pytest.warns(UserWarning, match=r"000001\.tar:sample0009"):
        (_, labels, skipped), = list(loader)
    assert skipped == 1 and 9 not in labels.tolist() and labels.tolist().count(10) == 2


def test_labelled_shards_serve_evaluation(shards, tmp_path):
    labelled = LabelledImageDataset(shards, eval_transform(16))
    assert len(labelled) == SAMPLES and labelled.classes == [str(c) for c in range(SAMPLES)]
    image, label = labelled[7]
    assert image.shape == (3, 16, 16) and label == 7
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    import webdataset
    with webdataset.ShardWriter(str(unlabelled / "%06d.tar"), maxcount=8, verbose=0) as sink:
        for i in range(4):
            sink.write({"__key__": f"u{i}", "png": png_bytes(i)})
    from dino_dist.data.shard_scan import index_shards
    from dino_dist.data.shard_store import LocalStore
    index_shards(LocalStore(unlabelled), workers=1, progress=False)
    with pytest.raises(DataError, match="has no labels"):
        LabelledImageDataset(unlabelled, eval_transform(16))


def copy_of(shards, tmp_path):
    return shutil.copytree(shards, tmp_path / "copy")


@pytest.mark.parametrize("problem, message", [
    ("no index", "has no shard index.*dino-shard --index"),
    ("missing shard", "000003.tar' is listed in the index but missing"),
    ("changed shard", "000002.tar' has .* bytes, the index says"),
    ("bad index", "is not a dino_dist shard index"),
])
def test_a_bad_shard_set_is_one_clear_error(shards, tmp_path, problem, message):
    broken = copy_of(shards, tmp_path)
    if problem == "no index":
        shutil.rmtree(broken / "dino-index")
    elif problem == "missing shard":
        (broken / "000003.tar").unlink()
    elif problem == "changed shard":
        with open(broken / "000002.tar", "ab") as f:
            f.write(b"\0" * 512)
    else:
        (broken / "dino-index" / "shards.json").write_text("{}")
    with pytest.raises(DataError, match=message) as caught:
        build_train_loader(data_config(broken), batch_size=4, rank=0, world_size=1, seed=0)
    assert "\n" not in str(caught.value)


def test_dino_train_stops_before_its_first_step_on_a_missing_shard(shards, tmp_path):
    broken = copy_of(shards, tmp_path)
    (broken / "000004.tar").unlink()
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dino_dist.train", *tiny_overrides(broken, out)],
                            cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "000004.tar" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_storage_that_keeps_failing_is_retried_then_one_error_naming_the_shard(monkeypatch):
    attempts = []

    def failing():
        attempts.append(time.monotonic())
        raise ConnectionResetError("reset by peer")
    with pytest.raises(DataError, match=r"reading shard 's3://b/p/000007.tar': gave up after 3 attempts.*resumes"):
        with_retries("reading shard 's3://b/p/000007.tar'", failing, delays=(0.01, 0.02))
    assert len(attempts) == 3
    # A real endpoint that is down: the store's own read ends in the same one-line error.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    store = S3Store("s3://bucket/prefix", retry_s=0.01)
    with pytest.raises(DataError, match=r"s3://bucket/prefix/000001.tar"):
        store.read("000001.tar", 0, 10)


def test_flaky_reads_recover_without_an_error():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("slow network")
        return b"data"
    assert with_retries("reading shard 'x'", flaky, delays=(0.0, 0.0, 0.0)) == b"data"
    assert len(calls) == 3


def test_a_bug_is_not_retried_as_if_the_network_failed():
    calls = []

    def buggy():
        calls.append(1)
        raise TypeError("an argument the client does not take")
    with pytest.raises(TypeError):
        with_retries("reading shard 'x'", buggy, delays=(0.0, 0.0))
    assert len(calls) == 1


def test_a_feature_cache_tells_shard_sets_apart(shards, tmp_path):
    # dino-linear names its feature cache by what the images are: another selection of shards,
    # or the same names with other contents, must not reuse it.
    whole = LabelledImageDataset(shards, eval_transform(16)).images.identity
    assert LabelledImageDataset(shards, eval_transform(16)).images.identity == whole
    part = LabelledImageDataset(f"{shards}/{{000000..000002}}.tar", eval_transform(16)).images.identity
    assert part != whole
    other = write_shards(tmp_path / "other", bad=(0,))
    assert LabelledImageDataset(other, eval_transform(16)).images.identity[1] != whole[1]


def test_the_data_benchmark_times_a_shard_set(shards, capsys):
    from dino_dist.cli.bench import main

    assert main(["--data-only", "--images", str(shards), "--rounds", "1", "--images-per-round", "4",
                 "data.global_crop_size=32", "data.local_crop_size=16", "data.local_crops_number=2"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["source"] == "shards" and report["images"] == str(shards)
    assert report["project_images_per_s_per_worker"] > 0 and "speedup_vs_reference" not in report
