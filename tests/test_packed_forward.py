"""model.packed_crops: both crop resolutions in one pass of packed rows, block-diagonal attention.

The packed student must compute what the per-resolution student computes (outputs, features,
every gradient; fp32, within 1e-5 of each tensor's largest value), drop whole crops under
stochastic depth, fall back where it cannot pack, and train to the same weights through the
real entry point.
"""
from __future__ import annotations

import logging
import time

import pytest
import torch

from dino_dist.config import ConfigError, load_config
from dino_dist.config import TrainConfig
from dino_dist.distributed.parallel import apply_block_options
from dino_dist.models import DINOHead, MultiCropWrapper, build_backbone, resnet50_backbone
from dino_dist.models.multicrop import packable_images
from dino_dist.models.packing import PackedLayout
from dino_dist.models.vit import Block, DropPath
from dino_dist.training.build import build_student_teacher
from tests.conftest import max_relative_error, run_train, state_at, tiny_overrides, write_image_folder
from tests.tolerance import assert_close_at_scale, difference_at_scale

N_GLOBAL, N_LOCAL, BATCH = 2, 4, 3
# Packing changes the order of the attention's sums, so elements near zero carry the rounding
# of large ones; measured on an AMD EPYC, every output and gradient is within 1e-6 of its
# tensor's largest value, where an element-wise 1e-5 failed.
TOLERANCE = 1e-5


def make_model(drop_path_rate: float = 0.0, packed: bool = True) -> MultiCropWrapper:
    torch.manual_seed(0)
    backbone = build_backbone("vit_mini", patch_size=8, img_size=32, drop_path_rate=drop_path_rate)
    head = DINOHead(backbone.embed_dim, 24, hidden_dim=32, bottleneck_dim=16)
    return MultiCropWrapper(backbone, head, packed_crops=packed)


def make_crops(n_local: int = N_LOCAL, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(BATCH, 3, 32, 32, generator=g) for _ in range(N_GLOBAL)]
            + [torch.randn(BATCH, 3, 16, 16, generator=g) for _ in range(n_local)])


def outputs_and_grads(model: MultiCropWrapper, crops: list[torch.Tensor], packed: bool):
    """Head outputs and every parameter's gradient of a loss that weighs each output."""
    model.packed_crops = packed
    model.zero_grad(set_to_none=True)
    out = model(crops)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * weights).sum().backward()
    return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                          if p.grad is not None}


def assert_same(packed, unpacked) -> None:
    (out_p, grads_p), (out_u, grads_u) = packed, unpacked
    assert_close_at_scale(out_p, out_u, TOLERANCE, "output")
    assert grads_p.keys() == grads_u.keys()
    for name in grads_u:
        assert_close_at_scale(grads_p[name], grads_u[name], TOLERANCE, name)


def block_input_shapes(model: MultiCropWrapper) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    model.backbone.blocks[0].register_forward_hook(lambda m, args, out: shapes.append(out.shape))
    return shapes


# ---------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------
def test_layout_deals_local_images_into_rows_and_back():
    rows, local_images = 2, 4
    global_tokens = torch.arange(rows * 3).reshape(rows, 3, 1).float()
    local_tokens = 100 + torch.arange(local_images * 2).reshape(local_images, 2, 1).float()
    layout = PackedLayout.of(global_tokens, local_tokens)
    assert (layout.global_len, layout.local_len, layout.locals_per_row, layout.row_len) == (3, 2, 2, 7)
    packed = layout.pack(global_tokens, local_tokens)
    # row r: global image r, then local images r and rows + r
    assert packed[0, :, 0].tolist() == [0, 1, 2, 100, 101, 104, 105]
    assert packed[1, :, 0].tolist() == [3, 4, 5, 102, 103, 106, 107]
    assert layout.crop_starts(torch.device("cpu")).tolist() == [0, 0, 0, 3, 3, 5, 5]
    cls = layout.cls_tokens(packed)[:, 0].tolist()
    assert cls == [0, 3, 100, 102, 104, 106]  # each image's first token, unpacked order


def test_layout_refuses_local_images_that_do_not_deal_evenly():
    with pytest.raises(ValueError, match="do not deal evenly"):
        PackedLayout.of(torch.zeros(4, 5, 1), torch.zeros(6, 2, 1))


