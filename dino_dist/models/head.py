"""DINO projection head with the official parameter layout."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_dist.distributed.units import ParallelUnits

INIT_STD = 0.02


class WeightNormLinear(nn.Module):
    """Bias-free Linear whose rows are rescaled to length `weight_g`.

    Parameter names and shapes are those `nn.utils.weight_norm(dim=0)` produced,
    which is what the official DINO checkpoints store.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        # Start from nn.Linear's default init: upstream wraps the last layer after
        # its trunc_normal pass has run, so that pass never touches this weight.
        initial = nn.Linear(in_features, out_features, bias=False).weight.detach()
        self.weight_v = nn.Parameter(initial.clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        out_features, in_features = self.weight_v.shape
        return f"in_features={in_features}, out_features={out_features}"


def _build_mlp(in_dim: int, hidden_dim: int, bottleneck_dim: int, nlayers: int, use_bn: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for layer_in, layer_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(layer_in, layer_out))
        if use_bn:
            layers.append(nn.BatchNorm1d(layer_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP -> L2 normalisation -> weight-normalised prototype layer."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ):
        super().__init__()
        self.mlp = _build_mlp(in_dim, hidden_dim, bottleneck_dim, max(nlayers, 1), use_bn)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # A frozen unit norm keeps every prototype on the sphere, which the
        # DINO paper found stabilises training.
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def parallel_units(self) -> ParallelUnits:
        """One shard unit: with many prototypes the head is as large as a ViT-S backbone,
        too much to keep gathered with the root. Three matmuls: nothing to compile or
        recompute."""
        return ParallelUnits(shard=[self])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)
