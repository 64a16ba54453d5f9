"""Attention maps: `dino-attention` on DDP files, FSDP folders and exported backbones, and the
training grid in TensorBoard (`eval.attention_images`), on one process and FSDP on two.

Real training subprocesses (torchrun/gloo for FSDP), real PNG files read back with PIL, real
TensorBoard event files read back with EventAccumulator.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from dino_dist.export.backbone import export, sidecar
from dino_dist.cli.attention import main as attention_main
from dino_dist.eval.attention import (AttentionGrid, image_maps, mass_mask,
                                      patch_grid, pictures, read_image)
from dino_dist.eval.backbone import backbone_from_checkpoint
from dino_dist.models import MultiCropWrapper, build_backbone
from tests.conftest import REPO, free_port, run_train, state_at, subprocess_env, tiny_overrides, \
    write_image_folder
from tests.tolerance import assert_close_at_scale

HEADS = 4  # vit_mini
# 32 images, 8 per step: 4 steps per epoch. Grids at epochs 2 and 4 (steps 8, 16) and the end.
DDP_STEPS, DDP_GRID_STEPS = 18, [8, 16, 18]
# A high lr and a quick teacher, so that a few steps move the attention away from uniform;
# stochastic depth, so that a grid that drew random numbers would change the training.
DDP_SETTINGS = {"train.max_steps": DDP_STEPS, "train.epochs": 5, "optim.lr": 0.2,
                "optim.teacher_momentum": 0.95, "eval.every_epochs": 2,
                "model.drop_path_rate": 0.1}
FSDP_STEPS, FSDP_GRID_STEPS = 6, [4, 6]  # 2 ranks x 4 images per step


def kept_mass(maps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The share of each map's attention mass inside its mask."""
    return (maps * mask).flatten(-2).sum(-1) / maps.flatten(-2).sum(-1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The in-process forwards are tiny: with the 2 cores busy (training subprocesses, the
    other pytest worker), more threads only spin, ~100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("attention")
    fixed = write_image_folder(root / "fixed", classes=1, per_class=3, size=20, seed=1,
                               labelled=False)
    photos = root / "photos"  # not square, not multiples of any patch size
    photos.mkdir()
    rng = np.random.default_rng(2)
    for name, (height, width) in {"wide": (37, 61), "tall": (50, 30)}.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(photos / f"{name}.png")
    return {"data": write_image_folder(root / "data"), "fixed": fixed, "photos": photos,
            "root": root}


def overrides(folders, out: Path, attention: bool, **extra) -> list[str]:
    extra = {"log.tensorboard": True, **extra}
    if attention:
        extra["eval.attention_images"] = str(folders["fixed"])
    return tiny_overrides(folders["data"], out, **extra)


@pytest.fixture(scope="module")
def ddp_run(folders) -> Path:
    out = folders["root"] / "ddp_with_grid"
    run_train(overrides(folders, out, True, **DDP_SETTINGS))
    return out


@pytest.fixture(scope="module")
def fsdp_run(folders) -> Path:
    out = folders["root"] / "fsdp_with_grid"
    run_train(overrides(folders, out, True, **{
        "train.max_steps": FSDP_STEPS, "optim.batch_size_per_gpu": 4, "train.parallel": "fsdp",
        "model.patch_size": 4, "eval.every_epochs": 1}), nproc=2)
    return out


def checkpoint(run: Path, step: int) -> Path:
    folder = run / "checkpoints" / f"step_{step:08d}"
    return folder if folder.is_dir() else folder.with_name(folder.name + ".pt")


def run_command(args: list[str], capsys) -> tuple[int, list[str], str]:
    code = attention_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out.split(), err


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int32)


def cells_are_flat(picture: np.ndarray, patch: int) -> bool:
    """Every patch cell of the picture holds one colour (a map on the patch grid)."""
    rows, cols = picture.shape[0] // patch, picture.shape[1] // patch
    cells = picture.reshape(rows, patch, cols, patch, 3)
    return bool((cells == cells[:, :1, :, :1]).all())


def grid_images(run: Path) -> list:
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "attention" in events.Tags()["images"], events.Tags()
    return events.Images("attention")


