"""Checkpoints in the format an older dino_dist wrote still resume, and the format stays put.

The checkpoints themselves are too large to ship (27 MB), so tests/fixtures/old_checkpoints/
holds a frozen description of two real ones written by commit 1d4ab3e (see its README.md): a
single-process (DDP-format) file and a 2-rank FSDP folder, both written mid-first-epoch while
`optim.freeze_last_layer` held the head's last layer (so AdamW has no state for it). From that
description each test rebuilds an old-format checkpoint the way the old code wrote it (keys,
shapes, dtypes, containers, manifest / commit marker; tensor values from a seeded generator)
and resumes it with today's `python -m dino_dist.cli.train`. A third test checks that today's own
checkpoints still have exactly the frozen layout, so a format change cannot slip by unnoticed.

Nothing here imports dino_dist: only `tests.conftest` helpers and training subprocesses, and
checkpoints are read and written with plain torch, so the test keeps meaning the same thing
while the package's modules move around.

`python -m tests.test_old_checkpoints DDP_FILE FSDP_FOLDER` rewrites the `structure` and
`values` of the two JSON files from real checkpoints (how they were made).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import tempfile
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import run_train, write_image_folder

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "old_checkpoints"
SPECS = {"ddp": FIXTURES / "ddp_format.json", "fsdp": FIXTURES / "fsdp_format.json"}
MODELS = ("student", "teacher")
BUILT = ("student", "teacher", "optimizer", "scaler", "loss", "rng")  # the rest: `values.plain`
MARKER, EXTRA_STATE = "COMMITTED.json", "state.pt"


def load_spec(name: str) -> dict[str, Any]:
    return json.loads(SPECS[name].read_text())


# --- describing a checkpoint (the frozen `structure`) ----------------------------------------

def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


def tensors(state: dict) -> list[list]:
    """[key, shape, dtype] of every tensor of a state dict, in its order."""
    return [[key, list(value.shape), _dtype(value)] for key, value in state.items()]


def outline(value: Any) -> Any:
    """The shape of a plain-Python value (an RNG state): types and lengths, not contents."""
    if isinstance(value, (list, tuple)):
        if len(value) > 8 and all(type(v) is int for v in value):
            return [type(value).__name__, len(value), "int"]
        return [type(value).__name__, [outline(v) for v in value]]
    return type(value).__name__


def describe_extra(state: dict) -> dict[str, Any]:
    """What a DDP file and an FSDP folder's state.pt have in common."""
    return {
        "top_level": [[key, type(value).__name__] for key, value in state.items()],
        "loss": tensors(state.get("loss", {})),
        "scaler": sorted(state.get("scaler", {})),
        "evaluation": sorted(state.get("evaluation", {})),
        # "cuda" joins the per-rank RNG wherever CUDA exists (old code too): not a format change
        "rng": [{name: outline(v) for name, v in rank.items() if name != "cuda"}
                for rank in state.get("rng", [])],
    }


def describe_optimizer(optimizer: dict) -> dict[str, Any]:
    groups = optimizer["param_groups"]
    return {
        "param_groups": [{"keys": list(group), "params": group["params"]} for group in groups],
        "state": [[index, tensors(entry)] for index, entry in optimizer["state"].items()],
        "params_without_state": [index for group in groups for index in group["params"]
                                 if index not in optimizer["state"]],
    }


def describe_ddp(path: Path) -> dict[str, Any]:
    manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    state = torch.load(path, map_location="cpu", weights_only=True)
    optimizer = state.get("optimizer", {"state": {}, "param_groups": []})
    return {"manifest": list(manifest), **describe_extra(state),
            **{name: tensors(state.get(name, {})) for name in MODELS},
            "optimizer": describe_optimizer(optimizer)}


def dcp_keys(folder: Path) -> dict[str, Any]:
    """DCP's flattened keys: [global shape, dtype] for a tensor, "bytes" for anything else."""
    from torch.distributed.checkpoint import FileSystemReader
    metadata = FileSystemReader(str(folder)).read_metadata().state_dict_metadata
    return {key: [list(m.size), _dtype(m.properties)] if hasattr(m, "size") else "bytes"
            for key, m in metadata.items()}


