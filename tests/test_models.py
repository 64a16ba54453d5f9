import math

import pytest
import torch
import torch.nn as nn

from dino_dist.models import (
    ARCH_NAMES,
    VIT_ARCHS,
    DINOHead,
    MultiCropWrapper,
    VisionTransformer,
    build_backbone,
    build_model,
    last_layer_parameters,
    param_groups_for_weight_decay,
)
from dino_dist.models.resnet import resnet50_backbone
from tests.tolerance import assert_close_at_scale


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# Independent reference: the official DINO ViT forward, written in its style
# (explicit softmax attention, upstream interpolate_pos_encoding).
# ---------------------------------------------------------------------------
class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class RefBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = RefMlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch_size, dim):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class RefViT(nn.Module):
    def __init__(self, img_size, patch_size, dim, depth, num_heads):
        super().__init__()
        self.patch_embed = RefPatchEmbed(patch_size, dim)
        num_patches = (img_size // patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        self.blocks = nn.ModuleList([RefBlock(dim, num_heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def interpolate_pos_encoding(self, x, w, h):
        npatch = x.shape[1] - 1
        N = self.pos_embed.shape[1] - 1
        if npatch == N and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, 0]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size
        h0 = h // self.patch_embed.patch_size
        w0, h0 = w0 + 0.1, h0 + 0.1
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    def forward(self, x):
        B, nc, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)[:, 0]


def official_vit_keys(dim, depth, patch_size, num_patches):
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, num_patches + 1, dim),
        "patch_embed.proj.weight": (dim, 3, patch_size, patch_size),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    per_block = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "mlp.fc1.weight": (4 * dim, dim),
        "mlp.fc1.bias": (4 * dim,),
        "mlp.fc2.weight": (dim, 4 * dim),
        "mlp.fc2.bias": (dim,),
    }
    for i in range(depth):
        keys.update({f"blocks.{i}.{name}": shape for name, shape in per_block.items()})
    return keys


def shapes_of(module):
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(VIT_ARCHS))
def test_vit_state_dict_matches_official_layout(arch):
    dim, depth, _ = VIT_ARCHS[arch]
    with torch.device("meta"):  # shapes only, no need to allocate or initialise
        model = build_backbone(arch, patch_size=16)
    assert shapes_of(model) == official_vit_keys(dim, depth, 16, 196)
    assert model.embed_dim == dim


def test_vit_large_is_vit_l_16():
    with torch.device("meta"):
        model = build_backbone("vit_large", patch_size=16)
    assert VIT_ARCHS["vit_large"] == (1024, 24, 16)
    assert model.blocks[0].attn.num_heads == 16
    # ViT-L/16 without a classifier: what timm's vit_large_patch16_224(num_classes=0) holds
    assert sum(p.numel() for p in model.parameters()) == 303_301_632


def test_vit_patch8_pos_embed_shape():
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=8, embed_dim=64, depth=1, num_heads=2)
    assert shapes_of(model) == official_vit_keys(64, 1, 8, 784)


@pytest.mark.parametrize(
    "patch_size, depth, input_hw",
    [
        (16, 12, (224, 224)),  # training grid: pos_embed used as is
        (16, 12, (96, 96)),  # local-crop size: bicubic interpolation
        (16, 12, (96, 64)),  # non-square: checks which axis gets which scale
        (16, 12, (112, 448)),  # same patch count as 224^2 but not square
        (8, 2, (224, 224)),
        (8, 2, (96, 96)),
    ],
)
def test_vit_matches_official_forward(patch_size, depth, input_hw):
    dim, _, heads = VIT_ARCHS["vit_tiny"]
    model = VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=dim, depth=depth, num_heads=heads)
    reference = RefViT(224, patch_size, dim, depth, heads)
    reference.load_state_dict(model.state_dict(), strict=True)
    model.eval()
    images = torch.randn(2, 3, *input_hw)
    with torch.no_grad():
        ours, expected = model(images), reference(images)
    assert ours.shape == (2, dim)
    # Fused attention sums in another order than the reference's explicit softmax.
    assert_close_at_scale(ours, expected, 1e-5)


def test_pos_embed_interpolation_uses_official_scale_factor():
    # Interpolating to an exact output size gives different numbers than the
    # official scale_factor=(n + 0.1) / sqrtN call; features must follow upstream.
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2)
    resized = model.pos_embed_for(96, 96)
    grid = model.pos_embed[:, 1:].reshape(1, 14, 14, 32).permute(0, 3, 1, 2)
    by_size = nn.functional.interpolate(grid, size=(6, 6), mode="bicubic")
    by_size = by_size.permute(0, 2, 3, 1).reshape(1, 36, 32)
    assert resized.shape == (1, 37, 32)
    torch.testing.assert_close(resized[:, :1], model.pos_embed[:, :1])
    assert not torch.allclose(resized[:, 1:], by_size, atol=1e-4)