# -- the model's attention -----------------------------------------------------------------

def test_cls_attention_rows_are_the_softmax_that_sdpa_applies(ddp_run):
    backbone, _ = backbone_from_checkpoint(checkpoint(ddp_run, DDP_STEPS), "cpu")
    images = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attention = backbone.eval().get_last_cls_attention(images)
        tokens = backbone.prepare_tokens(images)
        for block in backbone.blocks[:-1]:
            tokens = block(tokens)
        last = backbone.blocks[-1].attn
        qkv = last.qkv(backbone.blocks[-1].norm1(tokens)).reshape(2, 16, 3, HEADS, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        sdpa_cls_output = F.scaled_dot_product_attention(q, k, v)[:, :, 0]
    assert attention.shape == (2, HEADS, 1 + 5 * 3)
    assert (attention >= 0).all()
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, HEADS), atol=1e-6, rtol=0)
    # The probabilities, applied to the values, give what the training forward computes
    # (einsum and the fused kernel sum in different orders).
    assert_close_at_scale(torch.einsum("bht,bhtd->bhd", attention, v), sdpa_cls_output, 1e-5)


def test_patch_grid_is_row_major_and_png_cells_follow_it():
    attention = torch.full((1, 1, 1 + 3 * 5), 0.01)
    attention[0, 0, 1 + 2 * 5 + 4] = 0.9  # patch (row 2, col 4)
    grid = patch_grid(attention, 3, 5)
    assert grid.shape == (1, 1, 3, 5) and grid[0, 0].argmax().item() == 2 * 5 + 4
    head = pictures(torch.zeros(3, 6, 10), grid[0], patch=2)["head_0"]  # [3, 6, 10]
    brightest = head.sum(0) == head.sum(0).max()
    assert brightest.nonzero().tolist() == [[r, c] for r in (4, 5) for c in (8, 9)]


def test_the_mask_keeps_the_most_attended_patches_holding_the_mass():
    torch.manual_seed(0)
    maps = torch.distributions.Dirichlet(torch.full((64,), 0.3)).sample((20,)).reshape(20, 8, 8)
    for keep in (0.6, 0.3, 0.9):
        mask = mass_mask(maps, keep)
        mass = kept_mass(maps, mask)
        smallest_kept = torch.where(mask, maps, torch.inf).flatten(1).min(1).values
        assert (mass >= keep - 1e-9).all()
        assert (mass - smallest_kept / maps.flatten(1).sum(1) < keep).all()  # no patch spare
        largest_dropped = torch.where(mask, -torch.inf, maps).flatten(1).max(1).values
        assert (largest_dropped <= smallest_kept).all()


def test_a_trained_teacher_attends_unevenly_unlike_random_init(ddp_run, folders):
    """1 - entropy / ln(patches), averaged over heads and images: 0 for uniform attention."""
    files = sorted(Path(folders["data"]).rglob("*.png"))[::4]

    def unevenness(backbone) -> float:
        spread = []
        for path in files:
            _, maps = image_maps(backbone, read_image(path), None, "cpu")
            p = maps.flatten(1) / maps.flatten(1).sum(1, keepdim=True)
            spread.append(1 + (p * p.log()).sum(1) / np.log(p.shape[1]))
        return torch.cat(spread).mean().item()

    trained, cfg = backbone_from_checkpoint(checkpoint(ddp_run, DDP_STEPS), "cpu")
    random_init = []
    for seed in range(3):
        torch.manual_seed(seed)
        random_init.append(unevenness(build_backbone(cfg.model.arch, cfg.model.patch_size)))
    trained_unevenness = unevenness(trained)
    print(f"\nunevenness: trained {trained_unevenness:.4f}, random init {random_init}")
    assert trained_unevenness > 0.005
    assert trained_unevenness > 10 * max(random_init)


# -- dino-attention ----------------------------------------------------------------------