# ---------------------------------------------------------------------------
# Same numbers as the per-resolution path
# ---------------------------------------------------------------------------
def test_packed_student_equals_per_resolution_outputs_and_gradients():
    model = make_model().train()
    crops = make_crops()
    shapes = block_input_shapes(model)
    packed = outputs_and_grads(model, crops, packed=True)
    # one pass: 6 rows of (17 global + 2 x 5 local tokens); then the usual two passes
    assert shapes == [(6, 27, 128)]
    unpacked = outputs_and_grads(model, crops, packed=False)
    assert shapes[1:] == [(6, 17, 128), (12, 5, 128)]
    assert packed[0].shape == (BATCH * (N_GLOBAL + N_LOCAL), 24)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(packed[1]) == len(trainable)  # every trainable parameter got a gradient
    assert_same(packed, unpacked)


def test_packed_backbone_features_equal_per_resolution():
    backbone = make_model().backbone.train()
    global_images, local_images = packable_images(make_crops())
    with torch.no_grad():
        packed = backbone.forward_packed(global_images, local_images)
        unpacked = torch.cat((backbone(global_images), backbone(local_images)))
    assert_close_at_scale(packed, unpacked, TOLERANCE)


def test_crops_not_dealing_evenly_run_per_resolution_with_the_same_outputs():
    model = make_model().train()
    crops = make_crops(n_local=3)  # 3 local crops over 2 global ones
    assert packable_images(crops) is None
    shapes = block_input_shapes(model)
    packed = outputs_and_grads(model, crops, packed=True)
    assert shapes == [(6, 17, 128), (9, 5, 128)]
    assert_same(packed, outputs_and_grads(model, crops, packed=False))


def test_one_resolution_and_evaluation_outputs_run_per_resolution():
    model = make_model().eval()
    crops = make_crops()
    shapes = block_input_shapes(model)
    with torch.no_grad():
        teacher_like = model(crops[:N_GLOBAL])
        features = model(crops, output="backbone")
        attention = model(crops[:N_GLOBAL], output="cls_attention")
    assert shapes == [(6, 17, 128), (6, 17, 128), (12, 5, 128), (6, 17, 128)]
    assert teacher_like.shape == (6, 24) and features.shape == (18, 128)
    assert attention.shape == (6, 4, 17)


def test_packing_keeps_the_state_dict():
    assert make_model(packed=True).state_dict().keys() == make_model(packed=False).state_dict().keys()


# ---------------------------------------------------------------------------
# Stochastic depth drops whole crops
# ---------------------------------------------------------------------------
def test_drop_path_keeps_or_drops_each_packed_crop_whole_at_the_drop_rate():
    torch.manual_seed(0)
    drop_prob, rows = 0.3, 4000
    layout = PackedLayout(global_len=5, local_len=3, locals_per_row=2)
    starts = layout.crop_starts(torch.device("cpu"))
    drop_path = DropPath(drop_prob).train()
    ones = torch.ones(rows, layout.row_len, 2)
    out = ones * drop_path.scales(ones, crop_starts=starts)[1]
    crops = [out[:, 0:5], out[:, 5:8], out[:, 8:11]]
    kept = []
    for crop in crops:
        values = crop.flatten(1)
        whole = (values == 0).all(1) | torch.isclose(values, torch.tensor(1 / 0.7)).all(1)
        assert whole.all()  # every crop fully kept (rescaled) or fully dropped
        kept.append(values[:, 0] > 0)
    for crop_kept in kept:  # the per-crop keep rate, ~7 standard errors wide
        assert abs(crop_kept.float().mean().item() - 0.7) < 0.05
    both = (kept[0] & kept[1]).float().mean().item()  # crops of one row draw independently
    assert abs(both - 0.49) < 0.05