def test_vit_get_intermediate_layers():
    model = build_backbone("vit_mini", img_size=32, patch_size=8).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        layers = model.get_intermediate_layers(images, n=2)
        final = model(images)
    assert len(layers) == 2 and layers[0].shape == (2, 17, 128)
    torch.testing.assert_close(layers[-1][:, 0], final)


def test_vit_init_follows_official():
    model = build_backbone("vit_small")
    for name, param in model.named_parameters():
        if name.endswith("bias") and "patch_embed" not in name:
            assert torch.all(param == 0), name
        if ".norm" in name or name.startswith("norm."):
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(param == expected), name
    qkv = model.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 2e-3
    assert abs(model.pos_embed.std().item() - 0.02) < 2e-3
    assert model.pos_embed.abs().max() <= 2.0


def test_drop_path_rates_rise_linearly():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=5, num_heads=2, drop_path_rate=0.2)
    rates = [block.drop_path.drop_prob for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


def test_drop_path_random_in_train_and_identity_in_eval():
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.5)
    images = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        train_a = model(images)
        torch.manual_seed(2)
        train_b = model(images)
        torch.manual_seed(1)
        train_a_again = model(images)
        model.eval()
        eval_a, eval_b = model(images), model(images)
        plain = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        eval_plain = plain(images)
    assert not torch.allclose(train_a, train_b)
    torch.testing.assert_close(train_a, train_a_again)
    torch.testing.assert_close(eval_a, eval_b)
    torch.testing.assert_close(eval_a, eval_plain)


def test_drop_path_is_per_sample():
    from dino_dist.models.vit import DropPath

    x = torch.ones(1000, 3, 4)
    scales = DropPath(0.3).train().scales(x)
    assert scales.shape == (2, 1000, 1, 1)
    per_sample = (x * scales[0]).flatten(1)
    # Every sample is either fully kept (scaled by 1/keep) or fully dropped.
    assert torch.all((per_sample == 0).all(1) | torch.isclose(per_sample, torch.tensor(1 / 0.7)).all(1))
    kept_fraction = (per_sample[:, 0] > 0).float().mean().item()
    assert 0.6 < kept_fraction < 0.8
    assert DropPath(0.3).eval().scales(x) is None and DropPath(0.0).train().scales(x) is None


def test_stochastic_depth_draws_once_per_forward_as_the_blocks_would_one_by_one():
    """The ViT draws every block's factors in one call; the numbers, and so the output, are
    those of each block drawing its own in turn, and both are DINO's x + drop(branch) with
    drop(y) = y / keep * floor(keep + U) (rounding aside)."""
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=4, num_heads=2,
                              drop_path_rate=0.5).train()
    x = torch.randn(64, 3, 32, 32)
    torch.manual_seed(3)
    together = model.forward_tokens(x)

    torch.manual_seed(3)
    tokens = model.prepare_tokens(x)
    for block in model.blocks:
        tokens = block(tokens)
    one_by_one = model.norm(tokens)
    assert torch.equal(together, one_by_one)

    torch.manual_seed(3)
    tokens = model.prepare_tokens(x)
    for block in model.blocks:
        keep = 1 - block.drop_path.drop_prob

        def dino_drop(y):
            if not block.drop_path.active:
                return y
            return y.div(keep) * torch.floor(keep + torch.rand(y.shape[0], 1, 1))

        tokens = tokens + dino_drop(block.ls1(block.attn(block.norm1(tokens))))
        tokens = tokens + dino_drop(block.ls2(block.mlp(block.norm2(tokens))))
    official = model.norm(tokens)
    assert_close_at_scale(together, official, 1e-5)
    with torch.no_grad():  # and something was dropped: the check would see a wrong factor
        assert not torch.allclose(together, model.eval().forward_tokens(x), atol=1e-3)


# ---------------------------------------------------------------------------
# Head
# ---------------------------------------------------------------------------
def test_head_state_dict_matches_official_layout():
    head = DINOHead(384, 1000, hidden_dim=64, bottleneck_dim=32)
    assert shapes_of(head) == {
        "mlp.0.weight": (64, 384),
        "mlp.0.bias": (64,),
        "mlp.2.weight": (64, 64),
        "mlp.2.bias": (64,),
        "mlp.4.weight": (32, 64),
        "mlp.4.bias": (32,),
        "last_layer.weight_g": (1000, 1),
        "last_layer.weight_v": (1000, 32),
    }


