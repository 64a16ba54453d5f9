"""The real training step, timed: images/s, phase shares, memory, and efficiency vs the floor.

The run is built by `build_training`, exactly as `dino-train` builds it, and stepped through
`DinoEngine.micro_step`/`finish_step`. Step and model floor alternate in rounds after a
warm-up, so compile time and first-step allocations are left out, and a machine that is busy
with something else slows both alike: the efficiency ratio is measured within one run.
"""
from __future__ import annotations

import copy
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from dino_dist.bench.floor import ModelFloor
from dino_dist.bench.augment_bench import augment_figures
from dino_dist.bench.flops import count_flops, device_peak_flops, mfu
from dino_dist.bench.op_count import count_ops
from dino_dist.bench.phases import PhaseClock
from dino_dist.bench.step_profile import profile_steps
from dino_dist.bench.timing import timed
from dino_dist.config import Config
from dino_dist.data import sample_seed, split_batch
from dino_dist.data.batch import collate_masks
from dino_dist.distributed.env import DistEnv
from dino_dist.observe.memory import host_peak_rss_mb, peak_memory_mb


@dataclass
class BenchSettings:
    steps: int = 20  # timed optimizer steps (and as many floor iterations)
    warmup: int = 3  # untimed steps first: compilation, allocator, first-call costs
    rounds: int = 4  # step and floor alternate this many times
    phase_steps: int = 5  # steps of the separate, synchronised per-phase pass
    synthetic: bool = True  # in-memory crops (compute only) or the configured image folder
    compile: bool = False  # torch.compile student and teacher
    profile_steps: int = 0  # steps of a torch.profiler pass (bench.step_profile); 0 = none