def describe_fsdp(folder: Path) -> dict[str, Any]:
    marker = json.loads((folder / MARKER).read_text())
    return {"files": sorted(p.name for p in folder.iterdir()), "marker": list(marker),
            "marker_files": list(marker["files"]), "dcp": dcp_keys(folder),
            "state_pt": describe_extra(torch.load(folder / EXTRA_STATE, weights_only=True))}


def _encode(value: Any) -> Any:
    """JSON keeps lists only: tuples (AdamW's betas) are written as {"tuple": [...]}."""
    return {"tuple": list(value)} if isinstance(value, tuple) else value


def _decode(value: Any) -> Any:
    return tuple(value["tuple"]) if isinstance(value, dict) and set(value) == {"tuple"} else value


def _values(state: dict, param_groups: list[dict], with_params: bool) -> dict[str, Any]:
    first_state = next(iter(state.get("optimizer", {}).get("state", {}).values()), None)
    return {
        "plain": {k: v for k, v in state.items() if k not in BUILT},
        "module_versions": {name: {prefix: dict(meta) for prefix, meta in
                                   getattr(state[name], "_metadata", {}).items()}
                            for name in (*MODELS, "loss") if name in state},
        "param_groups": [{k: _encode(v) for k, v in group.items()
                          if with_params or k != "params"} for group in param_groups],
        **({"optimizer_step": first_state["step"].item()} if first_state else {}),
    }