def test_head_with_bn_uses_official_indices():
    head = DINOHead(16, 10, use_bn=True, hidden_dim=8, bottleneck_dim=4)
    linear_keys = {k for k in head.state_dict() if k.endswith(".weight") and k.startswith("mlp.")}
    assert linear_keys == {"mlp.0.weight", "mlp.1.weight", "mlp.3.weight", "mlp.4.weight", "mlp.6.weight"}
    assert isinstance(head.mlp[1], nn.BatchNorm1d) and isinstance(head.mlp[4], nn.BatchNorm1d)


def test_head_single_layer():
    head = DINOHead(16, 10, nlayers=1, bottleneck_dim=4)
    assert isinstance(head.mlp, nn.Linear) and head.mlp.weight.shape == (4, 16)
    assert head(torch.randn(3, 16)).shape == (3, 10)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_weight_g_frozen_only_when_normed(norm_last_layer):
    head = DINOHead(16, 10, norm_last_layer=norm_last_layer, hidden_dim=8, bottleneck_dim=4)
    assert head.last_layer.weight_g.requires_grad is (not norm_last_layer)
    assert torch.all(head.last_layer.weight_g == 1)
    assert head(torch.randn(5, 16)).shape == (5, 10)


def test_head_init():
    head = DINOHead(64, 50, hidden_dim=128, bottleneck_dim=32)
    for layer in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.all(layer.bias == 0)
        assert layer.weight.abs().max() <= 2.0
    assert abs(head.mlp[2].weight.std().item() - 0.02) < 3e-3
    # Upstream creates the last layer after its trunc_normal pass, so weight_v
    # keeps nn.Linear's default uniform(+-1/sqrt(fan_in)) init.
    assert head.last_layer.weight_v.abs().max() <= 1 / math.sqrt(32)
    assert head.last_layer.weight_v.std().item() > 0.1


def test_last_layer_rows_have_norm_weight_g_and_match_torch_weight_norm():
    head = DINOHead(16, 10, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    weight = head.last_layer.weight
    torch.testing.assert_close(weight.norm(dim=1, keepdim=True), head.last_layer.weight_g)

    reference = nn.utils.parametrizations.weight_norm(nn.Linear(4, 10, bias=False))
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(3, 16)
    bottleneck = nn.functional.normalize(head.mlp(x), dim=-1, p=2)
    torch.testing.assert_close(head(x), reference(bottleneck))


def test_head_gradients_reach_weight_v_and_trainable_g():
    head = DINOHead(16, 10, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4)
    head(torch.randn(5, 16)).pow(2).sum().backward()
    assert head.last_layer.weight_v.grad is not None
    assert head.last_layer.weight_g.grad is not None


# ---------------------------------------------------------------------------
# Multi-crop wrapper
# ---------------------------------------------------------------------------
def small_model(out_dim=20):
    backbone = build_backbone("vit_mini", patch_size=8, img_size=32)
    return MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, out_dim, hidden_dim=32, bottleneck_dim=16))


def test_multicrop_matches_per_crop_and_groups_by_resolution():
    model = small_model().eval()
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    batch_sizes = []
    model.backbone.register_forward_hook(lambda mod, args, out: batch_sizes.append(args[0].shape[0]))
    with torch.no_grad():
        out = model(crops)
        assert batch_sizes == [4, 6]
        expected = torch.cat([model.head(model.backbone(crop)) for crop in crops])
    assert out.shape == (10, 20)
    # A batch of another size may take another matmul kernel, summing in another order.
    assert_close_at_scale(out, expected, 1e-5)


def test_multicrop_runs_head_once_and_keeps_non_consecutive_order():
    model = small_model().eval()
    sizes = [32, 16, 32]
    crops = [torch.randn(1, 3, s, s) for s in sizes]
    head_calls, backbone_calls = [], []
    model.head.register_forward_hook(lambda mod, args, out: head_calls.append(args[0].shape[0]))
    model.backbone.register_forward_hook(lambda mod, args, out: backbone_calls.append(args[0].shape[-1]))
    with torch.no_grad():
        out = model(crops)
        assert head_calls == [3] and backbone_calls == sizes
        expected = torch.cat([model.head(model.backbone(crop)) for crop in crops])
    assert_close_at_scale(out, expected, 1e-5)


