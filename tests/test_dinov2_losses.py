"""The dinov2 loss parts (Sinkhorn-Knopp, KoLeo, iBOT) against references written here, step
by step in the official formulation (facebookresearch/dinov2 dinov2/loss/*.py), and their
distributed forms against one process holding every row.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dino_dist.models.patch_masks import PatchMasks, mask_weights
from dino_dist.training.ibot_loss import IBOTCenter, ibot_patch_loss
from dino_dist.training.koleo import KoLeoNeighbours, koleo_loss
from dino_dist.training.sinkhorn import sinkhorn_knopp
from tests.tolerance import assert_close_at_scale

TOL = 1e-5


# ---------------------------------------------------------------- references (official math)

def reference_sinkhorn(logits: torch.Tensor, temp: float, iterations: int = 3,
                       dtype=np.float64) -> torch.Tensor:
    """dinov2's sinkhorn_knopp_teacher on one process, one prototype / sample at a time."""
    q = np.exp(logits.double().numpy().astype(dtype) / dtype(temp)).T  # K x B
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        for k in range(n_prototypes):  # each prototype's total weight: 1/K
            q[k] = q[k] / q[k].sum() / n_prototypes
        for b in range(n_samples):  # each sample's total weight: 1/B
            q[:, b] = q[:, b] / q[:, b].sum() / n_samples
    q *= n_samples
    return torch.from_numpy(q.T.astype(np.float32))


def reference_koleo(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """dinov2's KoLeoLoss, row by row: normalise, nearest other row by largest dot product
    (the diagonal counts as -1, the first maximum wins), -mean log(||a - b + 1e-8|| + eps)."""
    unit = [row / torch.sqrt((row * row).sum()).clamp(min=eps) for row in features]
    total = 0.0
    for i, row in enumerate(unit):
        dots = [(-1.0 if j == i else float((row @ other).detach())) for j, other in enumerate(unit)]
        neighbour = max(range(len(dots)), key=lambda j: (dots[j], -j))
        difference = row - unit[neighbour] + 1e-8
        total = total + torch.log(torch.sqrt((difference * difference).sum()) + eps)
    return -total / len(unit)


def reference_ibot(student: torch.Tensor, teacher: torch.Tensor, masks: torch.Tensor,
                   student_temp: float) -> float:
    """dinov2's iBOTPatchLoss.forward on dense [images, patches, K] tensors, image by image:
    the mean cross-entropy over an image's masked patches, averaged over all images."""
    total = 0.0
    for image in range(masks.shape[0]):
        image_sum, count = 0.0, 0
        for patch in range(masks.shape[1]):
            if not masks[image, patch]:
                continue
            scaled = student[image, patch].double() / student_temp
            log_p = scaled - scaled.max() - math.log(float(torch.exp(scaled - scaled.max()).sum()))
            image_sum += float((teacher[image, patch].double() * log_p).sum())
            count += 1
        total += image_sum / max(count, 1)
    return -total / masks.shape[0]


def head_logits(rows: int, prototypes: int, seed: int, dim: int = 32) -> torch.Tensor:
    """What a DINO head emits: unit vectors against weight-normed prototypes, in [-1, 1]
    (spread over all of it when `dim` is small)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(rows, dim, generator=g), dim=1)
    w = torch.nn.functional.normalize(torch.randn(prototypes, dim, generator=g), dim=1)
    return x @ w.t()


# ---------------------------------------------------------------- Sinkhorn-Knopp

@pytest.mark.parametrize("temp", [0.04, 0.07])
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_the_official_formulation(temp, iterations):
    logits = head_logits(48, 64, seed=1)
    ours = sinkhorn_knopp(logits, temp, iterations)
    assert ours.dtype == torch.float32 and ours.shape == (48, 64)
    assert_close_at_scale(ours, reference_sinkhorn(logits, temp, iterations), TOL)
    assert_close_at_scale(ours.sum(dim=1), torch.ones(48), TOL, "each sample's row sums to 1")


def test_sinkhorn_computes_in_float32_whatever_the_input():
    logits = head_logits(40, 32, seed=2).to(torch.bfloat16)
    ours = sinkhorn_knopp(logits, 0.04)
    assert ours.dtype == torch.float32
    assert_close_at_scale(ours, reference_sinkhorn(logits.float(), 0.04), TOL)


def test_sinkhorn_stays_finite_where_the_official_overflows():
    logits = head_logits(48, 64, seed=3, dim=3)
    temp = 0.008  # logits / T up to ~125: exp overflows float32 above ~88
    assert logits.max() / temp > 100
    with np.errstate(over="ignore", invalid="ignore"):
        official_fp32 = reference_sinkhorn(logits, temp, dtype=np.float32)
    assert not torch.isfinite(official_fp32).all()  # the case is real
    ours = sinkhorn_knopp(logits, temp)
    assert torch.isfinite(ours).all()
    assert_close_at_scale(ours, reference_sinkhorn(logits, temp), TOL)


def test_sinkhorn_refuses_zero_iterations():
    with pytest.raises(ValueError, match="iteration"):
        sinkhorn_knopp(head_logits(4, 8, seed=0), 0.04, iterations=0)


# ---------------------------------------------------------------- KoLeo

def backbone_features(rows: int, dim: int, seed: int) -> torch.Tensor:
    """Unnormalised features of various norms, so the normalisation's gradient matters."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, dim, generator=g, dtype=torch.float64) * (
        0.5 + 2 * torch.rand(rows, 1, generator=g, dtype=torch.float64))


