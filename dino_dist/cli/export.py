"""`dino-export`: one checkpoint (DDP file or FSDP folder) → the teacher backbone's weights.

    dino-export RUN/checkpoints/step_00012000       [--output teacher_backbone.pth]
    dino-export RUN/checkpoints/step_00012000 --format timm [--safetensors]
    dino-export RUN/checkpoints/step_00012000 --format dinov2

The default output is a plain state dict under the official DINO key names (what
`facebookresearch/dino`'s pretrained files hold), so it loads with `strict=True` into
`dino_dist.models.build_backbone(...)` or the reference ViT; a small `<output>.json` beside it
records the architecture for `dino-knn --checkpoint <output>` and other tools. `--format timm`
writes weights that `timm.create_model(NAME, num_classes=0)` loads with `strict=True` (NAME
and any arguments are in the `.json` and the printed line), as `.safetensors` if asked.
`--format dinov2` writes the official dinov2 backbone's state dict: the `.json` holds the
`DinoVisionTransformer` arguments (LayerScale, registers, SwiGLU as trained) that load it
with `strict=True`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dino_dist.checkpoint.directory import CHECKPOINT_PATTERN
from dino_dist.cli.command import is_extra_rank, report_error
from dino_dist.errors import CheckpointError
from dino_dist.export.backbone import FORMATS, SAFETENSORS_SUFFIX, export, sidecar



def report(output: Path, info: dict, numel: int) -> int:
    if info["format"] == "timm":
        kwargs = "".join(f", {k}={v!r}" for k, v in info["timm_kwargs"].items())
        target = (f"for timm: timm.create_model({info['timm_model']!r}{kwargs}) loads it with "
                  f"strict=True")
    elif info["format"] == "dinov2":
        kwargs = ", ".join(f"{k}={v!r}" for k, v in info["dinov2_kwargs"].items())
        target = f"for dinov2: DinoVisionTransformer({kwargs}) loads it with strict=True"
    else:
        target = "under the official DINO key names"
    print(f"wrote {output}: {info['which']} backbone of step {info['step']} ({info['arch']}, "
          f"patch {info['patch_size']}, {numel / 1e6:.2f} M parameters) {target}; "
          f"architecture in {sidecar(output)}")
    return 0


def default_output(checkpoint: Path, which: str, target: str, safetensors: bool) -> Path:
    named = CHECKPOINT_PATTERN.match(checkpoint.name)
    step = int(named.group(1)) if named else 0
    named_format = "" if target == "dino" else f"_{target}"
    suffix = named_format + (SAFETENSORS_SUFFIX if safetensors else ".pth")
    return checkpoint.parent.parent / f"{which}_backbone_step{step}{suffix}"


def option_mistake(args: argparse.Namespace) -> str | None:
    """A combination of options that would write something other than what was asked."""
    if args.safetensors and args.format != "timm":
        return ("--safetensors is for --format timm (the same DINO key names); the default "
                "format writes the .pth that dino-knn reads")
    if args.output is not None and (args.output.suffix == SAFETENSORS_SUFFIX) != args.safetensors:
        return (f"--output {args.output} does not match the format: use a .safetensors name "
                f"with --safetensors, and another name without it")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dino-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a step_<8 digits>.pt file or an FSDP step_<8 digits> folder")
    parser.add_argument("--output", type=Path, default=None,
                        help="default: <which>_backbone_step<N>[_timm|_dinov2].pth in the run "
                             "directory")
    parser.add_argument("--which", choices=("teacher", "student"), default="teacher",
                        help="the teacher is what DINO evaluates and publishes")
    parser.add_argument("--format", choices=FORMATS, default="dino",
                        help="dino: the official DINO state dict; "
                             "timm: for timm.create_model(NAME, num_classes=0); "
                             "dinov2: the official dinov2 backbone's state dict")
    parser.add_argument("--safetensors", action="store_true",
                        help="with --format timm: write .safetensors instead of a pickled .pth")
    args = parser.parse_args(argv)
    mistake = option_mistake(args)
    if mistake:
        return report_error("dino-export", mistake)
    if is_extra_rank():
        return 0
    try:
        output = args.output or default_output(args.checkpoint, args.which, args.format,
                                               args.safetensors)
        info, numel = export(args.checkpoint, output, args.which, args.format, args.safetensors)
    except (CheckpointError, OSError, KeyError) as err:
        return report_error("dino-export", err)
    return report(output, info, numel)


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
