"""dino_dist's step against a step written the way the DINO reference code writes it.

The reference-style step follows facebookresearch/dino `main_dino.py` (train_one_epoch):
fp16 autocast with a GradScaler, attention as an explicit softmax(q k^T) v, the reference
DINOLoss (center all-reduced and updated inside the loss every step), per-parameter clipping
in a Python loop, the EMA as a Python loop over parameters, and `loss.item()` every step.
It uses the same ViT weights, head, crops and batch as dino_dist's step, which is built by
`build_training` exactly as `dino-train` builds it. The two alternate in rounds after a
warm-up; one JSON object is printed.

    python benchmarks/reference_step.py --config configs/vit_small_16.yaml [--compile] [overrides]
"""
from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dino_dist.bench.images import ensure_bench_images  # noqa: E402
from dino_dist.bench.step_bench import StepRunner, alternate, synthetic_crops  # noqa: E402
from dino_dist.bench.timing import timed  # noqa: E402
from dino_dist.training.build import build_student_teacher, build_training  # noqa: E402
from dino_dist.config import load_config  # noqa: E402
from dino_dist.distributed.env import init_distributed  # noqa: E402
from dino_dist.models import param_groups_for_weight_decay  # noqa: E402
from dino_dist.models.vit import Attention  # noqa: E402


def manual_attention(self: Attention, x: torch.Tensor, crop_starts: None = None) -> torch.Tensor:
    """The reference ViT's attention: explicit scores, softmax, weighted sum (one crop
    resolution per call, as the reference runs: `crop_starts` is never set here)."""
    batch, tokens, dim = x.shape
    qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1)) * (dim // self.num_heads) ** -0.5
    attn = attn.softmax(dim=-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(batch, tokens, dim))


class ReferenceDINOLoss(nn.Module):
    """The reference DINOLoss: pair loop, then the center updated from this batch at once."""

    def __init__(self, out_dim: int, n_crops: int, teacher_temp: float, student_temp: float = 0.1,
                 center_momentum: float = 0.9):
        super().__init__()
        self.n_crops, self.teacher_temp = n_crops, teacher_temp
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output, teacher_output):
        student_out = (student_output / self.student_temp).chunk(self.n_crops)
        teacher_out = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        self.update_center(teacher_output)
        return total_loss / n_loss_terms

    @torch.no_grad()
    def update_center(self, teacher_output):
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(batch_center)
        batch_center = batch_center / (len(teacher_output) * max(1, _world()))
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def clip_gradients(model: nn.Module, clip: float) -> None:
    for p in model.parameters():
        if p.grad is not None:
            param_norm = p.grad.data.norm(2)
            clip_coef = clip / (param_norm + 1e-6)
            if clip_coef < 1:
                p.grad.data.mul_(clip_coef)


class ReferenceStep:
    def __init__(self, cfg, crops: list[torch.Tensor], device: torch.device):
        student, teacher = build_student_teacher(cfg)
        for model in (student, teacher):
            for module in model.modules():
                if isinstance(module, Attention):
                    module.forward = types.MethodType(manual_attention, module)
        self.student, self.teacher = student.to(device), teacher.to(device)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        n_crops = len(crops)
        self.loss = ReferenceDINOLoss(cfg.model.out_dim, n_crops, cfg.loss.teacher_temp).to(device)
        self.optimizer = torch.optim.AdamW(param_groups_for_weight_decay(self.student))
        self.scaler = torch.amp.GradScaler(device.type)
        self.crops, self.device, self.clip = crops, device, cfg.optim.clip_grad
        self.momentum = cfg.optim.teacher_momentum
        self.losses: list[float] = []

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.float16):
            teacher_output = self.teacher(self.crops[:2])
            student_output = self.student(self.crops)
            loss = self.loss(student_output, teacher_output)
        self.optimizer.zero_grad()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        clip_gradients(self.student, self.clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            m = self.momentum
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.losses.append(loss.item())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/vit_small_16.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile dino_dist's student and teacher")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    cfg.data.path, cfg.data.num_workers = str(ensure_bench_images(count=max(64, cfg.optim.batch_size_per_gpu))), 0
    env = init_distributed(cfg.train.device)
    training = build_training(cfg, env)
    if args.compile:  # as dino-bench --compile
        training.student.compile()
        training.teacher.compile()
    crops = synthetic_crops(cfg, env.device)
    ours = StepRunner(training.engine, iter(lambda: (crops, 0, None), None), cfg.optim.accum_steps,
                      epoch=cfg.optim.freeze_last_layer)
    reference = ReferenceStep(cfg, crops, env.device)
    timed(ours, args.warmup, env.device)
    timed(reference, args.warmup, env.device)
    per_round = max(1, args.steps // args.rounds)
    per_round_seconds = alternate({"dino_dist": ours, "reference": reference}, args.rounds, per_round, env.device)
    seconds = {name: sum(spent) for name, spent in per_round_seconds.items()}
    images = cfg.optim.batch_size_per_gpu * cfg.optim.accum_steps * per_round * args.rounds
    rates = {name: images / spent for name, spent in seconds.items()}
    print(json.dumps({
        "mode": "reference_step", "config": args.config, "precision": cfg.train.precision,
        "reference_precision": "fp16", "compile": args.compile,
        "device": torch.cuda.get_device_name() if env.device.type == "cuda" else "cpu",
        "batch_size": cfg.optim.batch_size_per_gpu, "timed_steps_each": per_round * args.rounds,
        "dino_dist_images_per_s": round(rates["dino_dist"], 2),
        "reference_images_per_s": round(rates["reference"], 2),
        "speedup_vs_reference": round(rates["dino_dist"] / rates["reference"], 3),
        "reference_loss_finite": all(map(lambda v: v == v and abs(v) != float("inf"), reference.losses)),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