def koleo_value_and_grad(features: torch.Tensor, loss_fn) -> tuple[torch.Tensor, torch.Tensor]:
    leaf = features.clone().requires_grad_()
    value = loss_fn(leaf)
    value.backward()
    return value.detach(), leaf.grad


def test_koleo_matches_the_official_value_and_gradient():
    features = backbone_features(24, 8, seed=4)
    value, grad = koleo_value_and_grad(features.float(), koleo_loss)
    ref_value, ref_grad = koleo_value_and_grad(features, reference_koleo)
    assert value.dtype == torch.float32
    assert_close_at_scale(value, ref_value.float(), TOL, "value")
    assert_close_at_scale(grad, ref_grad.float(), TOL, "gradient")


def test_koleo_surrogate_on_all_rows_is_the_loss():
    features = backbone_features(24, 8, seed=5).float()
    value, grad = koleo_value_and_grad(features, koleo_loss)
    neighbours = KoLeoNeighbours(features)
    s_value, s_grad = koleo_value_and_grad(
        features, lambda live: neighbours.surrogate(live, torch.arange(24)))
    assert_close_at_scale(s_value, value, TOL, "value")
    assert_close_at_scale(s_grad, grad, TOL, "gradient")
    assert_close_at_scale(neighbours.loss(), value, TOL, "detached loss")


def summed_surrogates(features: torch.Tensor, pieces: list[torch.Tensor]):
    """Every piece (micro-batch of a rank) backpropagates its own rows only."""
    neighbours = KoLeoNeighbours(features)
    leaf = features.clone().requires_grad_()
    total = torch.zeros(())
    for rows in pieces:
        piece = neighbours.surrogate(leaf[rows], rows)
        piece.backward()
        total += piece.detach()
    return total, leaf.grad


def test_koleo_surrogates_summed_over_micro_batches_and_ranks_are_the_global_loss():
    features = backbone_features(30, 8, seed=6).float()
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    pieces = list(order.chunk(6))  # 2 simulated ranks x 3 micro-batches, rows scattered
    value, grad = koleo_value_and_grad(features, koleo_loss)
    total, summed_grad = summed_surrogates(features, pieces)
    assert_close_at_scale(total, value, TOL, "value")
    assert_close_at_scale(summed_grad, grad, TOL, "gradient")