def synthetic_crops(cfg: Config, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """One batch of random crops per crop position, already on the device."""
    d, batch = cfg.data, cfg.optim.batch_size_per_gpu
    generator = torch.Generator(device="cpu").manual_seed(seed)
    sizes = [d.global_crop_size] * d.global_crops_number + [d.local_crop_size] * d.local_crops_number
    return [torch.randn(batch, 3, size, size, generator=generator).to(device) for size in sizes]


def synthetic_masks(cfg: Config, device: torch.device) -> torch.Tensor | None:
    """The iBOT masks of one batch (samples 0..B-1 of epoch 0), as the loader draws them."""
    from dino_dist.training.build import build_masking
    masking = build_masking(cfg)
    if masking is None:
        return None
    samples = [(None, 0, 0, masking(sample_seed(cfg.train.seed, 0, index, "masks")))
               for index in range(cfg.optim.batch_size_per_gpu)]
    return collate_masks(samples)[0]  # on the host, as the loader gives them


def folder_batches(loader, sampler) -> Iterator[tuple[list[torch.Tensor], int, torch.Tensor | None]]:
    """The real loader, epoch after epoch: (crops, skipped images, masks)."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        for batch in loader:
            crops, _labels, skipped, masks = split_batch(batch)
            yield crops, skipped, masks
        epoch += 1


class StepRunner:
    """One optimizer step of the engine per call: accum_steps micro-batches, then finish."""

    def __init__(self, engine, batches: Iterator[tuple[list[torch.Tensor], int]],
                 accum_steps: int, epoch: int):
        self.engine, self.batches = engine, batches
        self.accum_steps, self.epoch = accum_steps, epoch
        self.step = 0

    def __call__(self) -> None:
        engine = self.engine
        schedule_step = min(self.step, engine.schedules.total_steps - 1)
        for micro in range(self.accum_steps):
            crops, skipped, masks = next(self.batches)
            engine.clock.mark("data")
            engine.micro_step(crops, schedule_step, 1.0 / self.accum_steps,
                              sync_grads=micro == self.accum_steps - 1, skipped_images=skipped,
                              masks=masks)
        # As the training loop's ordinary steps: the step's figures are read a step later.
        engine.finish_step(schedule_step, self.epoch, read_now=False)
        self.step += 1


def alternate(runs: dict[str, Callable[[], None]], rounds: int, per_round: int,
              device: torch.device) -> dict[str, list[float]]:
    """Seconds per round of each run; the runs take turns, so load from elsewhere hits all alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run_once in runs.items():
            seconds[name].append(timed(run_once, per_round, device))
    return seconds


def _bench_config(cfg: Config, bench_images: str | None) -> Config:
    """Synthetic mode still builds the real loader (unused) over a small benchmark folder."""
    cfg = copy.deepcopy(cfg)
    if bench_images is not None:
        cfg.data.path, cfg.data.num_workers = bench_images, 0
    return cfg


def run_step_benchmark(cfg: Config, env: DistEnv, settings: BenchSettings,
                       bench_images: str | None = None) -> dict:
    from dino_dist.training.build import build_training  # heavy imports after argument checks

    cfg = _bench_config(cfg, bench_images if settings.synthetic else None)
    clock = PhaseClock(env.device)  # idle until the phase pass starts it
    training = build_training(cfg, env, clock=clock)
    engine, device = training.engine, env.device
    floor_crops = synthetic_crops(cfg, device)
    floor = ModelFloor(training.student, training.teacher, cfg.data.global_crops_number,
                       engine.autocast_dtype, device)
    flops_per_floor = count_flops(floor, floor_crops)  # before compiling: eager ops are counted
    if settings.compile:
        training.student.compile()
        training.teacher.compile()
    if settings.synthetic:
        floor_masks = synthetic_masks(cfg, device)
        batches = iter(lambda: (floor_crops, 0, floor_masks), None)
    else:
        batches = folder_batches(training.loader, training.sampler)
    # Past the frozen-last-layer epochs, so the optimizer updates every parameter.
    runner = StepRunner(engine, batches, cfg.optim.accum_steps, epoch=cfg.optim.freeze_last_layer)
    accum = cfg.optim.accum_steps
    run_floor = lambda: [floor(floor_crops) for _ in range(accum)]  # noqa: E731

    timed(runner, settings.warmup, device)
    timed(run_floor, settings.warmup, device)
    per_round = max(1, settings.steps // settings.rounds)
    seconds = alternate({"step": runner, "floor": run_floor}, settings.rounds, per_round, device)
    step_seconds, floor_seconds = sum(seconds["step"]), sum(seconds["floor"])
    # floor time / step time per round: robust to a burst of load from elsewhere
    round_ratios = [floor / step for step, floor in zip(seconds["step"], seconds["floor"])]
    shares = _phase_shares(clock, runner, settings.phase_steps)
    # Counted after the timing: the counter slows what it watches. A compiled step's ops run
    # inside its kernels, so they are not counted there.
    step_ops = None if settings.compile else count_ops(runner)
    profiled = profile_steps(runner, settings.profile_steps, device) if settings.profile_steps else None

    steps = per_round * settings.rounds
    images_per_step = cfg.optim.batch_size_per_gpu * accum  # per rank
    images_per_s = images_per_step * steps / step_seconds
    floor_images_per_s = images_per_step * steps / floor_seconds
    seconds_per_step = step_seconds / steps
    flops_per_step = flops_per_floor * accum
    return {
        "images_per_s": round(images_per_s * env.world_size, 2),
        "images_per_s_per_rank": round(images_per_s, 2),
        "seconds_per_step": round(seconds_per_step, 5),
        "floor_images_per_s": round(floor_images_per_s, 2),
        "efficiency": round(images_per_s / floor_images_per_s, 4),
        "efficiency_median_round": round(statistics.median(round_ratios), 4),
        "phase_share": shares,
        "peak_host_rss_mb": round(host_peak_rss_mb(), 1),
        "peak_device_memory_mb": round(peak_memory_mb(device), 1) if device.type == "cuda" else None,
        "model_gflop_per_step": round(flops_per_step / 1e9, 3),
        "mfu": _rounded(mfu(flops_per_step, seconds_per_step, device_peak_flops(device, cfg.train.precision))),
        "floor_mfu": _rounded(mfu(flops_per_step, floor_seconds / steps,
                                  device_peak_flops(device, cfg.train.precision))),
        "aten_ops_per_step": None if step_ops is None else step_ops.total,
        "top_step_ops": None if step_ops is None else step_ops.top(10),
        "augment_on_device": augment_figures(cfg.data, cfg.optim.batch_size_per_gpu, device),
        "profile": profiled,
        "timed_steps": steps,
        "warmup_steps": settings.warmup,
        "rounds": settings.rounds,
    }


def _phase_shares(clock: PhaseClock, runner: StepRunner, steps: int) -> dict:
    """A separate pass with the engine's clock running: its synchronisation would slow the
    timed steps, so it only runs here."""
    if steps <= 0:
        return {}
    clock.start()
    try:
        for _ in range(steps):
            runner()
    finally:
        clock.stop()
    return clock.shares()


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)
