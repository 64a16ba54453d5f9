"""Collapse and stability statistics against hand-computed values, and the engine wiring."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dino_dist.training.objective import LossParts
from dino_dist.observe.diagnostics import (StepStatistics, parameter_groups, prototype_counts,
                                           state_values, teacher_entropy_sum)
from dino_dist.training.loss import DINOLoss
from dino_dist.observe.memory import memory_values
from tests.test_engine import make_engine, random_crops, tiny_cfg

NEG = -1e4  # a logit whose probability is 0 to float precision


def test_teacher_entropy_of_known_distributions():
    # Row 0: uniform over 4 -> ln 4. Row 1: (1/2, 1/4, 1/4, 0) -> 1.5 ln 2. T = 1, no center.
    teacher = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                            [math.log(0.5), math.log(0.25), math.log(0.25), NEG]])
    total = teacher_entropy_sum(teacher, torch.zeros(1, 4), teacher_temp=1.0)
    assert float(total) == pytest.approx(math.log(4) + 1.5 * math.log(2), rel=1e-6)


def test_entropy_uses_center_and_temperature():
    # Centering removes the offset of column 0; T = 0.5 doubles the remaining logit gap.
    teacher = torch.tensor([[5.0 + math.log(2) / 2, 0.0]])
    center = torch.tensor([[5.0, 0.0]])
    p = 2 / 3  # softmax([ln 2, 0]) = (2/3, 1/3)
    expected = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert float(teacher_entropy_sum(teacher, center, 0.5)) == pytest.approx(expected, rel=1e-6)


def test_prototype_counts_after_centering():
    teacher = torch.tensor([[3.0, 0.0, 1.0], [3.0, 2.5, 0.0], [0.0, 0.0, 4.0]])
    counts = prototype_counts(teacher, torch.tensor([[2.0, 0.0, 0.0]]))
    assert counts.tolist() == [1.0, 1.0, 1.0]  # without the center: [2, 0, 1]
    assert prototype_counts(teacher, torch.zeros(1, 3)).tolist() == [2.0, 0.0, 1.0]


def test_kl_equals_cross_entropy_minus_teacher_entropy_over_the_loss_pairs():
    """KL read from the statistics equals the mean over the loss's (teacher i, student v != i)
    pairs of KL(teacher_i || student_v), computed here term by term."""
    torch.manual_seed(0)
    batch, out_dim, n_crops, temp = 3, 5, 4, 0.07
    student = torch.randn(n_crops * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)
    loss_fn = DINOLoss(out_dim, n_global_crops=2, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.1)
    loss = float(loss_fn(student, teacher, temp, n_crops))
    stats = StepStatistics(out_dim, groups=[], device=torch.device("cpu"))
    stats.add_teacher(teacher, loss_fn.center, temp)
    stats.take_reduced(stats.reduction_part().clone())
    values = stats.read(loss)

    p_t = torch.softmax((teacher - loss_fn.center) / temp, dim=-1).chunk(2)
    logp_s = torch.log_softmax(student / 0.1, dim=-1).chunk(n_crops)
    kls = [(p_t[i] * (p_t[i].log() - logp_s[v])).sum(dim=-1).mean()
           for i in range(2) for v in range(n_crops) if v != i]
    assert values["kl"] == pytest.approx(float(torch.stack(kls).mean()), rel=1e-5)
    entropy = float(-(torch.cat(p_t) * torch.cat(p_t).log()).sum(dim=-1).mean())
    assert values["teacher_entropy"] == pytest.approx(entropy, rel=1e-5)
    assert values["entropy_ratio"] == pytest.approx(entropy / math.log(out_dim), rel=1e-5)
    assert values["loss_ratio"] == pytest.approx(loss / math.log(out_dim))
    winners = (teacher - loss_fn.center).argmax(dim=-1).unique().numel()
    assert values["prototypes_used"] == winners
    assert values["prototype_share"] == pytest.approx(winners / out_dim)


def pair_outputs(batch: int, out_dim: int, n_crops: int, seed: int):
    """Crop-major student and teacher outputs where students often pick the teacher's winner
    (teacher global crop 0's logits plus noise), so agreement is neither 0 nor 1."""
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(2 * batch, out_dim, generator=g)
    shared = teacher[:batch].repeat(n_crops, 1)
    student = shared + 1.5 * torch.randn(n_crops * batch, out_dim, generator=g)
    return student, teacher


def pair_statistics(student, teacher, center, temp, n_global=2) -> StepStatistics:
    """StepStatistics filled from one micro-batch and 'reduced' over a single rank."""
    stats = StepStatistics(teacher.shape[-1], groups=[], device=torch.device("cpu"))
    stats.add_teacher(teacher, center, temp)
    stats.add_pairs(student, teacher, center, temp, 0.1, n_global)
    stats.take_reduced(stats.reduction_part().clone())
    return stats


def test_loss_split_and_agreement_equal_a_pair_by_pair_reference():
    batch, out_dim, n_crops, temp = 5, 6, 5, 0.07
    student, teacher = pair_outputs(batch, out_dim, n_crops, seed=1)
    loss_fn = DINOLoss(out_dim, n_global_crops=2, student_temp=0.1)
    loss_fn.center.copy_(torch.randn(1, out_dim, generator=torch.Generator().manual_seed(2)))
    loss = float(loss_fn(student, teacher, temp, n_crops))
    values = pair_statistics(student, teacher, loss_fn.center, temp).read(loss)

    p_t = torch.softmax((teacher - loss_fn.center) / temp, dim=-1).chunk(2)
    logp_s = torch.log_softmax(student / 0.1, dim=-1).chunk(n_crops)
    wins_t = [(t - loss_fn.center).argmax(dim=-1) for t in teacher.chunk(2)]
    wins_s = [s.argmax(dim=-1) for s in student.chunk(n_crops)]
    ce = {"global": [], "local": []}
    agree = []
    for i in range(2):
        for v in (v for v in range(n_crops) if v != i):
            for b in range(batch):
                ce["global" if v < 2 else "local"].append(float(-(p_t[i][b] * logp_s[v][b]).sum()))
                agree.append(bool(wins_s[v][b] == wins_t[i][b]))
    assert values["loss_global"] == pytest.approx(sum(ce["global"]) / len(ce["global"]), rel=1e-5)
    assert values["loss_local"] == pytest.approx(sum(ce["local"]) / len(ce["local"]), rel=1e-5)
    assert values["agreement"] == pytest.approx(sum(agree) / len(agree), abs=1e-12)
    assert 0 < values["agreement"] < 1  # the reference has both outcomes: the test can fail
    # The loss is the pair-count weighted mix: 2 global-view and 6 local-view pairs per image.
    mix = (2 * values["loss_global"] + 6 * values["loss_local"]) / 8
    assert mix == pytest.approx(loss, rel=1e-6)


def test_two_halves_reduced_give_the_whole_batch_figures():
    """2 ranks x B/2 (or 2 micro-batches): summing the halves' reduction parts, as the
    engine's all-reduce does, gives exactly the figures of 1 x B."""
    batch, out_dim, n_crops, temp = 6, 8, 4, 0.05
    student, teacher = pair_outputs(batch, out_dim, n_crops, seed=3)
    center = torch.randn(1, out_dim, generator=torch.Generator().manual_seed(4)) * 0.1
    loss = 2.0  # only kl depends on it, alike in both
    whole = pair_statistics(student, teacher, center, temp).read(loss)

    def half(outputs, crops, part):  # crop-major rows: each crop's images are split
        return outputs.view(crops, batch, out_dim)[:, part].reshape(-1, out_dim)

    halves = [pair_statistics(half(student, n_crops, part), half(teacher, 2, part), center, temp)
              for part in (slice(0, batch // 2), slice(batch // 2, batch))]
    reduced = halves[0]
    reduced.take_reduced(halves[0].reduction_part() + halves[1].reduction_part())
    split = reduced.read(loss)
    assert set(split) == set(whole) >= {"loss_global", "loss_local", "agreement"}
    for name, value in whole.items():
        assert split[name] == pytest.approx(value, rel=1e-6), name


def test_without_local_crops_only_the_global_split_is_reported():
    student, teacher = pair_outputs(batch=4, out_dim=5, n_crops=2, seed=5)
    loss_fn = DINOLoss(5, n_global_crops=2, student_temp=0.1)
    loss = float(loss_fn(student, teacher, 0.1, 2))
    values = pair_statistics(student, teacher, loss_fn.center, 0.1).read(loss)
    assert "loss_local" not in values and "agreement" in values
    assert values["loss_global"] == pytest.approx(loss, rel=1e-6)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(2, 2, bias=False)
        self.head = nn.Sequential(nn.Linear(2, 1, bias=False))
        self.head.last_layer = nn.Linear(1, 1, bias=False)


def test_gradient_norms_per_group():
    model = _Tiny()
    params = list(model.parameters())
    groups = parameter_groups(model, params, list(model.head.last_layer.parameters()))
    assert groups == [0, 1, 2]
    model.backbone.weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5
    model.head.last_layer.weight.grad = torch.tensor([[-2.0]])  # the head's Linear has none
    stats = StepStatistics(4, groups, torch.device("cpu"))
    grads = [p.grad for p in params if p.grad is not None]
    stats.add_grad_norms(params, torch._foreach_norm(grads))
    stats.take_reduced(stats.reduction_part().clone())
    values = stats.read(loss=1.0)
    assert values["grad_norm_backbone"] == pytest.approx(5.0)
    assert values["grad_norm_head"] == 0.0
    assert values["grad_norm_last_layer"] == pytest.approx(2.0)


def test_state_values_report_center_norm_and_fp16_scale():
    center = torch.tensor([[3.0, 4.0]])
    assert state_values(center, torch.amp.GradScaler("cpu", enabled=False)) == {"center_norm": 5.0}
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    assert state_values(center, scaler)["grad_scale"] == 1024.0


def test_memory_values_on_cpu():
    values = memory_values(torch.device("cpu"))
    assert set(values) == {"host_rss_mb", "host_peak_rss_mb"}
    assert 10 < values["host_rss_mb"] <= values["host_peak_rss_mb"] + 1


def test_engine_fills_statistics_only_when_given_and_trains_the_same(tmp_path):
    cfg = tiny_cfg(tmp_path)
    plain, watched = make_engine(cfg), make_engine(cfg)
    stats = StepStatistics(cfg.model.out_dim,
                           parameter_groups(watched.student, watched.trainable,
                                            watched.last_layer_params), torch.device("cpu"))
    crops = random_crops(4, 0)
    with torch.no_grad():
        teacher_out = watched.teacher(crops[:2])
    for engine, statistics in ((plain, None), (watched, stats)):
        engine.micro_step(crops, 0, 1.0, sync_grads=True, stats=statistics)
        result = engine.finish_step(0, epoch=1, stats=statistics)
    for model in ("student", "teacher"):  # the statistics change nothing in training
        for a, b in zip(getattr(plain, model).parameters(), getattr(watched, model).parameters()):
            assert torch.equal(a, b)
    assert torch.equal(plain.loss_fn.center, watched.loss_fn.center)
    values = stats.read(result.loss)
    # The split is the DINO term's; 2 global + 2 local crops: 2 global-view and 4 local-view
    # pairs per image. The default recipe adds KoLeo (weight cfg.loss.koleo_weight) to it.
    mix = (2 * values["loss_global"] + 4 * values["loss_local"]) / 6
    assert mix == pytest.approx(values["loss_dino"], rel=1e-5)
    assert cfg.loss.koleo_weight > 0
    total = values["loss_dino"] + cfg.loss.koleo_weight * values["loss_koleo"]
    assert total == pytest.approx(result.loss, rel=1e-5)
    assert 0 <= values["agreement"] <= 1
    expected = float(teacher_entropy_sum(teacher_out, torch.zeros(1, cfg.model.out_dim),
                                         float(watched.schedules.teacher_temp[0]))) / 8
    assert values["teacher_entropy"] == pytest.approx(expected, rel=1e-5)
    total = math.sqrt(sum(values[f"grad_norm_{g}"] ** 2
                          for g in ("backbone", "head", "last_layer")))
    assert total == pytest.approx(float(result.grad_norm), rel=1e-5)


def test_accumulated_micro_batches_give_the_whole_batch_figures(tmp_path):
    """The engine's k = 2 micro-batches of B/2 report the figures of one batch of B."""
    cfg = tiny_cfg(tmp_path)
    crops_a, crops_b = random_crops(4, 1), random_crops(4, 2)
    figures = []
    for micro_batches in ([crops_a, crops_b], [[torch.cat(p) for p in zip(crops_a, crops_b)]]):
        engine = make_engine(cfg)
        stats = StepStatistics(cfg.model.out_dim, parameter_groups(
            engine.student, engine.trainable, engine.last_layer_params), torch.device("cpu"))
        for j, crops in enumerate(micro_batches):
            engine.micro_step(crops, 0, 1.0 / len(micro_batches),
                              sync_grads=j == len(micro_batches) - 1, stats=stats)
        figures.append(stats.read(engine.finish_step(0, epoch=1, stats=stats).loss))
    split, whole = figures
    assert set(split) == set(whole) >= {"loss_global", "loss_local", "agreement"}
    for name, value in whole.items():
        assert split[name] == pytest.approx(value, rel=1e-5), name


def test_patch_targets_and_loss_terms_are_read_like_the_cls_figures():
    """iBOT's patch targets give their own entropy share and prototypes in use; each loss
    term is the mean of its micro-batch values weighted as the loss is; the KL and the loss
    ratio are the DINO term's."""
    out_dim, patch_dim = 6, 5
    stats = StepStatistics(out_dim, groups=[], device=torch.device("cpu"), patch_dim=patch_dim)
    cls = torch.softmax(torch.randn(4, out_dim, generator=torch.Generator().manual_seed(0)), -1)
    uniform_patches = torch.full((3, patch_dim), 1 / patch_dim)
    one_hot_patches = torch.eye(patch_dim)[[1, 1, 3]]
    stats.add_targets(cls)
    stats.add_patch_targets(torch.cat((uniform_patches, one_hot_patches)))
    for weight, (dino, koleo, ibot) in ((0.25, (2.0, -1.0, 3.0)), (0.75, (4.0, -3.0, 1.0))):
        stats.add_losses(LossParts(torch.tensor(dino), torch.tensor(koleo), torch.tensor(ibot)),
                         weight)
    stats.take_reduced(stats.reduction_part().clone())
    values = stats.read(loss=99.0)
    assert values["loss_dino"] == pytest.approx(3.5) and values["loss_koleo"] == pytest.approx(-2.5)
    assert values["loss_ibot"] == pytest.approx(1.5)
    entropy = float(-(cls * cls.log()).sum(-1).mean())
    assert values["kl"] == pytest.approx(3.5 - entropy, rel=1e-5)
    assert values["loss_ratio"] == pytest.approx(3.5 / math.log(out_dim))
    # 3 uniform rows (entropy ln 5) and 3 one-hot rows (0): half of the maximum.
    assert values["patch_entropy_ratio"] == pytest.approx(0.5, rel=1e-5)
    # Prototype 0 (the uniform rows' argmax), 1 and 3.
    assert values["patch_prototypes_used"] == 3
    assert values["patch_prototype_share"] == pytest.approx(3 / 5)
