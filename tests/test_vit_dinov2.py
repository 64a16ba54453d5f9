"""The ViT's DINOv2 options (LayerScale, registers, SwiGLU, uniform drop path, mask token):
off by default with the DINO model unchanged; on, DINOv2's names, shapes and token order,
masks, the packed pass and the attention maps; patch 14."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dino_dist.eval.attention import patch_grid
from dino_dist.eval.linear_features import FeatureSettings, feature_function
from dino_dist.models import VIT_ARCHS, build_backbone
from dino_dist.models.packing import PackedLayout
from dino_dist.models.vit import DropPath, VisionTransformer, swiglu_hidden_dim, vit_options
from tests.tolerance import assert_close_at_scale

TOLERANCE = 1e-5  # packing changes the order of the attention's sums
DIM, HEADS, PATCH, IMG = 32, 2, 8, 16  # a 2x2 grid of patches
PATCHES = (IMG // PATCH) ** 2
ALL_ON = dict(layerscale_init=0.1, num_registers=3, ffn="swiglu", mask_token=True)

DINO_KEYS = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
             "blocks.0.norm1.weight", "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight",
             "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.0.attn.proj.bias",
             "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
             "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias",
             "norm.weight", "norm.bias"]


def tiny(depth: int = 2, seed: int = 0, **options) -> VisionTransformer:
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=depth,
                              num_heads=HEADS, **options)
    with torch.no_grad():  # away from the init (zero mask token, tiny gammas and registers)
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def images(count: int, size: int = IMG, seed: int = 1) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def random_masks(count: int, patches: int = PATCHES, seed: int = 2) -> torch.Tensor:
    return torch.rand(count, patches, generator=torch.Generator().manual_seed(seed)) < 0.5


# -- defaults: the DINO model ---------------------------------------------------------------

def dino_forward(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The DINO ViT's forward written out with the model's own layers."""
    tokens = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), model.patch_embed(x)), 1)
    tokens = tokens + model.pos_embed
    for block in model.blocks:
        tokens = tokens + block.attn(block.norm1(tokens))
        tokens = tokens + block.mlp(block.norm2(tokens))
    return model.norm(tokens)[:, 0]


def test_defaults_keep_the_dino_keys_init_and_outputs():
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1,
                              num_heads=HEADS)
    assert list(model.state_dict()) == DINO_KEYS
    assert model.num_registers == 0 and model.num_prefix_tokens == 1
    assert model.register_tokens is None and model.mask_token is None
    torch.manual_seed(0)
    default = tiny()
    torch.manual_seed(0)
    off = tiny(layerscale_init=0.0, num_registers=0, ffn="mlp", drop_path_uniform=False,
               mask_token=False)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(),
                                                  off.state_dict().values()))
    x = images(3)
    with torch.no_grad():
        assert torch.equal(default(x), dino_forward(default, x))
        assert torch.equal(default.forward_tokens(x)[:, 0], default(x))


# -- each option ----------------------------------------------------------------------------

def test_layerscale_gammas_start_at_the_init_value_on_both_branches():
    model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=2,
                              num_heads=HEADS, layerscale_init=1e-5)
    gammas = {k: v for k, v in model.state_dict().items() if "gamma" in k}
    assert sorted(gammas) == [f"blocks.{i}.{ls}.gamma" for i in range(2) for ls in ("ls1", "ls2")]
    for gamma in gammas.values():
        assert gamma.shape == (DIM,) and torch.all(gamma == torch.tensor(1e-5))
    # Zero gammas silence both branches: every block is the identity.
    model = tiny(layerscale_init=0.5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.zero_()
        x = images(2)
        assert torch.equal(model.forward_tokens(x), model.norm(model.prepare_tokens(x)))


def test_registers_sit_after_cls_without_positions():
    torch.manual_seed(0)
    fresh = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1,
                              num_heads=HEADS, num_registers=4)
    assert fresh.register_tokens.shape == (1, 4, DIM)
    assert 0 < fresh.register_tokens.std().item() < 1e-5  # DINOv2's std 1e-6
    model = tiny(num_registers=4)
    assert model.num_registers == 4 and model.num_prefix_tokens == 5
    x = images(2)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        patches = model.patch_embed(x)
    assert tokens.shape == (2, 1 + 4 + PATCHES, DIM)
    assert torch.equal(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1])[:, 0].expand(2, -1))
    assert torch.equal(tokens[:, 1:5], model.register_tokens.expand(2, -1, -1).detach())
    assert torch.equal(tokens[:, 5:], (patches + model.pos_embed[:, 1:]).detach())
    assert model.forward_tokens(x).shape == (2, 1 + 4 + PATCHES, DIM)


