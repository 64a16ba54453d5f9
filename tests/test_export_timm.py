"""`dino-export --format timm`: weights that timm's ViT loads with strict=True and that give the
same features as our backbone; the default export is untouched."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import nn

from dino_dist.export.backbone import TIMM_MODELS, timm_model_for
from dino_dist.cli.export import main as export_main
from dino_dist.errors import CheckpointError
from dino_dist.models import build_backbone
from tests.conftest import run_train, state_at, tiny_overrides, write_image_folder
from tests.tolerance import assert_close_at_scale

IMG_SIZE = 16  # the tiny run's crops; its position table is stored for this size
STEPS = 2
OFFICIAL_NAMES = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                  "norm.weight", "norm.bias"}
BLOCK_NAMES = {f"{layer}.{p}" for layer in ("norm1", "attn.qkv", "attn.proj", "norm2",
                                            "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("timm_export")
    data = write_image_folder(root / "images")
    run_dir = root / "run"
    run_train(tiny_overrides(data, run_dir, **{"train.max_steps": STEPS,
                                               "model.img_size": IMG_SIZE}))
    return run_dir


@pytest.fixture(scope="module")
def our_backbone(run_dir) -> nn.Module:
    state = state_at(run_dir, STEPS)
    backbone = build_backbone("vit_mini", patch_size=8, img_size=IMG_SIZE)
    teacher = {k[len("backbone."):]: v for k, v in state["teacher"].items()
               if k.startswith("backbone.")}
    backbone.load_state_dict(teacher, strict=True)
    return backbone.eval()


def checkpoint(run_dir: Path) -> str:
    return str(run_dir / "checkpoints" / f"step_{STEPS:08d}.pt")


def timm_model_from_sidecar(weights_file: Path) -> nn.Module:
    info = json.loads(weights_file.with_name(weights_file.name + ".json").read_text())
    assert info["format"] == "timm"
    return timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"])


def same_features(ours: nn.Module, theirs: nn.Module, img_size: int) -> None:
    images = torch.randn(4, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours.eval()(images), theirs.eval()(images)
    assert got.shape == expected.shape
    assert_close_at_scale(got, expected, 1e-5)  # timm's kernels may sum in another order


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_export_loads_strictly_and_gives_our_features(run_dir, our_backbone, suffix,
                                                           tmp_path, capsys):
    output = tmp_path / f"backbone{suffix}"
    safetensors = suffix == ".safetensors"
    argv = [checkpoint(run_dir), "--format", "timm", "--output", str(output)]
    assert export_main(argv + (["--safetensors"] if safetensors else [])) == 0
    printed = capsys.readouterr().out
    assert "timm.create_model('vit_small_patch16_224', num_classes=0, embed_dim=128" in printed
    weights = load_file(output) if safetensors else torch.load(output, weights_only=True)
    model = timm_model_from_sidecar(output)
    model.load_state_dict(weights, strict=True)
    assert model.global_pool == "token"  # the CLS token, as our forward returns
    same_features(our_backbone, model, IMG_SIZE)
    assert not list(tmp_path.glob(".*.tmp"))  # written through temporary names


def test_default_export_is_unchanged(run_dir, our_backbone, tmp_path):
    assert export_main([checkpoint(run_dir)]) == 0
    output = run_dir / f"teacher_backbone_step{STEPS}.pth"
    weights = torch.load(output, weights_only=True)
    depth = len(our_backbone.blocks)
    assert set(weights) == OFFICIAL_NAMES | {f"blocks.{i}.{n}" for i in range(depth)
                                              for n in BLOCK_NAMES}
    for name, tensor in our_backbone.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    info = json.loads(output.with_name(output.name + ".json").read_text())
    assert info["format"] == "dino_dist backbone" and "timm_model" not in info
    assert info["arch"] == "vit_mini" and info["img_size"] == IMG_SIZE

    assert export_main([checkpoint(run_dir), "--format", "timm"]) == 0  # its own default name
    timm_weights = torch.load(run_dir / f"teacher_backbone_step{STEPS}_timm.pth", weights_only=True)
    assert timm_weights.keys() == weights.keys()  # timm's names are DINO's
    assert all(torch.equal(timm_weights[k], weights[k]) for k in weights)


@pytest.mark.parametrize("arch,patch", sorted(TIMM_MODELS))
def test_each_timm_name_is_our_architecture(arch, patch):
    """Built on the meta device (no memory, no time): same tensors, CLS pooling after the norm."""
    name, kwargs = timm_model_for(arch, patch, 224)
    assert kwargs == {"num_classes": 0}
    with torch.device("meta"):
        theirs = timm.create_model(name, pretrained=False, **kwargs)
        ours = build_backbone(arch, patch)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == \
        {k: v.shape for k, v in ours.state_dict().items()}
    assert theirs.global_pool == "token" and not theirs.no_embed_class
    assert theirs.norm.eps == ours.norm.eps
    for identity in (theirs.fc_norm, theirs.head, theirs.norm_pre):
        assert isinstance(identity, nn.Identity)


def test_a_paper_size_at_another_resolution_gives_our_features():
    """vit_tiny/16 under timm's own name, with the position table of a 32-pixel model."""
    torch.manual_seed(0)
    ours = build_backbone("vit_tiny", 16, img_size=32)
    name, kwargs = timm_model_for("vit_tiny", 16, 32)
    assert (name, kwargs) == ("vit_tiny_patch16_224", {"num_classes": 0, "img_size": 32})
    theirs = timm.create_model(name, pretrained=False, **kwargs)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    same_features(ours, theirs, 32)


@pytest.mark.parametrize("arch,patch,named", [("vit_tiny", 8, "vit_tiny patch 8"),
                                              ("vit_base", 14, "vit_base patch 14"),
                                              ("resnet50", 16, "resnet50 (")])
def test_no_timm_model_is_one_line_naming_what_exists(arch, patch, named):
    with pytest.raises(CheckpointError) as err:
        timm_model_for(arch, patch, 224)
    message = str(err.value)
    assert "\n" not in message and named in message
    assert "vit_small patch 8" in message and "--format dino" in message


@pytest.mark.parametrize("extra,complaint", [
    (["--safetensors"], "--safetensors is for --format timm"),
    (["--format", "timm", "--safetensors", "--output", "w.pth"], "does not match the format"),
    (["--format", "timm", "--output", "w.safetensors"], "does not match the format"),
])
def test_option_mistakes_exit_2_with_one_line(run_dir, extra, complaint, capsys, tmp_path,
                                              monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert export_main([checkpoint(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and complaint in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_missing_checkpoint_exits_2(tmp_path, capsys):
    assert export_main([str(tmp_path / "step_00000009.pt"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dino-export: error:") and err.count("\n") == 1
