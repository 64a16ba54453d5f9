"""`dino-export --format dinov2`, and `--format timm` of a ViT with DINOv2 options: weights that
the official dinov2 backbone (checked through timm's own converter of official dinov2 files)
and timm's ViT load with strict=True, giving the features of our backbone."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import nn

from dino_dist.checkpoint.single_file import save_file
from dino_dist.cli.export import main as export_main
from dino_dist.eval.backbone import backbone_from_checkpoint
from dino_dist.export.dinov2 import TIMM_DINOV2_MODELS, timm_dinov2_model, timm_dinov2_weights
from dino_dist.models import VIT_ARCHS, build_backbone
from dino_dist.models.vit import vit_options
from tests.tolerance import assert_close_at_scale

ARCH, PATCH, IMG_SIZE, STEP = "vit_mini", 14, 28, 3  # a 2x2 grid of patches
DIM, DEPTH, _ = VIT_ARCHS[ARCH]
LAYERSCALE = 1e-4  # the run's configured init value, recorded for dinov2's init_values
CASES = {
    "layerscale": dict(layerscale_init=LAYERSCALE),
    "layerscale_registers": dict(layerscale_init=LAYERSCALE, num_registers=4, mask_token=True),
    "swiglu": dict(ffn="swiglu"),
    "mask_token_only": dict(mask_token=True),  # a DINO ViT trained with the iBOT loss
}
ROOT_KEYS = {"cls_token": (1, 1, DIM), "pos_embed": (1, 5, DIM), "mask_token": (1, DIM),
             "patch_embed.proj.weight": (DIM, 3, PATCH, PATCH), "patch_embed.proj.bias": (DIM,),
             "norm.weight": (DIM,), "norm.bias": (DIM,)}


def block_keys(case: dict) -> dict[str, tuple[int, ...]]:
    hidden = (int(4 * DIM * 2 / 3) + 7) // 8 * 8  # dinov2's SwiGLU width
    mlp = ({"mlp.w12.weight": (2 * hidden, DIM), "mlp.w12.bias": (2 * hidden,),
            "mlp.w3.weight": (DIM, hidden), "mlp.w3.bias": (DIM,)} if case.get("ffn") == "swiglu"
           else {"mlp.fc1.weight": (4 * DIM, DIM), "mlp.fc1.bias": (4 * DIM,),
                 "mlp.fc2.weight": (DIM, 4 * DIM), "mlp.fc2.bias": (DIM,)})
    layers = {"norm1.weight": (DIM,), "norm1.bias": (DIM,), "attn.qkv.weight": (3 * DIM, DIM),
              "attn.qkv.bias": (3 * DIM,), "attn.proj.weight": (DIM, DIM),
              "attn.proj.bias": (DIM,), "norm2.weight": (DIM,), "norm2.bias": (DIM,), **mlp}
    if case.get("layerscale_init"):
        layers.update({"ls1.gamma": (DIM,), "ls2.gamma": (DIM,)})
    return {f"blocks.{i}.{k}": v for i in range(DEPTH) for k, v in layers.items()}


def trained_like(case: dict) -> nn.Module:
    torch.manual_seed(0)
    backbone = build_backbone(ARCH, PATCH, img_size=IMG_SIZE, **case)
    with torch.no_grad():  # away from the init: tiny gammas, blank registers, zero mask token
        for param in backbone.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return backbone.eval()


def write_checkpoint(run_dir: Path, backbone: nn.Module, model_config: dict) -> Path:
    """A checkpoint file as training writes it (the project's writer, manifest included)."""
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    teacher["head.last_layer.weight_g"] = torch.ones(8, 1)  # heads are never exported
    state = {"student": teacher, "teacher": teacher, "optimizer": {}, "loss": {},
             "step": STEP, "epoch": 0, "config": {"model": model_config}}
    return save_file(run_dir / "checkpoints", state, is_main=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, nn.Module]]:
    """case -> (checkpoint, the backbone it holds)."""
    out = {}
    for name, case in CASES.items():
        backbone = trained_like(case)
        config = {"arch": ARCH, "patch_size": PATCH, "img_size": IMG_SIZE,
                  "layerscale": case.get("layerscale_init", 0.0),
                  "num_registers": case.get("num_registers", 0), "ffn": case.get("ffn", "mlp")}
        out[name] = write_checkpoint(tmp_path_factory.mktemp(name), backbone, config), backbone
    return out


def export(checkpoint: Path, output: Path, *options: str) -> tuple[dict, dict]:
    assert export_main([str(checkpoint), "--output", str(output), *options]) == 0
    info = json.loads(output.with_name(output.name + ".json").read_text())
    return torch.load(output, weights_only=True), info


def same_features(ours: nn.Module, theirs_cls, img_size: int = IMG_SIZE) -> None:
    images = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = ours.eval()(images), theirs_cls(images)
    assert_close_at_scale(got, expected, 1e-5)  # timm's kernels may sum in another order


def timm_for_official_dinov2(kwargs: dict) -> nn.Module:
    """timm's ViT in the shape of dinov2's DinoVisionTransformer(**kwargs), built the way
    timm builds its DINOv2 models (not from our export code)."""
    registers = kwargs["num_register_tokens"]
    args = dict(img_size=kwargs["img_size"], patch_size=kwargs["patch_size"],
                embed_dim=kwargs["embed_dim"], depth=kwargs["depth"],
                num_heads=kwargs["num_heads"], init_values=kwargs["init_values"] or 0.0,
                num_classes=0)
    if registers:
        args.update(reg_tokens=registers, no_embed_class=True)
    if kwargs["ffn_layer"] == "swiglufused":
        hidden = (int(kwargs["embed_dim"] * kwargs["mlp_ratio"] * 2 / 3) + 7) // 8 * 8
        args.update(mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
                    mlp_ratio=(2 * hidden + 0.5) / kwargs["embed_dim"])
    return timm.create_model("vit_small_patch14_dinov2", pretrained=False, **args).eval()