def test_multicrop_accepts_single_tensor():
    model = small_model().eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), model([images]))


# ---------------------------------------------------------------------------
# ResNet and builders
# ---------------------------------------------------------------------------
def test_resnet50_backbone_features():
    model = resnet50_backbone().eval()
    with torch.no_grad():
        features = model(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 2048)
    assert model.embed_dim == 2048
    assert isinstance(model.fc, nn.Identity)


def test_resnet50_backbone_is_torchvisions_resnet50_without_the_classifier():
    """Same parameter names and the same init from the same seed: the official checkpoints
    and earlier runs still load."""
    from torchvision.models import resnet50
    torch.manual_seed(0)
    reference = resnet50(weights=None).state_dict()
    torch.manual_seed(0)
    ours = resnet50_backbone().state_dict()
    assert list(ours) == [k for k in reference if not k.startswith("fc.")]
    assert all(torch.equal(ours[k], reference[k]) for k in ours)


def test_arch_names_and_builder():
    assert set(ARCH_NAMES) == {"vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2",
                               "vit_mini", "resnet50"}
    model = build_model("vit_mini", 8, 0.1, 30, head_hidden_dim=32, head_bottleneck_dim=16)
    assert isinstance(model, MultiCropWrapper)
    assert model.backbone.embed_dim == 128
    assert model.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert model.head.last_layer.weight_v.shape == (30, 16)
    assert model([torch.randn(2, 3, 32, 32)]).shape == (2, 30)


def test_build_backbone_rejects_unknown_arch():
    with pytest.raises(ValueError) as info:
        build_backbone("vit_giant")
    message = str(info.value)
    assert "\n" not in message and "vit_giant" in message
    for name in ARCH_NAMES:
        assert name in message


# ---------------------------------------------------------------------------
# Optimiser helpers
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_last_layer_parameters(norm_last_layer):
    model = build_model(
        "vit_mini", 8, 0.0, 30, norm_last_layer=norm_last_layer, head_hidden_dim=32, head_bottleneck_dim=16
    )
    params = last_layer_parameters(model)
    expected = [model.head.last_layer.weight_v]
    if not norm_last_layer:
        expected = [model.head.last_layer.weight_v, model.head.last_layer.weight_g]
    assert {id(p) for p in params} == {id(p) for p in expected}


def test_param_groups_for_weight_decay():
    model = build_model("vit_mini", 8, 0.0, 30, use_bn_in_head=True, head_hidden_dim=32, head_bottleneck_dim=16)
    decay_group, no_decay_group = param_groups_for_weight_decay(model)
    assert decay_group["weight_decay_applies"] is True
    assert no_decay_group["weight_decay"] == 0.0 and no_decay_group["weight_decay_applies"] is False

    decay_ids = [id(p) for p in decay_group["params"]]
    no_decay_ids = [id(p) for p in no_decay_group["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sorted(decay_ids + no_decay_ids) == sorted(id(p) for p in trainable)
    assert len(set(decay_ids + no_decay_ids)) == len(decay_ids) + len(no_decay_ids)

    named = dict(model.named_parameters())
    for name in ["backbone.blocks.0.attn.qkv.bias", "backbone.norm.weight", "backbone.blocks.1.norm1.weight",
                 "head.mlp.1.weight", "head.mlp.0.bias"]:
        assert id(named[name]) in no_decay_ids, name
    for name in ["backbone.blocks.0.attn.qkv.weight", "backbone.cls_token", "backbone.pos_embed",
                 "backbone.patch_embed.proj.weight", "head.last_layer.weight_v"]:
        assert id(named[name]) in decay_ids, name
    # Frozen weight_g is left out entirely.
    assert id(named["head.last_layer.weight_g"]) not in decay_ids + no_decay_ids


def test_compiled_blocks_with_their_own_drop_path_rates_share_one_graph():
    """Each block has its own rate; compile must not specialise on it (with a second crop
    size, 10 blocks passed the recompile limit and the rest silently ran eager)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=10, num_heads=2,
                              drop_path_rate=0.2)
    batches = [torch.randn(4, 3, size, size) for size in (32, 16, 32, 16)]
    eager = []
    for seed, images in enumerate(batches):
        torch.manual_seed(seed)
        eager.append(model(images))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for block in model.blocks:
                block.compile(backend="aot_eager")  # the guards, not the kernels, are tested
            for seed, images in enumerate(batches):
                torch.manual_seed(seed)
                compiled = model(images)
                compiled.sum().backward()
                torch.testing.assert_close(compiled, eager[seed])
    finally:
        torch._dynamo.reset()