def test_packed_block_applies_each_branch_to_whole_crops():
    """Through a real block: each crop's output is one of the four per-crop results
    (attention branch kept or dropped, MLP branch kept or dropped), all four turning up."""
    torch.manual_seed(0)
    keep = 0.5
    block = Block(16, 2, 4.0, True, drop_path_rate=1 - keep).train()
    layout = PackedLayout(global_len=4, local_len=2, locals_per_row=3)
    tokens = torch.randn(40, layout.row_len, 16)
    with torch.no_grad():
        out = block(tokens, crop_starts=layout.crop_starts(tokens.device))
    bounds = [(0, 4), (4, 6), (6, 8), (8, 10)]
    seen = set()
    for row in range(tokens.shape[0]):
        for start, end in bounds:
            crop, result = tokens[row:row + 1, start:end], out[row:row + 1, start:end]
            with torch.no_grad():
                attended = block.attn(block.norm1(crop))
                options = {}
                for attn_scale in (0.0, 1 / keep):
                    mid = crop + attn_scale * attended
                    mlp = block.mlp(block.norm2(mid))
                    for mlp_scale in (0.0, 1 / keep):
                        options[(attn_scale, mlp_scale)] = mid + mlp_scale * mlp
            match = [k for k, v in options.items() if difference_at_scale(result, v) <= TOLERANCE]
            assert match, (row, start)
            seen.add(match[0])
    assert len(seen) == 4


# ---------------------------------------------------------------------------
# Block options: activation checkpointing and compile
# ---------------------------------------------------------------------------
def test_activation_checkpointing_recomputes_the_same_crop_masks():
    """With stochastic depth on, the recomputed forward must draw the masks it drew first."""
    crops = make_crops()
    plain = make_model(drop_path_rate=0.3).train()
    torch.manual_seed(3)
    expected = outputs_and_grads(plain, crops, packed=True)
    checkpointed = make_model(drop_path_rate=0.3).train()
    apply_block_options(checkpointed, TrainConfig(activation_checkpointing=True))
    torch.manual_seed(3)
    assert_same(outputs_and_grads(checkpointed, crops, packed=True), expected)


def test_packed_blocks_compile_per_block_to_the_eager_numbers():
    """Per-block compile as training applies it, stochastic depth on; aot_eager traces the
    graphs and guards without generating kernels (inductor takes ~20 s here on a CPU)."""
    crops = make_crops()
    model = make_model(drop_path_rate=0.3).train()
    eager = []
    for seed in range(2):
        torch.manual_seed(seed)
        eager.append(outputs_and_grads(model, crops, packed=True))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
            for block in model.backbone.blocks:
                block.compile(backend="aot_eager")
            for seed in range(2):  # the second step reuses the graphs
                torch.manual_seed(seed)
                assert_same(outputs_and_grads(model, crops, packed=True), eager[seed])
    finally:
        torch._dynamo.reset()


# ---------------------------------------------------------------------------
# Build and training
# ---------------------------------------------------------------------------
def test_build_packs_the_student_only(tmp_path):
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path, **{"model.packed_crops": True}))
    student, teacher = build_student_teacher(cfg)
    assert student.packed_crops and not teacher.packed_crops
    assert student.state_dict().keys() == teacher.state_dict().keys()


def test_build_refuses_packing_a_resnet(tmp_path):
    with pytest.raises(ConfigError, match="model.packed_crops") as info:
        load_config(None, tiny_overrides(tmp_path, tmp_path, **{
            "model.packed_crops": True, "model.arch": "resnet50"}))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="ViT backbone"):
        MultiCropWrapper(resnet50_backbone(), DINOHead(2048, 8), packed_crops=True)


def test_build_warns_when_local_crops_do_not_split_over_global_crops(tmp_path, caplog):
    cfg = load_config(None, tiny_overrides(tmp_path, tmp_path, **{
        "model.packed_crops": True, "data.local_crops_number": 3}))
    with caplog.at_level(logging.WARNING, logger="dino_dist"):
        build_student_teacher(cfg)
    assert any("per crop resolution" in r.getMessage() for r in caplog.records)


def test_packed_training_run_equals_the_per_resolution_run(tmp_path):
    """The real entry point, 1 process, 4 optimizer steps: same student, teacher and center."""
    data = write_image_folder(tmp_path / "images", classes=2, per_class=16)
    states = {}
    for packed in (False, True):
        out = tmp_path / f"packed_{packed}"
        run_train(tiny_overrides(data, out, **{"train.max_steps": 4, "model.packed_crops": packed,
                                               "model.drop_path_rate": 0.0}))
        states[packed] = state_at(out, 4)
    assert states[True]["config"]["model"]["packed_crops"] is True
    for part in ("student", "teacher", "loss"):
        err, key = max_relative_error(states[True][part], states[False][part])
        assert err < 1e-5, f"{part}.{key} differs by {err:.2e} relative"
