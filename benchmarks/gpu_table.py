"""The GPU benchmark's parts (one JSON file each, from benchmarks/gpu.sh) as one markdown table.

    python benchmarks/gpu_table.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path) -> dict | None:
    lines = [line for line in path.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def _step_row(name: str, r: dict) -> list[str]:
    where = r["data"] if r["data"] == "synthetic" else f"JPEG folder, augment on {r['augment_on']}, {r['num_workers']} workers"
    how = ", ".join(filter(None, ["packed" if r.get("packed_crops") else "",
                                  "compiled" if r.get("compile") else "",
                                  "per-block compile" if r.get("train_compile") else ""])) or "eager"
    mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
    memory = f"{r['peak_device_memory_mb'] / 1024:.1f} GiB" if r.get("peak_device_memory_mb") else "-"
    return [name, r["arch"], str(r["batch_size_per_rank"]), where, how,
            f"{r['images_per_s']:.0f}", mfu, memory, _launches(r)]


def _launches(r: dict) -> str:
    """Kernels per step and the GPU-busy share where profiled, else the aten ops per step;
    the device augmentation's ops and time per micro-batch."""
    profile = r.get("profile") or {}
    if "kernels_per_step" in profile:
        step = f"{profile['kernels_per_step']:.0f} kernels, GPU busy {100 * profile['device_busy_share']:.0f} %"
    elif r.get("aten_ops_per_step") is not None:
        step = f"{r['aten_ops_per_step']} aten ops"
    else:
        step = "-"
    augment = r.get("augment_on_device")
    if not augment:
        return step
    return f"{step}; augment {augment['aten_ops_per_call']} ops, {augment['ms_per_micro_batch']:.2f} ms"


def profiles(out_dir: Path) -> str:
    """The top kernels (on a CPU: aten ops) of each profiled part, ms per step."""
    lines = []
    for path in sorted(out_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
        report = _load(path)
        profile = (report or {}).get("profile")
        if not profile:
            continue
        top = profile.get("top_kernels_ms_per_step") or profile.get("top_cpu_ops_ms_per_step", {})
        lines.append(f"{path.stem}: " + "; ".join(f"{name} {ms:.2f} ms" for name, ms in top.items()))
    return "\n".join(lines)


def _other_row(name: str, r: dict) -> list[str]:
    if r["mode"] == "reference_step":
        figure = (f"ours {r['dino_dist_images_per_s']:.0f} vs reference "
                  f"{r['reference_images_per_s']:.0f} img/s: {r['speedup_vs_reference']:.2f}x")
        return [name, "", str(r["batch_size"]), "synthetic", "compiled" if r["compile"] else "eager",
                figure, "", "", ""]
    if r["mode"] == "data_only":
        figure = f"{r['project_images_per_s_per_worker']:.0f} img/s per loader process"
        return [name, "", "", f"augment on {r['augment_on']}", "", figure, "", "", ""]
    if r["mode"] == "max_batch":
        tried = "; ".join(f"{t['batch']}: {t['images_per_s']:.0f} img/s" if t["fits"]
                          else f"{t['batch']}: out of memory" for t in r["tried"])
        return [name, r["arch"], str(r["largest_batch"]), "synthetic", "eager", tried, "", "", ""]
    return [name, "", "", "", "", json.dumps(r)[:80], "", "", ""]


def table(out_dir: Path) -> str:
    head = ["part", "model", "batch", "data", "how", "images/s", "MFU", "peak memory",
            "launches per step"]
    rows = []
    for path in sorted(out_dir.glob("*.json"), key=lambda p: p.stat().st_mtime):
        report = _load(path)
        if report is None:
            rows.append([path.stem, "", "", "", "", "no result (see stderr.log)", "", "", ""])
            continue
        make = _step_row if report.get("mode") == "step" else _other_row
        rows.append(make(path.stem, report))
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/out")
    print(table(out))
    print(profiles(out))
