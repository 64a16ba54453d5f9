"""dino_dist: DINO self-supervised training on one GPU, a torchrun node or a SLURM cluster."""

__version__ = "0.1.0"