def check_written(printed: list[str], output: Path, expected: dict[str, tuple[int, int]],
                  patch: int) -> None:
    """Per image folder: image, mean, mask, head_N at (height, width), all on the patch grid."""
    assert sorted(printed) == sorted(str(p) for p in output.rglob("*.png"))
    for name, (height, width) in expected.items():
        folder = output / name
        names = {p.stem for p in folder.iterdir()}
        assert names == {"image", "mean", "mask", "grid"} | {f"head_{h}" for h in range(HEADS)}
        for stem in names - {"grid"}:
            assert Image.open(folder / f"{stem}.png").size == (width, height), stem
        for stem in ["mean"] + [f"head_{h}" for h in range(HEADS)]:
            assert cells_are_flat(png(folder / f"{stem}.png"), patch), stem
        tiles = len(names) - 1  # under a 14 px strip of column names
        assert Image.open(folder / "grid.png").size == (tiles * width + (tiles - 1) * 2,
                                                        14 + 2 + height)


def mask_from_png(folder: Path, patch: int) -> torch.Tensor:
    """Patches that mask.png shows as in image.png (the others are veiled)."""
    same = (png(folder / "mask.png") == png(folder / "image.png")).all(-1)
    rows, cols = same.shape[0] // patch, same.shape[1] // patch
    return torch.from_numpy(same.reshape(rows, patch, cols, patch).all((1, 3)))


def test_command_on_a_ddp_file_writes_maps_at_each_images_own_resolution(ddp_run, folders,
                                                                         tmp_path, capsys):
    code, printed, err = run_command(["--checkpoint", checkpoint(ddp_run, DDP_STEPS),
                                      folders["photos"], "--output-dir", tmp_path], capsys)
    assert code == 0, err
    # 37x61 and 50x30 px, rounded to multiples of the patch (8): 40x64 and 48x32.
    check_written(printed, tmp_path, {"wide": (40, 64), "tall": (48, 32)}, patch=8)
    backbone, _ = backbone_from_checkpoint(checkpoint(ddp_run, DDP_STEPS), "cpu")
    _, maps = image_maps(backbone, read_image(folders["photos"] / "wide.png"), None, "cpu")
    mean = maps.mean(0)
    assert torch.equal(mask_from_png(tmp_path / "wide", 8), mass_mask(mean))
    mass = kept_mass(mean, mass_mask(mean)).item()
    assert 0.6 <= mass < 0.6 + (mean / mean.sum()).max().item()


def test_image_size_sets_the_shorter_side(ddp_run, folders, tmp_path, capsys):
    code, printed, err = run_command(["--checkpoint", checkpoint(ddp_run, DDP_STEPS),
                                      folders["photos"] / "wide.png", "--image-size", "24",
                                      "--output-dir", tmp_path], capsys)
    assert code == 0, err
    check_written(printed, tmp_path, {"wide": (24, 40)}, patch=8)  # 24 x 39.6 -> 24 x 40


def test_command_on_an_fsdp_folder_and_its_export_agree(fsdp_run, folders, tmp_path, capsys):
    folder = checkpoint(fsdp_run, FSDP_STEPS)
    code, printed, err = run_command(["--checkpoint", folder, folders["photos"],
                                      "--output-dir", tmp_path / "folder"], capsys)
    assert code == 0, err
    # Patch 4: 37x61 -> 36x60 (9.25 x 15.25 patches), 50x30 -> 52x32 (12.5 x 7.5: halves up)
    check_written(printed, tmp_path / "folder", {"wide": (36, 60), "tall": (52, 32)}, patch=4)
    exported = tmp_path / "teacher.pt"
    export(folder, exported)
    code, _, err = run_command(["--checkpoint", exported, folders["photos"] / "wide.png",
                                "--output-dir", tmp_path / "export"], capsys)
    assert code == 0, err
    for name in ("mean", "mask", "head_0"):
        assert np.array_equal(png(tmp_path / "folder" / "wide" / f"{name}.png"),
                              png(tmp_path / "export" / "wide" / f"{name}.png")), name


