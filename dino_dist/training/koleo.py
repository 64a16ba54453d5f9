"""The KoLeo regulariser of dinov2 (Sablayrolles et al. 2018, "Spreading vectors for
similarity search"): -mean log distance of each feature to its nearest neighbour.

Two scopes:
- `koleo_loss`: dinov2's KoLeoLoss on one set of rows (`koleo scope per_rank`): each rank's
  rows only see each other, so the value depends on the world size and the accumulation.
- `KoLeoNeighbours`: the loss over the whole optimizer step's batch (all ranks, all
  micro-batches), computed piecewise: the neighbours are found once per step on the detached,
  all-gathered features, and each micro-batch backpropagates only through its own rows.

The distance is that of torch's PairwiseDistance(p=2, eps=1e-8) as dinov2 uses it:
||a - b + eps||_2 (the eps is added to the difference, so the distance is not symmetric).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PAIRWISE_EPS = 1e-8  # nn.PairwiseDistance's eps in dinov2's KoLeoLoss
NEIGHBOUR_CHUNK_ROWS = 4096  # bounds the similarity block to 4096 x N floats


def _unit(features: torch.Tensor, eps: float) -> torch.Tensor:
    # float32 even under autocast or for bf16 input (dinov2 keeps the input dtype).
    return F.normalize(features.float(), p=2, dim=-1, eps=eps)


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.pairwise_distance(a, b, p=2.0, eps=PAIRWISE_EPS)


@torch.no_grad()
def nearest_neighbours(unit: torch.Tensor) -> torch.Tensor:
    """Index of each row's nearest other row by largest dot product: LongTensor [n].

    dinov2's rule: the diagonal is set to -1 (not -inf) before the argmax; the similarity
    matrix is built in row blocks so a large step's batch never needs all of N x N at once.
    """
    n = unit.shape[0]
    found = []
    for start in range(0, n, NEIGHBOUR_CHUNK_ROWS):
        block = unit[start:start + NEIGHBOUR_CHUNK_ROWS] @ unit.t()
        rows = torch.arange(block.shape[0], device=unit.device)
        block[rows, rows + start] = -1.0
        found.append(block.argmax(dim=1))
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long, device=unit.device)


def koleo_loss(features: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """dinov2's KoLeoLoss on `features` [n, D]: a float32 scalar.

    The gradient reaches each row both as a row and as someone's neighbour, as in dinov2.
    """
    unit = _unit(features, eps)
    neighbour = nearest_neighbours(unit.detach())
    return -torch.log(_distance(unit, unit[neighbour]) + eps).mean()


class KoLeoNeighbours:
    """The step's nearest-neighbour graph, for the KoLeo loss over the whole step's batch.

    L = -(1/N) sum_i log(d(x_i, x_I(i)) + eps) over all N rows of the step (all ranks, all
    micro-batches), x the normalised features, I(i) the nearest other row. Build it once per
    step (and per global crop index: dinov2 never pairs two crops of one image) from
    `all_features` [N, D]: the detached features of every row, all-gathered in a fixed global
    order; they must be bit-for-bit the values the micro-batches later pass as `live`.

    Scaling contract: `surrogate` summed over every micro-batch of every rank gives the value
    L, and its gradients summed (not averaged) give exactly dL/dx. The engine divides each
    micro-batch's loss by k (micro-batches) and DDP averages gradients over W ranks, so the
    engine must add `k * W * surrogate(...)` (times the KoLeo weight) to a micro-batch's loss.
    The logged value, averaged the same way (1/k, then the mean over ranks), is then L too.
    """

    def __init__(self, all_features: torch.Tensor, eps: float = 1e-8):
        self.eps = eps
        self.unit = _unit(all_features.detach(), eps)
        self.neighbour = nearest_neighbours(self.unit)
        # -log(d + eps) of every row with its neighbour, from the detached values.
        self.row_terms = -torch.log(_distance(self.unit, self.unit[self.neighbour]) + eps)

    @property
    def n_rows(self) -> int:
        return self.unit.shape[0]

    def loss(self) -> torch.Tensor:
        """L over the whole step, detached (what the surrogates sum to)."""
        return self.row_terms.mean()

    def surrogate(self, live: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """This micro-batch's share of L, with the gradient of L w.r.t. its rows.

        `live` [n, D] are the features, with their graph, of the distinct global rows `rows`
        [n] (indices into `all_features`; no row in two micro-batches of a step). The value
        is -(1/N) sum_{i in rows} log(d + eps) from the detached values; the gradient is
        that of L with every other row held fixed: through x_i as a row (a) and through
        x_i as the neighbour of whichever rows chose it (b), the rows of other micro-batches
        and ranks included.
        """
        rows = rows.to(self.neighbour.device)
        unit_live = _unit(live, self.eps)
        as_row = _distance(unit_live, self.unit[self.neighbour[rows]])  # (a)
        position = torch.full((self.n_rows,), -1, dtype=torch.long, device=rows.device)
        position[rows] = torch.arange(rows.shape[0], device=rows.device)
        # (b) over all N rows, masked rather than selected: selecting the choosers would
        # make the host wait for their count.
        chosen_position = position[self.neighbour]
        chosen = unit_live[chosen_position.clamp(min=0)]
        as_neighbour = _distance(self.unit, chosen)  # d's argument order kept
        neighbour_terms = torch.where(chosen_position >= 0,
                                      torch.log(as_neighbour + self.eps), 0.0)
        differentiable = -(torch.log(as_row + self.eps).sum()
                           + neighbour_terms.sum()) / self.n_rows
        share = self.row_terms[rows].sum() / self.n_rows
        return share + (differentiable - differentiable.detach())
