"""dino-shard: shards and their index from an image folder, the index of shards that other
tools wrote (a local folder and S3), resuming after a kill, and one-line errors.

Every check reads samples back through the index, byte for byte, as the trainer will."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dino_dist.cli.shard import main
from dino_dist.data.shard_index import SHARDS_FILE, read_index
from dino_dist.data.shard_scan import PARTS_DIR, index_shards, scan_tar
from dino_dist.data.shard_store import LocalStore, S3Store, open_store
from dino_dist.errors import DataError
from tests.conftest import REPO, subprocess_env
from tests.s3_server import start_s3_server

CLASSES = ("cat", "dog", "fish")
FORMATS = ((".jpg", "JPEG"), (".png", "PNG"), (".JPEG", "JPEG"))


def encoded(rng: np.random.Generator, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def make_images(root: Path, per_class: int = 7, labelled: bool = True, seed: int = 0) -> dict[str, bytes]:
    """Real JPEG and PNG files (some named `.JPEG`), each different; {path: bytes}."""
    rng, images = np.random.default_rng(seed), {}
    for name in CLASSES:
        folder = root / name if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            suffix, fmt = FORMATS[i % len(FORMATS)]
            path = folder / f"{name}_{i:02d}{suffix}"
            path.write_bytes(encoded(rng, fmt))
            images[str(path)] = path.read_bytes()
    return images


def read_back(store, cache_dir: Path | None = None) -> list[tuple[str, str, bytes, int]]:
    """(shard, key, image bytes, label) of every indexed sample, in index order."""
    store = open_store(str(store)) if isinstance(store, (str, Path)) else store
    index = read_index(store, cache_dir=cache_dir)
    rows, starts = [], index.shard_starts
    for shard, start, end in zip(index.shards, starts[:-1], starts[1:]):
        for row in range(start, end):
            offset, size, label = index.samples[row].tolist()
            rows.append((shard.name, index.keys[row].decode(), store.read(shard.name, offset, size), label))
    return rows


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.tar"))}


def dino_shard_script() -> str:
    return shutil.which("dino-shard", path=str(Path(sys.executable).parent)) or "dino-shard"


@pytest.fixture(scope="module")
def folder_shards(tmp_path_factory) -> tuple[Path, Path, dict[str, bytes], str, str]:
    """An ImageFolder written as shards of 5 in this process, progress bars shown:
    (source, shards, {source file: bytes}, stdout, stderr)."""
    root = tmp_path_factory.mktemp("folder_shards")
    images = make_images(root / "src")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main([str(root / "src"), str(root / "out"), "--samples-per-shard", "5", "--workers", "2"]) == 0
    return root / "src", root / "out", images, out.getvalue(), err.getvalue()


def test_image_folder_reads_back_every_image_once_with_its_label(folder_shards):
    src, out, images, printed, progress = folder_shards
    assert "writing" in progress and "indexing" in progress
    assert printed.startswith(f"wrote {out}: 5 shards, 21 samples, ") and printed.count("\n") == 1

    rows = read_back(out)
    source_of = {data: path for path, data in images.items()}
    sources = [source_of[data] for _, _, data, _ in rows]  # each row is an original file's bytes
    assert sorted(sources) == sorted(images)
    assert [label for *_, label in rows] == [CLASSES.index(Path(p).parent.name) for p in sources]
    assert [key for _, key, _, _ in rows] == [f"{n:09d}" for n in range(21)]
    index = read_index(open_store(str(out)))
    assert index.classes == list(CLASSES)
    assert [s.name for s in index.shards] == [f"{n:06d}.tar" for n in range(5)]
    for shard in index.shards[:-1]:  # a random order: no full shard holds one class only
        assert len({label for name, _, _, label in rows if name == shard.name}) > 1
    with tarfile.open(out / "000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["000000000" + Path(sources[0]).suffix.lower(), "000000000.cls"]
    assert not (out / PARTS_DIR).exists()


def test_console_script_writes_the_same_bytes(folder_shards, tmp_path):
    src, out, *_ = folder_shards
    result = subprocess.run([dino_shard_script(), str(src), str(tmp_path / "again"), "--samples-per-shard",
                             "5", "--quiet"], cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.startswith("wrote ") and result.stdout.count("\n") == 1
    assert shard_bytes(tmp_path / "again") == shard_bytes(out)
    assert read_back(tmp_path / "again") == read_back(out)


def test_plain_folder_has_no_labels(tmp_path):
    images = make_images(tmp_path / "src", per_class=2, labelled=False)
    assert main([str(tmp_path / "src"), str(tmp_path / "out"), "--quiet"]) == 0
    rows = read_back(tmp_path / "out")
    assert sorted(data for _, _, data, _ in rows) == sorted(images.values())
    assert {label for *_, label in rows} == {-1}
    assert read_index(open_store(str(tmp_path / "out"))).classes is None
    with tarfile.open(tmp_path / "out" / "000000.tar") as tar:
        assert not [name for name in tar.getnames() if name.endswith(".cls")]


def build_tar(members: list[tarfile.TarInfo | tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                info = tarfile.TarInfo(member[0])
                info.size = len(member[1])
                tar.addfile(info, io.BytesIO(member[1]))
    return buffer.getvalue()


def special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_scan_tar_follows_webdataset_grouping(fmt):
    long_key = "a/" + "x" * 120
    data = build_tar([
        special("a", tarfile.DIRTYPE),
        (f"{long_key}.jpg", b"long-jpeg"), (f"{long_key}.cls", b" 3\n"),
        ("__index__/list.txt", b"metadata"),
        ("b.txt", b"caption"), ("b.input.JPG", b"b-jpeg"), ("b.cls", b"oops"),
        (".hidden.png", b"resource fork"),
        ("c.txt", b"no image"),
        ("d.png", b"d-png"), ("d.jpg", b"d-jpeg"), ("d.cls", b"12"),
        ("e.PNG", b"e-png"),
        special("f.jpg", tarfile.SYMTYPE, "d.png"),
    ], fmt)
    with pytest.warns(UserWarning, match="1 samples have a .cls that is not an integer.*'b'"):
        scanned = scan_tar(io.BytesIO(data), "test.tar")
    assert scanned.keys == [long_key, "b", "d", "e"]
    assert scanned.labels == [3, -1, 12, -1]
    assert scanned.skipped == 1
    images = [data[o:o + s] for o, s in zip(scanned.offsets, scanned.sizes)]
    assert images == [b"long-jpeg", b"b-jpeg", b"d-png", b"e-png"]


def write_wds_shards(folder: Path) -> list[dict]:
    """Shards as webdataset.ShardWriter writes them (GNU headers for the long key)."""
    import webdataset

    rng, samples = np.random.default_rng(1), []
    for n in range(11):
        key = f"deep/{'long' * 30}{n}" if n == 4 else f"sample{n:03d}"
        image_type, fmt = ("png", "PNG") if n % 3 == 0 else ("jpg", "JPEG")
        samples.append({"__key__": key, image_type: encoded(rng, fmt), "cls": n % 4})
    samples[6] = {"__key__": "sample006", "txt": "no image in this one"}
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "part-%06d.tar"), maxcount=4, verbose=0,
                                format="GNU_FORMAT") as writer:
        for sample in samples:
            writer.write(sample)
    return samples


def with_image(samples: list[dict]) -> list[tuple[str, bytes]]:
    return [(s["__key__"], s.get("jpg", s.get("png"))) for s in samples if "jpg" in s or "png" in s]


def test_index_of_shardwriter_shards_matches_what_webdataset_reads(tmp_path, capsys):
    import webdataset

    samples = write_wds_shards(tmp_path / "wds")
    assert main(["--index", str(tmp_path / "wds"), "--quiet", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "3 shards, 10 samples" in printed and "1 samples without an image left out" in printed
    rows = read_back(tmp_path / "wds")
    expected = [(s["__key__"], s.get("jpg", s.get("png")), s["cls"]) for s in samples if "cls" in s]
    assert [(key, data, label) for _, key, data, label in rows] == expected
    assert read_index(open_store(str(tmp_path / "wds"))).classes is None

    urls = [str(p) for p in sorted((tmp_path / "wds").glob("*.tar"))]
    iterated = [dict(s) for s in webdataset.WebDataset(urls, shardshuffle=False, empty_check=False)]
    assert with_image(iterated) == [(key, data) for _, key, data, _ in rows]


def test_index_resumes_from_the_shards_already_scanned(tmp_path):
    write_wds_shards(tmp_path / "wds")
    whole = (tmp_path / "wds" / "part-000000.tar").read_bytes()
    (tmp_path / "wds" / "zz.tar").write_bytes(whole[:len(whole) // 2])
    store = LocalStore(tmp_path / "wds")
    with pytest.raises(DataError, match="zz.tar"):
        index_shards(store, workers=1, progress=False)
    assert len(list((tmp_path / "wds" / PARTS_DIR).iterdir())) == 3
    (tmp_path / "wds" / "zz.tar").write_bytes(whole)
    summary = index_shards(store, workers=1, progress=False)
    assert (summary.shards, summary.samples, summary.reused) == (4, 14, 3)
    rows = read_back(tmp_path / "wds")
    assert [row[1:] for row in rows[:4]] == [row[1:] for row in rows[-4:]]  # zz.tar is a copy


def test_killed_writer_resumes_to_the_same_shards(tmp_path, capsys):
    images = make_images(tmp_path / "src", per_class=13)
    options = ["--samples-per-shard", "2", "--workers", "1", "--quiet"]
    assert main([str(tmp_path / "src"), str(tmp_path / "straight"), *options]) == 0
    straight = read_back(tmp_path / "straight")

    # A named pipe in place of the first image of shard 10 holds the writer there until killed.
    blocking = next(path for path, data in images.items() if data == straight[20][2])
    shutil.copytree(tmp_path / "src", tmp_path / "src_copy")
    pipe = tmp_path / "src_copy" / Path(blocking).relative_to(tmp_path / "src")
    pipe.unlink()
    os.mkfifo(pipe)
    out = tmp_path / "resumed"
    writer = subprocess.Popen([sys.executable, "-m", "dino_dist.cli.shard", str(tmp_path / "src_copy"),
                               str(out), *options], cwd=REPO, env=subprocess_env())
    try:
        deadline = time.monotonic() + 120
        while not (out / ".000010.tar.tmp").exists():
            assert writer.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert sorted(shard_bytes(out)) == [f"{n:06d}.tar" for n in range(10)]

    pipe.unlink()
    pipe.write_bytes(images[blocking])
    capsys.readouterr()
    assert main([str(tmp_path / "src_copy"), str(out), *options[:2], "--workers", "2", "--quiet"]) == 0
    assert "10 shards were there already" in capsys.readouterr().out
    assert shard_bytes(out) == shard_bytes(tmp_path / "straight")
    assert read_back(out) == straight
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_rerun_with_another_plan_is_refused(folder_shards, capsys):
    src, out, *_ = folder_shards
    before = shard_bytes(out)
    assert main([str(src), str(out), "--samples-per-shard", "5", "--seed", "1", "--quiet"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1 and "seed 0 there, 1 now" in printed.err
    assert shard_bytes(out) == before


@pytest.fixture
def s3_endpoint(monkeypatch):
    endpoint, stop = start_s3_server()
    for name, value in (("AWS_ENDPOINT_URL", endpoint), ("AWS_ACCESS_KEY_ID", "testing"),
                        ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    yield endpoint
    stop()


def test_index_on_s3_reads_as_the_local_index(tmp_path, s3_endpoint):
    import boto3

    write_wds_shards(tmp_path / "wds")
    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="shards")
    for path in sorted((tmp_path / "wds").glob("*.tar")):
        client.put_object(Bucket="shards", Key=f"sets/wds/{path.name}", Body=path.read_bytes())
    assert main(["--index", "s3://shards/sets/wds", "--quiet", "--workers", "2"]) == 0
    index_shards(LocalStore(tmp_path / "wds"), workers=1, progress=False)

    remote = read_index(S3Store("s3://shards/sets/wds"), cache_dir=tmp_path / "cache")
    local = read_index(LocalStore(tmp_path / "wds"))
    assert remote.shards == local.shards and remote.classes is None
    assert np.array_equal(remote.samples, local.samples) and np.array_equal(remote.keys, local.keys)
    assert read_back(S3Store("s3://shards/sets/wds"), tmp_path / "cache") == read_back(tmp_path / "wds")


def good_tar() -> bytes:
    return build_tar([("a.jpg", b"a" * 700), ("a.cls", b"1"), ("b.jpg", b"b" * 700), ("b.cls", b"2")])


B_HEADER = 1536 + 1024  # a.jpg: header and two data blocks; a.cls: header and one


@pytest.mark.parametrize("damage", [
    lambda data: data[:B_HEADER + 512 + 100],  # cut inside b.jpg's data
    lambda data: data[:B_HEADER],  # cut where b.jpg's header would start
    lambda data: data[:B_HEADER] + b"\x01" * 512 + data[B_HEADER + 512:],  # b.jpg's header garbled
    lambda data: b"not a tar at all " * 64,
], ids=["cut-in-data", "cut-at-header", "garbled-header", "not-a-tar"])
def test_damaged_shard_is_one_error_naming_it(tmp_path, capsys, damage):
    assert [m.offset for m in tarfile.open(fileobj=io.BytesIO(good_tar()))][2] == B_HEADER
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "good.tar").write_bytes(good_tar())
    (tmp_path / "set" / "broken.tar").write_bytes(damage(good_tar()))
    assert main(["--index", str(tmp_path / "set"), "--quiet", "--workers", "1"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith("dino-shard: error: shard '") and "broken.tar" in printed.err
    assert not (tmp_path / "set" / SHARDS_FILE).exists()


@pytest.mark.parametrize("case", ["missing-src", "out-is-a-file", "no-tars", "foreign-tars"])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, case):
    make_images(tmp_path / "src", per_class=1)
    (tmp_path / "file").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "theirs.tar").write_bytes(good_tar())
    argv = {"missing-src": [str(tmp_path / "nowhere"), str(tmp_path / "out")],
            "out-is-a-file": [str(tmp_path / "src"), str(tmp_path / "file")],
            "no-tars": ["--index", str(tmp_path / "empty")],
            "foreign-tars": [str(tmp_path / "src"), str(tmp_path / "other")]}[case]
    assert main([*argv, "--quiet"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err.count("\n") == 1
    assert printed.err.startswith("dino-shard: error: ")