def test_swiglu_is_dinov2s_fused_ffn():
    assert [swiglu_hidden_dim(4 * d) for d in (128, 384, 1536)] == [344, 1024, 4096]
    with torch.device("meta"):
        giant = build_backbone("vit_giant2", 14, ffn="swiglu")
    assert VIT_ARCHS["vit_giant2"] == (1536, 40, 24) and len(giant.blocks) == 40
    shapes = {k: tuple(v.shape) for k, v in giant.state_dict().items()
              if k.startswith("blocks.0.mlp")}
    assert shapes == {"blocks.0.mlp.w12.weight": (8192, 1536), "blocks.0.mlp.w12.bias": (8192,),
                      "blocks.0.mlp.w3.weight": (1536, 4096), "blocks.0.mlp.w3.bias": (1536,)}
    mlp = tiny(ffn="swiglu").blocks[0].mlp
    x = torch.randn(2, 5, DIM)
    x1, x2 = (x @ mlp.w12.weight.T + mlp.w12.bias).chunk(2, dim=-1)
    with torch.no_grad():
        assert_close_at_scale(mlp(x), F.silu(x1) * x2 @ mlp.w3.weight.T + mlp.w3.bias, 1e-6)


def test_drop_path_rates_uniform_or_rising():
    def rates(uniform: bool) -> list[float]:
        model = VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=5,
                                  num_heads=HEADS, drop_path_rate=0.2, drop_path_uniform=uniform)
        return [block.drop_path.drop_prob for block in model.blocks]
    assert rates(True) == [0.2] * 5
    assert rates(False) == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


@pytest.mark.parametrize("options,complaint", [
    (dict(num_registers=17), "num_registers 17"), (dict(ffn="geglu"), "unknown ffn 'geglu'"),
    (dict(layerscale_init=-1.0), "layerscale_init -1.0")])
def test_bad_options_are_one_line(options, complaint):
    with pytest.raises(ValueError) as err:
        VisionTransformer(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=1,
                          num_heads=HEADS, **options)
    assert complaint in str(err.value) and "\n" not in str(err.value)


def test_build_backbone_passes_the_options_and_weights_tell_them_back():
    with torch.device("meta"):
        vit = build_backbone("vit_mini", 8, 0.1, 32, drop_path_uniform=True, **ALL_ON)
        resnet = build_backbone("resnet50", **ALL_ON)  # a ResNet has none of them
    assert vit.num_registers == 3 and vit.mask_token.shape == (1, 128)
    assert {b.drop_path.drop_prob for b in vit.blocks} == {0.1}
    assert not hasattr(resnet, "register_tokens")
    options = vit_options(vit.state_dict())
    assert options == dict(ALL_ON, layerscale_init=1e-5)  # gammas do not keep their init
    assert vit_options(tiny().state_dict()) == dict(layerscale_init=0.0, num_registers=0,
                                                    ffn="mlp", mask_token=False)


def test_new_root_parameters_stay_out_of_the_parallel_units():
    model = tiny(**ALL_ON)
    in_units = {id(p) for unit in model.parallel_units().all() for p in unit.parameters()}
    assert id(model.register_tokens) not in in_units and id(model.mask_token) not in in_units
    assert list(model.parallel_units().shard) == list(model.blocks)


# -- masks ----------------------------------------------------------------------------------

def test_a_masked_patch_is_the_mask_token_whatever_its_pixels():
    model = tiny(num_registers=2, mask_token=True)
    x = images(1)
    changed = x.clone()
    changed[..., :PATCH, PATCH:] += 3.0  # pixels of patch 1 only (row 0, column 1)
    masks = torch.zeros(1, PATCHES, dtype=torch.bool)
    masks[0, 1] = True
    with torch.no_grad():
        assert torch.equal(model.forward_tokens(x, masks), model.forward_tokens(changed, masks))
        assert not torch.allclose(model.forward_tokens(x), model.forward_tokens(changed))
        tokens = model.prepare_tokens(x, masks)
    # Before the positions: the masked patch keeps its own position embedding.
    assert torch.equal(tokens[0, 1 + 2 + 1], (model.mask_token[0] + model.pos_embed[0, 2]).detach())


def test_an_all_false_mask_is_no_mask():
    model = tiny(**ALL_ON)
    x = images(2)
    with torch.no_grad():
        assert torch.equal(model.forward_tokens(x, torch.zeros(2, PATCHES, dtype=torch.bool)),
                           model.forward_tokens(x))