# -- dinov2 ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_dinov2_export_has_the_official_keys_and_shapes(runs, name, tmp_path, capsys):
    checkpoint, ours = runs[name]
    weights, info = export(checkpoint, tmp_path / "dinov2.pth", "--format", "dinov2")
    case = CASES[name]
    expected = {**ROOT_KEYS, **block_keys(case)}
    if case.get("num_registers"):
        expected["register_tokens"] = (1, case["num_registers"], DIM)
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    for key, tensor in ours.state_dict().items():
        assert torch.equal(weights[key], tensor), key
    if not case.get("mask_token"):
        assert torch.equal(weights["mask_token"], torch.zeros(1, DIM))  # dinov2 always has one
    assert info["format"] == "dinov2" and info["dinov2_arch"] is None  # vit_mini: not theirs
    assert info["dinov2_kwargs"] == {
        "img_size": IMG_SIZE, "patch_size": PATCH, "embed_dim": DIM, "depth": DEPTH,
        "num_heads": 4, "mlp_ratio": 4.0,
        "init_values": LAYERSCALE if case.get("layerscale_init") else None,
        "num_register_tokens": case.get("num_registers", 0),
        "ffn_layer": "swiglufused" if case.get("ffn") == "swiglu" else "mlp",
        "block_chunks": 0, "interpolate_offset": 0.1, "interpolate_antialias": False}
    assert "for dinov2: DinoVisionTransformer(img_size=28" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(CASES))
def test_dinov2_export_goes_through_timms_dinov2_converter_to_our_features(runs, name,
                                                                          tmp_path):
    checkpoint, ours = runs[name]
    weights, info = export(checkpoint, tmp_path / "dinov2.pth", "--format", "dinov2")
    theirs = timm_for_official_dinov2(info["dinov2_kwargs"])
    theirs.load_state_dict(checkpoint_filter_fn(weights, theirs), strict=True)
    same_features(ours, lambda x: theirs.forward_features(x)[:, 0])


def test_exports_load_back_for_our_evaluation_tools(runs, tmp_path):
    """dino-knn, dino-linear and dino-attention rebuild the options from the weights."""
    checkpoint, ours = runs["layerscale_registers"]
    for options in ((), ("--format", "dinov2")):
        output = tmp_path / f"backbone{len(options)}.pth"
        export(checkpoint, output, *options)
        backbone, _ = backbone_from_checkpoint(output, "cpu")
        same_features(ours, backbone.eval())
    backbone, _ = backbone_from_checkpoint(checkpoint, "cpu")
    assert vit_options(backbone.state_dict()) == vit_options(ours.state_dict())


def test_dinov2_default_output_name(runs):
    checkpoint, _ = runs["swiglu"]
    assert export_main([str(checkpoint), "--format", "dinov2"]) == 0
    assert (checkpoint.parent.parent / f"teacher_backbone_step{STEP}_dinov2.pth").is_file()


def test_a_resnet_checkpoint_for_dinov2_exits_2_with_one_line(tmp_path, capsys):
    resnet = nn.Module()
    resnet.conv1 = nn.Conv2d(3, 2, 3)  # stands for the ResNet: only the arch decides
    checkpoint = write_checkpoint(tmp_path / "run", resnet,
                                  {"arch": "resnet50", "patch_size": 16, "img_size": 224})
    output = tmp_path / "out.pth"
    assert export_main([str(checkpoint), "--format", "dinov2", "--output", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dinov2 has no resnet50 backbone" in err
    assert "--format dino" in err and not output.exists()


# -- timm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CASES))
def test_timm_export_of_dinov2_options_loads_strictly_and_gives_our_features(runs, name,
                                                                            tmp_path):
    checkpoint, ours = runs[name]
    weights, info = export(checkpoint, tmp_path / "timm.pth", "--format", "timm")
    assert info["format"] == "timm" and "mask_token" not in weights
    theirs = timm.create_model(info["timm_model"], pretrained=False, **info["timm_kwargs"])
    theirs.load_state_dict(weights, strict=True)
    assert theirs.global_pool == "token"
    same_features(ours, theirs.eval())


@pytest.mark.parametrize("arch", sorted(TIMM_DINOV2_MODELS))
@pytest.mark.parametrize("registers", [0, 4])
def test_timms_dinov2_names_are_our_architectures(arch, registers):
    """On the meta device: timm's own DINOv2 name holds exactly our converted tensors."""
    ffn = "swiglu" if arch == "vit_giant2" else "mlp"
    with torch.device("meta"):
        ours = build_backbone(arch, 14, img_size=224, layerscale_init=1e-5,
                              num_registers=registers, ffn=ffn)
        name, kwargs = timm_dinov2_model(arch, 14, 224, vit_options(ours.state_dict()), 1e-5)
        theirs = timm.create_model(name, pretrained=False, **kwargs)
    assert name == TIMM_DINOV2_MODELS[arch].replace("_dinov2", "_reg4_dinov2" if registers
                                                    else "_dinov2")
    assert kwargs == {"num_classes": 0, "img_size": 224}
    assert {k: v.shape for k, v in theirs.state_dict().items()} == \
        {k: v.shape for k, v in timm_dinov2_weights(ours.state_dict()).items()}