def test_koleo_surrogate_needs_the_neighbour_term():
    """A row whose chooser sits in another piece gets gradient through it: with every row
    in its own piece, dropping term (b) would lose all of the neighbour gradient."""
    features = backbone_features(12, 6, seed=7).float()
    _, grad = koleo_value_and_grad(features, koleo_loss)
    _, summed_grad = summed_surrogates(features, list(torch.arange(12).chunk(12)))
    assert_close_at_scale(summed_grad, grad, TOL, "gradient")


# ---------------------------------------------------------------- two real ranks

SPLITS = {"equal": 24, "unequal": 7}  # rank 0 holds the first rows, rank 1 the rest
SK_ROWS, SK_PROTOTYPES, SK_TEMP = 48, 64, 0.05
KOLEO_ROWS_PER_RANK, KOLEO_MICRO_BATCHES = 10, 2


def _two_rank_worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        logits = head_logits(SK_ROWS, SK_PROTOTYPES, seed=8)
        results = {}
        for name, split in SPLITS.items():
            part = logits[:split] if rank == 0 else logits[split:]
            results[name] = sinkhorn_knopp(part, SK_TEMP)
        # KoLeo: this rank's rows, all-gathered in rank order as the engine does.
        features = backbone_features(2 * KOLEO_ROWS_PER_RANK, 8, seed=9).float()
        mine = features[rank * KOLEO_ROWS_PER_RANK:(rank + 1) * KOLEO_ROWS_PER_RANK]
        gathered = [torch.empty_like(mine) for _ in range(2)]
        dist.all_gather(gathered, mine)
        neighbours = KoLeoNeighbours(torch.cat(gathered))
        leaf = mine.clone().requires_grad_()
        value = torch.zeros(())
        for local in torch.arange(KOLEO_ROWS_PER_RANK).chunk(KOLEO_MICRO_BATCHES):
            piece = neighbours.surrogate(leaf[local], local + rank * KOLEO_ROWS_PER_RANK)
            piece.backward()
            value += piece.detach()
        results["koleo"] = (value, leaf.grad)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("two_ranks")
    mp.spawn(_two_rank_worker, args=(str(folder / "store"), str(folder)), nprocs=2, join=True)
    return [torch.load(folder / f"rank{r}.pt") for r in range(2)]


@pytest.mark.parametrize("split", list(SPLITS))
def test_sinkhorn_on_two_ranks_equals_one_process_on_all_rows(two_ranks, split):
    logits = head_logits(SK_ROWS, SK_PROTOTYPES, seed=8)
    assert [r[split].shape[0] for r in two_ranks] == [SPLITS[split], SK_ROWS - SPLITS[split]]
    joined = torch.cat([r[split] for r in two_ranks])
    assert_close_at_scale(joined, reference_sinkhorn(logits, SK_TEMP), TOL)
    assert_close_at_scale(joined, sinkhorn_knopp(logits, SK_TEMP), TOL)


def test_koleo_on_two_ranks_is_the_loss_over_both_ranks_rows(two_ranks):
    features = backbone_features(2 * KOLEO_ROWS_PER_RANK, 8, seed=9).float()
    value, grad = koleo_value_and_grad(features, koleo_loss)
    assert_close_at_scale(sum(r["koleo"][0] for r in two_ranks), value, TOL, "value")
    assert_close_at_scale(torch.cat([r["koleo"][1] for r in two_ranks]), grad, TOL,
                          "gradient")


# ---------------------------------------------------------------- iBOT