def freeze_ddp(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    manifest = json.loads(path.with_name(path.name + ".manifest.json").read_text())
    values = _values(state, state["optimizer"]["param_groups"], with_params=False)
    return {"structure": describe_ddp(path),
            "values": {"manifest_format_version": manifest["format_version"], **values}}


def freeze_fsdp(folder: Path) -> dict[str, Any]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's "no process group" notices
        dcp_to_torch_save(str(folder), str(Path(tmp) / "whole.pt"))
        weights = torch.load(Path(tmp) / "whole.pt", weights_only=True)
    state = torch.load(folder / EXTRA_STATE, weights_only=True)
    marker = json.loads((folder / MARKER).read_text())
    values = _values({**state, "optimizer": weights["optimizer"]},
                     weights["optimizer"]["param_groups"], with_params=True)
    values.pop("module_versions")  # DCP keeps no module versions; state.pt's loss has them
    values["module_versions"] = {"loss": {p: dict(m) for p, m in state["loss"]._metadata.items()}}
    return {"structure": describe_fsdp(folder),
            "values": {"marker_format_version": marker["format_version"], **values}}


# --- rebuilding an old-format checkpoint from its description --------------------------------

def _tensor(key: str, shape: list[int], dtype: str, gen: torch.Generator,
            step: float = 0.0) -> torch.Tensor:
    """Sensible values of the right kind for a state-dict entry (seeded)."""
    dtype = getattr(torch, dtype)
    leaf = key.rsplit(".", 1)[-1]
    module = key.rsplit(".", 2)[-2] if key.count(".") else ""
    if leaf == "step":  # AdamW's step count
        return torch.full(shape, step, dtype=dtype)
    if leaf == "weight_g" or (leaf == "weight" and module.startswith("norm")):
        return torch.ones(shape, dtype=dtype)  # weight-norm gains, LayerNorm scales
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    if leaf == "exp_avg":
        return (1e-3 * noise).to(dtype)
    if leaf == "exp_avg_sq":
        return (1e-3 * noise).square().to(dtype)  # a second moment is never negative
    if leaf == "center":
        return (1e-2 * noise).to(dtype)
    scale = 0.0 if leaf == "bias" else 0.02
    return (scale * noise).to(dtype)


def _state_dict(entries: list[list], versions: dict[str, dict], gen) -> OrderedDict:
    """An nn.Module.state_dict() lookalike: an OrderedDict with its `_metadata`."""
    state = OrderedDict((key, _tensor(key, shape, dtype, gen)) for key, shape, dtype in entries)
    state._metadata = OrderedDict((prefix, dict(meta)) for prefix, meta in versions.items())
    return state


def _rng(outlines: list[dict], seed: int) -> list[dict]:
    """Valid per-rank RNG states of the recorded layout (rank r: seeded with seed + r)."""
    states = []
    for rank, layout in enumerate(outlines):
        name, keys, *rest = np.random.RandomState(seed + rank).get_state()
        state = {"python": random.Random(seed + rank).getstate(),
                 "torch": torch.Generator().manual_seed(seed + rank).get_state().tolist(),
                 "numpy": (name, keys.tolist(), *rest)}
        assert {k: outline(v) for k, v in state.items()} == layout, (
            "the recorded RNG layout is not what this torch/numpy/python produce")
        states.append(state)
    return states


def _extra_state(structure: dict, values: dict, gen) -> dict[str, Any]:
    """Everything but the weights, in the recorded top-level order."""
    built = {
        "scaler": {},
        "loss": _state_dict(structure["loss"], values["module_versions"]["loss"], gen),
        "rng": _rng(structure["rng"], seed=1234),
    }
    assert structure["scaler"] == [], "an old checkpoint with a GradScaler state: not covered"
    return {key: built[key] if key in built else values["plain"][key]
            for key, _ in structure["top_level"] if key in built or key in values["plain"]}


def _atomic_write(path: Path, write) -> None:
    """As the old code: a dot-name `.tmp` file, fsynced, then renamed."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_ddp(directory: Path, spec: dict) -> Path:
    """The old single-file checkpoint: `torch.save` of the whole state, then its manifest."""
    structure, values = spec["structure"], spec["values"]
    gen = torch.Generator().manual_seed(0)
    models = {name: _state_dict(structure[name], values["module_versions"][name], gen)
              for name in MODELS}
    step = values["optimizer_step"]
    optimizer = {
        "state": {index: {key: _tensor(key, shape, dtype, gen, step)
                          for key, shape, dtype in entries}
                  for index, entries in structure["optimizer"]["state"]},
        "param_groups": [{**{k: _decode(v) for k, v in group.items()}, "params": layout["params"]}
                         for group, layout in zip(values["param_groups"],
                                                  structure["optimizer"]["param_groups"])],
    }
    for group, layout in zip(optimizer["param_groups"], structure["optimizer"]["param_groups"]):
        assert list(group) == layout["keys"]
    state = {**models, "optimizer": optimizer, **_extra_state(structure, values, gen)}
    state = {key: state[key] for key, _ in structure["top_level"]}
    path = directory / spec["checkpoint"]
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: torch.save(state, f))
    data = path.read_bytes()
    manifest = {"format_version": values["manifest_format_version"], "step": state["step"],
                "epoch": state["epoch"], "epoch_step": state.get("epoch_step", 0),
                "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert list(manifest) == structure["manifest"]
    _atomic_write(path.with_name(path.name + ".manifest.json"),
                  lambda f: f.write(json.dumps(manifest).encode()))
    assert describe_ddp(path) == structure, "the rebuilt file does not match its description"
    return path


def _nested_weights(structure: dict, values: dict, gen) -> dict[str, Any]:
    """student, teacher and optimizer as the old code handed them to DCP (parameter names as
    keys), from the flattened keys; `step` holds the recorded count."""
    nested: dict[str, Any] = {"student": {}, "teacher": {}, "optimizer": {"state": {}}}
    groups: dict[int, dict] = {}
    for key, meta in structure["dcp"].items():
        top, rest = key.split(".", 1)
        if top in MODELS:
            nested[top][rest] = _tensor(rest, *meta, gen)
        elif rest.startswith("state."):
            param, leaf = rest[len("state."):].rsplit(".", 1)
            nested["optimizer"]["state"].setdefault(param, {})[leaf] = _tensor(
                leaf, *meta, gen, values["optimizer_step"])
        else:
            index, name = rest[len("param_groups."):].split(".", 1)
            value = values["param_groups"][int(index)][name]
            groups.setdefault(int(index), {})[name] = _decode(value)
    nested["optimizer"]["param_groups"] = [groups[i] for i in sorted(groups)]
    return nested


def build_fsdp(directory: Path, spec: dict) -> Path:
    """The old FSDP folder: state.pt, then the DCP save, then COMMITTED.json last.

    One process writes it, so there is one `__0_0.distcp` (one chunk per tensor) where the 2
    old ranks wrote two; DCP reads by the tensors' global shapes and offsets, so readers do not
    see the difference. Keys, shapes and dtypes are the recorded ones (checked).
    """
    import torch.distributed.checkpoint as dcp
    structure, values = spec["structure"], spec["values"]
    gen = torch.Generator().manual_seed(0)
    folder = directory / spec["checkpoint"]
    folder.mkdir(parents=True)
    extra = _extra_state(structure["state_pt"], values, gen)
    _atomic_write(folder / EXTRA_STATE, lambda f: torch.save(extra, f))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP's "no process group" notice
        dcp.save(_nested_weights(structure, values, gen), checkpoint_id=str(folder), no_dist=True)
    assert dcp_keys(folder) == structure["dcp"], "DCP flattened the rebuilt weights differently"
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.name != MARKER}
    marker = {"format_version": values["marker_format_version"], "step": extra["step"],
              "epoch": extra["epoch"], "epoch_step": extra.get("epoch_step", 0),
              "world_size": extra.get("world_size"), "files": files}
    _atomic_write(folder / MARKER, lambda f: f.write(json.dumps(marker).encode()))
    one_writer = {**structure, **{key: [n for n in structure[key] if not n.endswith(".distcp")]
                                  + ["__0_0.distcp"] for key in ("files", "marker_files")}}
    one_writer["files"].sort()
    one_writer["marker_files"].sort()
    assert describe_fsdp(folder) == one_writer, "the rebuilt folder does not match its description"
    return folder


BUILDERS = {"ddp": build_ddp, "fsdp": build_fsdp}


# --- the runs ---------------------------------------------------------------------------------

def overrides(spec: dict, images: Path, run: Path, max_steps: int) -> list[str]:
    values = {**spec["overrides"], "data.path": images, "train.output_dir": run,
              "train.max_steps": max_steps}
    return [f"{k}={v}" for k, v in values.items()]


def checkpoint_of(run: Path, step: int) -> Path:
    folder = run / "checkpoints"
    found = [p for p in (folder / f"step_{step:08d}.pt", folder / f"step_{step:08d}") if p.exists()]
    assert found, (f"no checkpoint of step {step} in {folder}: "
                   f"{sorted(p.name for p in folder.iterdir())}")
    return found[0]


@pytest.mark.parametrize("name,nproc", [("ddp", 1), ("fsdp", 2), ("fsdp", 1)],
                         ids=["ddp-file-1-process", "fsdp-folder-2-ranks", "fsdp-folder-1-process"])
def test_old_checkpoint_resumes_and_trains_on(name, nproc, tmp_path):
    """Today's code resumes the old-format checkpoint (whose frozen last layer has no AdamW
    state) and trains on past the epoch where that layer starts training."""
    spec = load_spec(name)
    images = write_image_folder(tmp_path / "images", **spec["images"])
    run = tmp_path / "run"
    BUILDERS[name](run / "checkpoints", spec)
    step = spec["resume_to_step"]
    result = run_train(overrides(spec, images, run, step), nproc=nproc, timeout=180)
    resumed = [line for line in result.stdout.splitlines() if "resumed from" in line]
    assert resumed, f"the run did not resume:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert re.search(re.escape(spec["checkpoint"]) + r"(?![\w.])", resumed[0]), resumed[0]
    checkpoint_of(run, step)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _keyed(value: Any) -> bool:
    """A list of [name, ...] entries with distinct names (state-dict keys, optimizer indices)."""
    return (isinstance(value, list) and bool(value)
            and all(isinstance(e, list) and len(e) >= 2 and isinstance(e[0], (str, int))
                    for e in value)
            and len({json.dumps(e[0]) for e in value}) == len(value))


def _differences(actual: Any, frozen: Any, where: str) -> list[str]:
    """What differs, entry by entry; lists of named entries must also keep their order."""
    if isinstance(frozen, dict) and isinstance(actual, dict):
        a, f, ordered = actual, frozen, False  # DCP keys, sections: a set of names
    elif _keyed(frozen) and _keyed(actual):
        a = {json.dumps(e[0]): e[1:] for e in actual}
        f = {json.dumps(e[0]): e[1:] for e in frozen}
        ordered = True
    else:
        return [] if actual == frozen else [f"{where}: {_short(actual)}, frozen {_short(frozen)}"]
    out = [f"{where} / {k}: new ({_short(a[k])})" for k in a if k not in f]
    out += [f"{where} / {k}: gone (was {_short(f[k])})" for k in f if k not in a]
    for k in f:
        if k in a:
            out += _differences(a[k], f[k], f"{where} / {k}")
    if ordered and not out and list(a) != list(f):
        out.append(f"{where}: the same entries in another order")
    return out


def _without_adamw_options(described: Any, adamw: set[str]) -> Any:
    """AdamW's own hyperparameter keys (which torch versions add) taken out of a description."""
    if isinstance(described, dict):
        return {k: _without_adamw_options(v, adamw) for k, v in described.items()
                if not (re.match(r"optimizer\.param_groups\.\d+\.", k)
                        and k.rsplit(".", 1)[1] in adamw)}
    if isinstance(described, list) and described and isinstance(described[0], dict) \
            and "keys" in described[0]:
        return [{**g, "keys": [k for k in g["keys"] if k not in adamw]} for g in described]
    if isinstance(described, list):
        return [_without_adamw_options(v, adamw) for v in described]
    return described


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_checkpoint_format_is_still_the_frozen_one(name, tmp_path):
    """Today's own checkpoint, from the same settings at the same step, has exactly the frozen
    layout: top-level keys and types, state-dict keys, shapes and dtypes, optimizer layout,
    DCP flattened keys, manifest / marker keys, RNG layout."""
    spec = load_spec(name)
    images = write_image_folder(tmp_path / "images", **spec["images"])
    run = tmp_path / "run"
    step = spec["values"]["plain"]["step"]
    run_train(overrides(spec, images, run, step), nproc=spec["nproc"], timeout=180)
    path = checkpoint_of(run, step)
    actual = describe_ddp(path) if name == "ddp" else describe_fsdp(path)
    adamw = set(spec["adamw_option_keys"]) | set(
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)]).param_groups[0]) - {"params"}
    problems = _differences(_without_adamw_options(actual, adamw),
                            _without_adamw_options(spec["structure"], adamw), path.name)
    assert not problems, (
        f"the {name} checkpoint format changed ({SPECS[name].name} is the layout of commit "
        f"{spec['written_by_commit'][:7]}):\n  " + "\n  ".join(problems[:30]) +
        "\nCheckpoints written before the change must still load: keep reading the old layout "
        "(tests/test_old_checkpoints.py resumes it), and only then update the frozen description "
        "by adding a newer one next to it, never by editing this one.")


# --- writing the JSON files from real checkpoints --------------------------------------------

def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with one line per entry, short lists and dicts kept on one line."""
    flat = json.dumps(value)
    if len(flat) + indent <= 140 or not isinstance(value, (dict, list)) or not value:
        return flat
    pad = " " * (indent + 1)
    if isinstance(value, dict):
        body = [f"{pad}{json.dumps(k)}: {_dumps(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(body) + "\n" + " " * indent + "}"
    if all(not isinstance(v, (dict, list)) for v in value):
        return flat
    body = [pad + _dumps(v, indent + 1) for v in value]
    return "[\n" + ",\n".join(body) + "\n" + " " * indent + "]"


if __name__ == "__main__":
    for kind, source in zip(("ddp", "fsdp"), sys.argv[1:3]):
        frozen = {**load_spec(kind), **(freeze_ddp if kind == "ddp" else freeze_fsdp)(Path(source))}
        frozen["adamw_option_keys"] = sorted(set(torch.optim.AdamW(
            [torch.zeros(1, requires_grad=True)]).param_groups[0]) - {"params"})
        SPECS[kind].write_text(_dumps(frozen) + "\n")
