"""ResNet-50 trunk for DINO, as the official code uses it."""
import torch.nn as nn
from torchvision.models.resnet import Bottleneck, ResNet

from dino_dist.distributed.units import ParallelUnits

RESNET50_EMBED_DIM = 2048
RESNET50_LAYERS = [3, 4, 6, 3]  # bottleneck blocks per stage, as torchvision's resnet50


class ResNetBackbone(ResNet):
    """torchvision's ResNet (same modules, names and init) returning pooled features."""

    def __init__(self, layers: list[int], embed_dim: int):
        super().__init__(Bottleneck, layers)
        # The ImageNet classifier is replaced: DINO puts its own head on top.
        self.fc = nn.Identity()
        self.embed_dim = embed_dim

    def parallel_units(self) -> ParallelUnits:
        """Each of the four stages alone; the stem stays with the root."""
        stages = [self.layer1, self.layer2, self.layer3, self.layer4]
        return ParallelUnits(shard=stages, compile=stages, checkpoint=stages)


def resnet50_backbone() -> nn.Module:
    """Randomly initialised ResNet-50 returning pooled 2048-d features."""
    return ResNetBackbone(RESNET50_LAYERS, RESNET50_EMBED_DIM)