def test_masks_without_a_mask_token_or_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match="no mask token: build it with mask_token=True"):
        tiny().forward_tokens(images(2), torch.zeros(2, PATCHES, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"masks must be bool of shape \(2, 4\)"):
        tiny(mask_token=True).forward_tokens(images(2), torch.zeros(2, 5, dtype=torch.bool))


# -- the packed pass ------------------------------------------------------------------------

@pytest.mark.parametrize("options", [dict(num_registers=2), ALL_ON])
def test_packed_tokens_equal_the_unpacked_passes(options):
    model = tiny(**options)
    global_x, local_x = images(2, IMG, seed=3), images(6, PATCH, seed=4)
    masks = random_masks(2) if options.get("mask_token") else None
    with torch.no_grad():
        cls, patches = model.forward_packed_tokens(global_x, local_x, masks)
        tokens = model.forward_tokens(global_x, masks)
        packed_cls = model.forward_packed(global_x, local_x)
        local_cls = model(local_x)
    assert cls.shape == (8, DIM) and patches.shape == (2, PATCHES, DIM)
    assert_close_at_scale(cls, torch.cat((tokens[:, 0], local_cls)), TOLERANCE, "cls")
    assert_close_at_scale(patches, tokens[:, model.num_prefix_tokens:], TOLERANCE, "patches")
    assert_close_at_scale(packed_cls, torch.cat((model(global_x), local_cls)), TOLERANCE)


def test_packed_crops_with_registers_are_dropped_whole():
    model = tiny(num_registers=3)
    global_tokens = model.prepare_tokens(images(2, IMG))
    local_tokens = model.prepare_tokens(images(4, PATCH))
    layout = PackedLayout.of(global_tokens, local_tokens)
    assert (layout.global_len, layout.local_len) == (1 + 3 + PATCHES, 1 + 3 + 1)
    starts = layout.crop_starts(torch.device("cpu"))
    assert starts.tolist() == [0] * 8 + [8] * 5 + [13] * 5
    torch.manual_seed(0)
    ones = torch.ones(500, layout.row_len, 1)
    out = ones * DropPath(0.5).train().scales(ones, crop_starts=starts)[0]
    for start, end in ((0, 8), (8, 13), (13, 18)):
        crop = out[:, start:end, 0]
        assert torch.equal(crop, crop[:, :1].expand_as(crop))  # CLS, registers, patches alike


# -- evaluation readers ---------------------------------------------------------------------

def test_attention_maps_skip_the_registers():
    model = tiny(num_registers=3)
    x = images(2)
    with torch.no_grad():
        got = model.get_last_cls_attention(x)
        tokens = model.prepare_tokens(x)
        for block in model.blocks[:-1]:
            tokens = block(tokens)
        every_token = model.blocks[-1].attn.cls_attention(model.blocks[-1].norm1(tokens))
    assert got.shape == (2, HEADS, 1 + PATCHES)
    assert every_token.shape == (2, HEADS, 1 + 3 + PATCHES)
    assert torch.equal(got, torch.cat((every_token[..., :1], every_token[..., 4:]), dim=-1))
    assert torch.all(got.sum(-1) < 1)  # the registers' share is left out
    assert patch_grid(got, 2, 2).shape == (2, HEADS, 2, 2)


def test_linear_probe_average_pools_the_patches_only():
    model = tiny(num_registers=3)
    x = images(2)
    settings = FeatureSettings(n_last_blocks=1, avgpool=True, image_size=IMG, train_views=0,
                               seed=0)
    with torch.no_grad():
        features = feature_function(model, settings)(x)
        tokens = model.forward_tokens(x)
    expected = torch.cat((tokens[:, 0], tokens[:, 4:].mean(dim=1)), dim=1)
    assert_close_at_scale(features, expected, 1e-6)


# -- patch 14 -------------------------------------------------------------------------------

def test_patch_14_takes_224_and_98_pixel_crops_and_refuses_96():
    model = VisionTransformer(img_size=224, patch_size=14, embed_dim=DIM, depth=1,
                              num_heads=HEADS, num_registers=4).eval()
    with torch.no_grad():
        assert model.forward_tokens(images(1, 224)).shape == (1, 1 + 4 + 256, DIM)
        cls, patches = model.forward_packed_tokens(images(2, 224), images(2, 98))
    assert cls.shape == (4, DIM) and patches.shape == (2, 256, DIM)
    with pytest.raises(ValueError) as err:
        model(images(1, 96))
    message = str(err.value)
    assert "96x96 px" in message and "14-px patches" in message and "98 px" in message
