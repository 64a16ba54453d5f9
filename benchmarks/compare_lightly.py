"""dino_dist's step against a plain DINO loop written with lightly, in one process.

Run with a Python that has lightly installed (it is not a dependency of this project):

    python3 -m venv --system-site-packages /tmp/lightly-venv
    /tmp/lightly-venv/bin/pip install lightly
    /tmp/lightly-venv/bin/python benchmarks/compare_lightly.py [--config configs/bench_cpu.yaml]

The lightly loop follows lightly's DINO example: `DINOProjectionHead`, `DINOLoss`,
`update_momentum` on backbone and head, one forward per view, `cancel_last_layer_gradients`,
then the optimizer (AdamW with torch's defaults, weight decay as the config). Both sides use the
same ViT backbone class (dino_dist's), the same crops (random tensors in memory), batch, output
dimension, precision and threads. The two alternate in rounds after a warm-up; one JSON object
is printed with both images/s and their ratio.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_dist.bench.images import ensure_bench_images  # noqa: E402
from dino_dist.bench.step_bench import StepRunner, alternate, synthetic_crops  # noqa: E402
from dino_dist.bench.timing import timed  # noqa: E402
from dino_dist.config import load_config  # noqa: E402
from dino_dist.distributed.env import init_distributed  # noqa: E402
from dino_dist.models import build_backbone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class LightlyDINO(nn.Module):
    """The model of lightly's DINO example: backbone + DINOProjectionHead, and a momentum copy."""

    def __init__(self, cfg):
        from lightly.models.modules import DINOProjectionHead
        from lightly.models.utils import deactivate_requires_grad

        super().__init__()
        m = cfg.model
        backbone = build_backbone(m.arch, m.patch_size, m.drop_path_rate, m.img_size)
        self.student_backbone = backbone
        head = lambda: DINOProjectionHead(backbone.embed_dim, m.head_hidden_dim,  # noqa: E731
                                          m.head_bottleneck_dim, m.out_dim,
                                          freeze_last_layer=cfg.optim.freeze_last_layer)
        self.student_head, self.teacher_head = head(), head()
        # Not deepcopy: weight-normalised layers refuse it.
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        self.teacher_backbone = build_backbone(m.arch, m.patch_size, 0.0, m.img_size)
        self.teacher_backbone.load_state_dict(backbone.state_dict())
        deactivate_requires_grad(self.teacher_backbone)
        deactivate_requires_grad(self.teacher_head)

    def forward(self, x):
        return self.student_head(self.student_backbone(x))

    def forward_teacher(self, x):
        return self.teacher_head(self.teacher_backbone(x))


class LightlyLoop:
    """One iteration of lightly's DINO training loop per call."""

    def __init__(self, cfg, crops: list[torch.Tensor]):
        from lightly.loss import DINOLoss

        self.model = LightlyDINO(cfg)
        self.criterion = DINOLoss(output_dim=cfg.model.out_dim, warmup_teacher_temp_epochs=0)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4,
                                           weight_decay=cfg.optim.weight_decay)
        self.crops, self.n_global = crops, cfg.data.global_crops_number
        self.epoch = cfg.optim.freeze_last_layer  # past the frozen epochs, as on our side
        self.momentum = cfg.optim.teacher_momentum

    def __call__(self) -> None:
        from lightly.models.utils import update_momentum

        model = self.model
        update_momentum(model.student_backbone, model.teacher_backbone, m=self.momentum)
        update_momentum(model.student_head, model.teacher_head, m=self.momentum)
        teacher_out = [model.forward_teacher(view) for view in self.crops[: self.n_global]]
        student_out = [model.forward(view) for view in self.crops]
        loss = self.criterion(teacher_out, student_out, epoch=self.epoch)
        loss.backward()
        model.student_head.cancel_last_layer_gradients(current_epoch=self.epoch)
        self.optimizer.step()
        self.optimizer.zero_grad()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "bench_cpu.yaml"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    import lightly
    from dino_dist.training.build import build_training

    cfg = load_config(args.config, args.overrides)
    if cfg.train.precision != "fp32":
        raise SystemExit("compare_lightly.py compares fp32 loops: set train.precision=fp32")
    cfg.data.path, cfg.data.num_workers = str(ensure_bench_images(count=64)), 0
    env = init_distributed(cfg.train.device)
    training = build_training(cfg, env)
    crops = synthetic_crops(cfg, env.device)
    ours = StepRunner(training.engine, iter(lambda: (crops, 0, None), None), cfg.optim.accum_steps,
                      epoch=cfg.optim.freeze_last_layer)
    theirs = LightlyLoop(cfg, crops)
    timed(ours, args.warmup, env.device)
    timed(theirs, args.warmup, env.device)
    per_round = max(1, args.steps // args.rounds)
    per_round_seconds = alternate({"dino_dist": ours, "lightly": theirs}, args.rounds, per_round, env.device)
    seconds = {name: sum(spent) for name, spent in per_round_seconds.items()}
    images = cfg.optim.batch_size_per_gpu * per_round * args.rounds
    rates = {name: images / spent for name, spent in seconds.items()}
    print(json.dumps({
        "mode": "compare_lightly", "config": args.config, "lightly_version": lightly.__version__,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "timed_steps_each": per_round * args.rounds, "rounds": args.rounds,
        "dino_dist_images_per_s": round(rates["dino_dist"], 2),
        "lightly_images_per_s": round(rates["lightly"], 2),
        "speedup_vs_lightly": round(rates["dino_dist"] / rates["lightly"], 3),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