def random_masks(images: int, patches: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(images, patches, generator=g) < torch.rand(images, 1, generator=g)
    masks[1] = False  # an image without masks still counts in the average
    return masks


def test_mask_weights_follow_the_tokens_in_mask_order():
    masks = random_masks(5, 16, seed=10)
    expected = [1.0 / max(int(masks[i].sum()), 1)
                for i in range(masks.shape[0]) for p in range(masks.shape[1]) if masks[i, p]]
    assert_close_at_scale(mask_weights(masks), torch.tensor(expected), TOL)


@pytest.mark.parametrize("teacher_temp", [0.04, 0.07])
def test_ibot_patch_loss_matches_the_official_dense_formulation(teacher_temp):
    images, patches, prototypes = 6, 16, 32
    masks = random_masks(images, patches, seed=11)
    student = head_logits(images * patches, prototypes, seed=12).view(images, patches, -1)
    teacher_logits = head_logits(images * patches, prototypes, seed=13)
    teacher = torch.softmax(teacher_logits / teacher_temp, dim=-1).view(images, patches, -1)
    ours = ibot_patch_loss(student[masks], teacher[masks], mask_weights(masks), images)
    expected = reference_ibot(student, teacher, masks, student_temp=0.1)
    assert_close_at_scale(ours, torch.tensor(expected, dtype=torch.float32), TOL)


def test_ibot_center_probabilities_are_the_centred_sharpened_softmax():
    center = IBOTCenter(16)
    center.center.copy_(head_logits(1, 16, seed=14))
    logits = head_logits(10, 16, seed=15).to(torch.bfloat16)
    shifted = (logits.double() - center.center.double()) / 0.04
    expected = torch.stack([torch.exp(row - row.max()) / torch.exp(row - row.max()).sum()
                            for row in shifted])
    assert_close_at_scale(center.probabilities(logits, 0.04),
                          expected.float(), TOL)


def test_ibot_center_moves_to_the_mean_of_all_masked_tokens_of_the_step():
    """Ranks with 3 and 9 masked tokens: the batch center is the mean of all 12 tokens, not
    dinov2's mean of the two ranks' means."""
    center = IBOTCenter(8)
    old = head_logits(1, 8, seed=16)
    center.center.copy_(old)
    rank_tokens = [head_logits(3, 8, seed=17), head_logits(9, 8, seed=18) + 0.5]
    every_token = torch.cat(rank_tokens)
    center.update(every_token.sum(dim=0), torch.tensor(12.0))
    expected = 0.9 * old + 0.1 * every_token.mean(dim=0, keepdim=True)
    assert_close_at_scale(center.center, expected, TOL)
    dinov2 = 0.9 * old + 0.1 * sum(t.mean(dim=0, keepdim=True) for t in rank_tokens) / 2
    assert (center.center - dinov2).abs().max() > 1e-3


def test_ibot_center_keeps_its_value_when_the_step_is_skipped_or_has_no_tokens():
    center = IBOTCenter(8)
    old = head_logits(1, 8, seed=19)
    center.center.copy_(old)
    tokens = head_logits(4, 8, seed=20)
    center.update(tokens.sum(dim=0), 4, applied=torch.tensor(False))
    assert torch.equal(center.center, old)
    center.update(torch.zeros(8), 0)
    assert torch.equal(center.center, old)
    center.update(tokens.sum(dim=0), 4, applied=torch.tensor(True))
    assert_close_at_scale(center.center, 0.9 * old + 0.1 * tokens.mean(dim=0, keepdim=True),
                          TOL)
    restored = IBOTCenter(8)
    restored.load_state_dict(center.state_dict())
    assert torch.equal(restored.center, center.center)


def test_patch_masks_pick_the_masked_tokens_in_mask_order():
    """The host-side index selects exactly tokens[masks], in that order, with the weights
    of mask_weights: what the loss pairs with the teacher's tokens."""
    g = torch.Generator().manual_seed(3)
    masks = torch.rand(5, 9, generator=g) < 0.4
    masks[2] = False  # an image without masks
    tokens = torch.randn(5, 9, 4, generator=g)
    picked = PatchMasks.from_host(masks, "cpu")
    assert torch.equal(picked.select(tokens), tokens[masks])
    assert torch.equal(picked.weights, mask_weights(masks)) and picked.n_images == 5
