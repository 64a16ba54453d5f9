"""ResNet-50 trunk for DINO, as the official code uses it."""
import torch.nn as nn
from torchvision.models import resnet50

RESNET50_EMBED_DIM = 2048


def resnet50_backbone() -> nn.Module:
    """Randomly initialised torchvision ResNet-50 returning pooled 2048-d features."""
    model = resnet50(weights=None)
    # The ImageNet classifier is replaced: DINO puts its own head on top.
    model.fc = nn.Identity()
    model.embed_dim = RESNET50_EMBED_DIM
    return model