def test_user_mistakes_get_one_line_and_exit_2(ddp_run, folders, tmp_path, capsys):
    ckpt = checkpoint(ddp_run, DDP_STEPS)
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    resnet = tmp_path / "resnet.pt"
    torch.save(build_backbone("resnet50").state_dict(), resnet)
    sidecar(resnet).write_text(json.dumps({"arch": "resnet50", "patch_size": 16,
                                           "img_size": 224}))
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "out"
    cases = [
        ([ckpt, tmp_path / "empty", out], "contains no images"),
        ([ckpt, tmp_path / "missing", out], "does not exist"),
        ([ckpt, tmp_path / "broken.jpg", out], "cannot read image"),
        ([resnet, folders["photos"], out], "has no attention"),
        ([ckpt, folders["photos"], tmp_path / "a_file"], "cannot create"),
    ]
    for (model, images, output_dir), says in cases:
        code, _, err = run_command(["--checkpoint", model, images, "--output-dir", output_dir],
                                   capsys)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("dino-attention: error: ")
    # The real command line: exit status 2, one line, no traceback.
    result = subprocess.run([sys.executable, "-m", "dino_dist.cli.attention", "--checkpoint",
                             str(ckpt), str(tmp_path / "broken.jpg")], cwd=REPO,
                            env=subprocess_env(), capture_output=True, text=True, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("dino-attention: error: cannot read image")


# -- during training ---------------------------------------------------------------------

def test_training_writes_the_grid_at_each_evaluation_and_at_the_end(ddp_run):
    grids = grid_images(ddp_run)
    assert [g.step for g in grids] == DDP_GRID_STEPS
    # Column names, then 3 rows (images) of 7 tiles (image, mean, mask, 4 heads); 16 px crops
    # shown at 96 px.
    assert {(g.width, g.height) for g in grids} == {(7 * 96 + 6 * 2, 14 + 3 * (2 + 96))}


def test_the_grid_does_not_change_training(ddp_run, folders):
    out = folders["root"] / "ddp_without_grid"
    run_train(overrides(folders, out, False, **DDP_SETTINGS))
    with_grid, without = state_at(ddp_run, DDP_STEPS), state_at(out, DDP_STEPS)
    for part in ("student", "teacher", "loss", "optimizer"):
        assert_identical(with_grid[part], without[part], part)


def assert_identical(a, b, where: str) -> None:
    """Bit-identical tensors and equal values, through nested dicts and lists."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def test_fsdp_training_writes_the_grid_of_its_sharded_teacher(fsdp_run):
    grids = grid_images(fsdp_run)
    assert [g.step for g in grids] == FSDP_GRID_STEPS
    # The live sharded teacher drew what its committed checkpoint draws.
    backbone, cfg = backbone_from_checkpoint(checkpoint(fsdp_run, FSDP_STEPS), "cpu")
    expected = AttentionGrid(cfg, "cpu").render(MultiCropWrapper(backbone, nn.Identity()))
    expected = (expected[0].permute(1, 2, 0) * 255).round().numpy()
    written = np.asarray(Image.open(io.BytesIO(grids[-1].encoded_image_string)))
    assert written.shape[:2] == expected.shape[:2]
    assert np.abs(written[..., :3] - expected).max() <= 1


def test_bad_attention_settings_stop_the_run_before_the_first_step(folders, tmp_path):
    result = run_train(overrides(folders, tmp_path, False, **{
        "eval.attention_images": str(tmp_path / "missing")}), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "eval.attention_images" in result.stdout + result.stderr
    assert not list((tmp_path / "checkpoints").glob("step_*"))


def torchrun(module: str, *args) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", module,
               *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_under_torchrun_rank_0_alone_writes_the_maps_and_the_export(ddp_run, folders, tmp_path):
    """One-process commands started under torchrun: the other ranks leave at once instead of
    racing rank 0 for the same files."""
    final = checkpoint(ddp_run, 18)
    maps = torchrun("dino_dist.cli.attention", "--checkpoint", final, "--output-dir",
                    tmp_path / "maps", folders["photos"])
    printed = [line for line in maps.stdout.splitlines() if line.endswith(".png")]
    assert printed and len(printed) == len(set(printed))  # each file once: one rank wrote
    assert all(Path(line).is_file() for line in printed)
    export = torchrun("dino_dist.cli.export", final, "--output", tmp_path / "teacher.pth")
    assert export.stdout.count("wrote ") == 1 and (tmp_path / "teacher.pth").is_file()
