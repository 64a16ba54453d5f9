"""Ordinary training steps never make the host wait for the device.

A real 2-rank training run (torchrun, gloo) with every call that forces a device-to-host
synchronisation counted while an ordinary step runs (its micro-batches and its finish):
`Tensor.item`, `.tolist`, `.cpu`, `.numpy`, `bool(t)`, `float(t)`, `int(t)`, `t.__index__`.
The previous step's figures, copied to pinned host memory behind an event, are read on
ordinary steps by design (dino_dist.training.readback): those reads are counted apart.
Logging and saving steps read their figures on purpose; the same counters must see those
reads, which shows the instrumentation works.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, free_port, subprocess_env, tiny_overrides

COUNT_SYNCS = r"""
import json, os, sys
import torch
from dino_dist.training.engine import DinoEngine

counts = {"ordinary": 0, "read": 0}
syncs = {"ordinary": [], "read": []}
phase = [None]

def counted(name):
    original = getattr(torch.Tensor, name)
    def call(self, *args, **kwargs):
        if phase[0] is not None:
            syncs[phase[0]].append(name)
        return original(self, *args, **kwargs)
    setattr(torch.Tensor, name, call)

for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
    counted(name)

def during(kind, method):
    def run(self, *args, **kwargs):
        phase[0] = kind
        try:
            return method(self, *args, **kwargs)
        finally:
            phase[0] = None
    return run

micro_step, finish_step = DinoEngine.micro_step, DinoEngine.finish_step

def micro(self, *args, **kwargs):
    # An ordinary step's micro-batches get no statistics to fill.
    kind = "ordinary" if kwargs.get("stats") is None else "read"
    return during(kind, micro_step)(self, *args, **kwargs)

def finish(self, *args, **kwargs):
    kind = "read" if kwargs.get("read_now", True) else "ordinary"
    counts[kind] += 1
    return during(kind, finish_step)(self, *args, **kwargs)

DinoEngine.micro_step, DinoEngine.finish_step = micro, finish

# The one read an ordinary step does by design: the previous step's figures, from pinned host
# memory, after waiting on an event recorded a step ago (on a GPU, long since passed).
from dino_dist.training.readback import HostReadback
take = HostReadback.take
def late_take(self):
    outer, phase[0] = phase[0], None
    try:
        figures = take(self)
    finally:
        phase[0] = outer
    if figures is not None and outer == "ordinary":
        counts["late_reads"] = counts.get("late_reads", 0) + 1
    return figures
HostReadback.take = late_take
from dino_dist.cli.train import main
code = main(sys.argv[1:])
if os.environ.get("RANK") == "0":
    print("SYNCS " + json.dumps({"steps": counts, "syncs": syncs}))
sys.exit(code)
"""


def run_counted(tmp_path, image_folder, **overrides) -> dict:
    script = tmp_path / "count_syncs.py"
    script.write_text(COUNT_SYNCS)
    values = {"log.every_steps": 4, "train.epochs": 2, "optim.batch_size_per_gpu": 4,
              "checkpoint.every_steps": 0, **overrides}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script),
           *tiny_overrides(image_folder, tmp_path / "run", **values)]
    result = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(l for l in result.stdout.splitlines() if l.startswith("SYNCS "))
    return json.loads(line[len("SYNCS "):])


DINOV2 = {"loss.centering": "sinkhorn_knopp", "loss.koleo_weight": 0.1, "ibot.weight": 1.0,
          "model.num_registers": 2, "optim.accum_steps": 2, "optim.batch_size_per_gpu": 2}


@pytest.mark.parametrize("paths", [{}, {"data.augment_on": "gpu", "model.packed_crops": True},
                                   DINOV2],
                         ids=["default", "augment_on_device_packed", "dinov2_accumulating"])
def test_ordinary_steps_make_no_host_synchronisation(tmp_path, image_folder, paths):
    # 32 images, 2 ranks x 4: 4 steps an epoch, 8 in all; steps 4 and 8 log and save.
    found = run_counted(tmp_path, image_folder, **paths)
    assert (found["steps"]["ordinary"], found["steps"]["read"]) == (6, 2), found["steps"]
    assert found["syncs"]["ordinary"] == [], found["syncs"]["ordinary"]
    assert found["syncs"]["read"], "the counters saw nothing: the instrumentation is broken"
    # Steps 2, 3, 6 and 7 read the step before them (1 and 5 follow a step read at once).
    assert found["steps"]["late_reads"] == 4
