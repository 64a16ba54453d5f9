"""Attention maps of a ViT: the last block's CLS attention over the patches, per head and
their mean, the DINO mask that keeps a share of the attention mass, and pictures of them.

Two users: `dino-attention` (any checkpoint, each image at its own resolution, PNG files) and
the training run (`eval.attention_images`: a grid of a few fixed images for TensorBoard, from
the live, possibly sharded teacher). The mask follows the official visualize_attention.py:
sort the patches' attention, normalise it to sum 1, and keep the patches whose cumulative sum
exceeds 1 - keep, i.e. the most attended patches that together hold `keep` of the mass.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dino_dist.config import Config
from dino_dist.data.augment import normalise
from dino_dist.data.folder import IMAGE_EXTENSIONS, decode_rgb, find_images, images_under
from dino_dist.data.images import DECODE_ERRORS
from dino_dist.errors import CheckpointError, DataError
from dino_dist.eval.knn import live_backbone
from dino_dist.models import VisionTransformer

DEFAULT_KEEP = 0.6  # the official threshold: 60 % of the attention mass
GRID_IMAGES = 8  # images of eval.attention_images shown during training
GRID_TILE_MIN = 96  # px: small training crops are enlarged so the grid can be read
GAP = 2  # px of white between the grid's tiles
LABEL_HEIGHT = 14  # px of the strip naming the grid's columns
# Anchors of matplotlib's viridis (perceptually even; dark = little attention, yellow = most).
VIRIDIS = torch.tensor([(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142),
                        (33, 144, 141), (39, 173, 129), (92, 200, 99), (170, 220, 50),
                        (253, 231, 37)], dtype=torch.float32) / 255
DROPPED_TINT = torch.tensor([0.15, 0.2, 0.45]).view(3, 1, 1)  # slate blue: visible on black too


# -- the maps ------------------------------------------------------------------------------

def patch_grid(cls_attention: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """[B, heads, 1 + rows*cols] CLS attention -> [B, heads, rows, cols] over the patches
    (the CLS token's attention to itself is dropped, as in the official code)."""
    return cls_attention[..., 1:].reshape(*cls_attention.shape[:-1], rows, cols)


def mass_mask(maps: torch.Tensor, keep: float = DEFAULT_KEEP) -> torch.Tensor:
    """Bool mask of the most attended patches that together hold `keep` of each map's mass
    (maps [..., rows, cols]; the official sort / cumsum / > 1 - keep rule)."""
    flat = maps.flatten(-2).double()
    values, order = torch.sort(flat, dim=-1)
    cumulative = torch.cumsum(values / values.sum(dim=-1, keepdim=True), dim=-1)
    kept_sorted = cumulative > 1 - keep
    kept = torch.empty_like(kept_sorted).scatter_(-1, order, kept_sorted)
    return kept.reshape(maps.shape)


# -- images in, pictures out ---------------------------------------------------------------

def model_size(height: int, width: int, patch: int, shorter_side: int | None) -> tuple[int, int]:
    """Both sides rounded to multiples of the patch (at least one patch), after scaling the
    shorter side to `shorter_side` when given (else the image's own resolution)."""
    scale = shorter_side / min(height, width) if shorter_side else 1.0
    # Halves round up (Python's round() would send 12.5 down and 7.5 up).
    return tuple(max(1, int(side * scale / patch + 0.5)) * patch for side in (height, width))


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [3, H, W] -> picture [3, h, w] in [0, 1] (bicubic, antialiased)."""
    resized = TF.resize(image, list(size), interpolation=InterpolationMode.BICUBIC,
                        antialias=True)
    return resized.float().div(255).clamp(0, 1)


def model_input(picture: torch.Tensor) -> torch.Tensor:
    """Picture(s) in [0, 1] -> the model's input (the training pipeline's normalisation)."""
    return normalise()(picture)


def colorize(values: torch.Tensor) -> torch.Tensor:
    """[h, w] -> viridis [3, h, w]; each map scaled to its own min..max (a flat map is dark)."""
    low, high = values.min(), values.max()
    unit = (values - low) / (high - low) if high > low else torch.zeros_like(values)
    position = unit.clamp(0, 1) * (len(VIRIDIS) - 1)
    below = position.floor().long().clamp(max=len(VIRIDIS) - 2)
    weight = (position - below).unsqueeze(-1)
    rgb = VIRIDIS[below] * (1 - weight) + VIRIDIS[below + 1] * weight
    return rgb.permute(2, 0, 1)


def enlarge(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Each patch cell repeated `factor` times in both directions (the official nearest)."""
    return grid.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def overlay(picture: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The kept patches as they are, the others dimmed under a blue veil (a spotlight)."""
    return torch.where(mask.unsqueeze(0), picture, 0.4 * picture + 0.6 * DROPPED_TINT)


def pictures(picture: torch.Tensor, maps: torch.Tensor, patch: int,
             keep: float = DEFAULT_KEEP) -> dict[str, torch.Tensor]:
    """name -> [3, h, w] in [0, 1]: image, mean, mask (of the mean map), head_0... for one
    image's maps [heads, rows, cols] at its picture's resolution."""
    mean = maps.mean(dim=0)
    out = {"image": picture, "mean": colorize(enlarge(mean, patch)),
           "mask": overlay(picture, enlarge(mass_mask(mean, keep), patch))}
    for head, head_map in enumerate(maps):
        out[f"head_{head}"] = colorize(enlarge(head_map, patch))
    return out


def grid_row(tiles: list[torch.Tensor], scale: int = 1) -> torch.Tensor:
    """Tiles side by side with white gaps, each enlarged `scale` times (nearest)."""
    parts = []
    for tile in tiles:
        parts += [enlarge(tile, scale), torch.ones(3, tile.shape[1] * scale, GAP)]
    return torch.cat(parts[:-1], dim=2)


def stack_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    parts = []
    for row in rows:
        parts += [row, torch.ones(3, GAP, row.shape[2])]
    return torch.cat(parts[:-1], dim=1)


def column_labels(names: list[str], tile_width: int) -> torch.Tensor:
    """A white strip [3, LABEL_HEIGHT, W] with each column's name over its tile (clipped)."""
    font = ImageFont.load_default()
    tiles = []
    for name in names:
        label = Image.new("RGB", (tile_width, LABEL_HEIGHT), "white")
        draw = ImageDraw.Draw(label)
        text = name.replace("_", " ")
        width = draw.textbbox((0, 0), text, font=font)[2]
        draw.text((max(0, (tile_width - width) // 2), 1), text, fill="black", font=font)
        tiles.append(torch.from_numpy(np.asarray(label).copy()).permute(2, 0, 1).float() / 255)
    return grid_row(tiles)


def labelled_grid(rows: list[dict[str, torch.Tensor]], scale: int = 1) -> torch.Tensor:
    """Rows of named tiles (one size), each enlarged `scale` times, under the column names."""
    tile_width = next(iter(rows[0].values())).shape[2] * scale
    lines = [grid_row(list(row.values()), scale) for row in rows]
    return stack_rows([column_labels(list(rows[0]), tile_width)] + lines)


def save_png(image: torch.Tensor, path: Path) -> Path:
    array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    return path


# -- dino-attention: files ---------------------------------------------------------------

def image_files(paths: list[Path]) -> list[Path]:
    """The files given, and the images under the folders given (sorted, recursively)."""
    files = []
    for path in paths:
        if not path.exists():
            raise DataError(f"'{path}' does not exist: give image files or folders of images")
        if path.is_file():
            files.append(path)
            continue
        found = [Path(p) for p in images_under(path)]
        if not found:
            raise DataError(f"folder '{path}' contains no images ({', '.join(IMAGE_EXTENSIONS)}):"
                            " give image files or folders that hold some")
        files.extend(found)
    return files


def read_image(path: Path) -> torch.Tensor:
    """uint8 RGB [3, H, W]; a file that does not decode is the user's to fix (one line)."""
    try:
        return decode_rgb(str(path))
    except DECODE_ERRORS as err:
        raise DataError(f"cannot read image '{path}' ({type(err).__name__}: {err}): "
                        "give a readable image file (jpg, png, ...)") from None


def require_vit(backbone: torch.nn.Module, checkpoint: Path) -> VisionTransformer:
    if not isinstance(backbone, VisionTransformer):
        raise CheckpointError(f"checkpoint '{checkpoint}' holds a {type(backbone).__name__} "
                              "backbone, which has no attention: attention maps need a ViT "
                              "checkpoint")
    return backbone


@torch.no_grad()
def image_maps(backbone: VisionTransformer, image: torch.Tensor, shorter_side: int | None,
               device) -> tuple[torch.Tensor, torch.Tensor]:
    """(picture [3, h, w], maps [heads, rows, cols]) for one uint8 image."""
    patch = backbone.patch_size
    picture = resize(image, model_size(*image.shape[-2:], patch, shorter_side))
    attention = backbone.eval().get_last_cls_attention(model_input(picture)[None].to(device))
    rows, cols = picture.shape[1] // patch, picture.shape[2] // patch
    return picture, patch_grid(attention.float().cpu(), rows, cols)[0]


def write_attention_pngs(backbone: VisionTransformer, files: list[Path], output_dir: Path,
                         shorter_side: int | None, keep: float, device) -> list[Path]:
    """Per image, a folder <output_dir>/<name>/ of image, mean, mask, head_N and grid PNGs."""
    written, used = [], set()
    for path in files:
        picture, maps = image_maps(backbone, read_image(path), shorter_side, device)
        folder = output_dir / unique_name(path.stem, used)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DataError(f"cannot create '{folder}' ({err.strerror or err}): choose an "
                            "--output-dir you can write to") from None
        named = pictures(picture, maps, backbone.patch_size, keep)
        named["grid"] = labelled_grid([named])
        written += [save_png(image, folder / f"{name}.png") for name, image in named.items()]
    return written


def unique_name(stem: str, used: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3`... when images of the same name came from other folders."""
    name, count = stem, 1
    while name in used:
        count += 1
        name = f"{stem}-{count}"
    used.add(name)
    return name


# -- during training: a grid of fixed images, from the live teacher ----------------------

class AttentionGrid:
    """The first images of `eval.attention_images` (sorted by name), loaded once at set-up at
    the global crop size, and their attention grid from the live teacher: one row per image
    (image, mean map, mask, each head)."""

    def __init__(self, cfg: Config, device):
        folder = cfg.eval.attention_images  # a ViT and a picture sink: the config's rules
        files = find_images(folder, what="eval.attention_images",
                            hint="give a folder of a few images, or leave it empty")[0]
        self.patch = cfg.model.patch_size
        side = model_size(1, 1, self.patch, cfg.data.global_crop_size)[0]
        self.pictures = torch.stack([square(read_image(Path(f)), side)
                                     for f in files[:GRID_IMAGES]])
        self.inputs = model_input(self.pictures).to(device)
        self.scale = -(-GRID_TILE_MIN // side)  # ceil: tiles of at least GRID_TILE_MIN px

    @torch.no_grad()
    def render(self, teacher: torch.nn.Module) -> torch.Tensor:
        """[1, 3, H, W] in [0, 1]. Every rank must call it (a sharded forward is a collective);
        eval mode, no random numbers, the mode restored and a sharded root resharded after."""
        with live_backbone(teacher):
            attention = teacher(self.inputs, output="cls_attention").float().cpu()
        cells = self.pictures.shape[-1] // self.patch
        maps = patch_grid(attention, cells, cells)
        lines = [pictures(picture, heads, self.patch)
                 for picture, heads in zip(self.pictures, maps)]
        return labelled_grid(lines, self.scale).unsqueeze(0)


def square(image: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 -> picture in [0, 1]: the shorter side resized to `side`, then the centre square
    (all the grid's tiles alike)."""
    height, width = image.shape[-2:]
    scale = side / min(height, width)
    picture = resize(image, (max(side, round(height * scale)), max(side, round(width * scale))))
    return TF.center_crop(picture, [side, side])


def attention_grid_for(cfg: Config, device) -> AttentionGrid | None:
    """The run's grid, or None when eval.attention_images is empty; a bad folder or image is
    reported now, before the first step."""
    return AttentionGrid(cfg, device) if cfg.eval.attention_images else None
