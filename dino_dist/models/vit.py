"""Vision Transformer backbone in the layout of the official DINO release.

Module and parameter names mirror facebookresearch/dino `vision_transformer.py`
so that official checkpoints load with `strict=True` and ours load there. The DINOv2 options
(LayerScale, register tokens, SwiGLU, a mask token) are off by default and, when on, take
DINOv2's names (`ls1.gamma`, `register_tokens`, `mlp.w12`, `mask_token`): with them off, the
model, its state_dict and its outputs are the DINO ones.
"""
import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from dino_dist.distributed.units import ParallelUnits
from dino_dist.models.packing import PackedLayout

LAYER_NORM_EPS = 1e-6
INIT_STD = 0.02
REGISTER_INIT_STD = 1e-6  # DINOv2's: registers start as (nearly) blank tokens
MAX_REGISTERS = 16
# DINOv2's LayerScale init; also the stand-in where only the trained gammas are known.
DINOV2_LAYERSCALE_INIT = 1e-5
FFN_LAYERS = ("mlp", "swiglu")


def branch_scales(keep_probs: torch.Tensor, rows: int, device: torch.device,
                  crop_starts: torch.Tensor | None = None,
                  tokens: int | None = None) -> torch.Tensor:
    """Stochastic depth's factor per residual branch and sample: 0 (dropped) or 1 / keep.

    One draw per (branch, sample) for all branches at once, in the order the branches run,
    so a forward makes one random call instead of one per branch, and each branch is then a
    single fused `x + branch * scale` (torch.addcmul). Returns [branches, rows, 1, 1]; with
    `crop_starts` (packed rows, models.packing) [branches, rows, tokens, 1]: one draw per
    token position, each token reading the one at its crop's first token, so every crop is
    kept or dropped whole with the rate of the unpacked path and no shape depends on a count.
    Drawn in float32 whatever the autocast dtype: a bf16 draw would bias the keep rate.
    """
    keep = keep_probs.view(-1, 1, 1)
    if crop_starts is None:
        draws = torch.rand((len(keep_probs), rows, 1), device=device)
    else:
        draws = torch.rand((len(keep_probs), rows, tokens), device=device)[:, :, crop_starts]
    return draws.add_(keep).floor_().div_(keep).unsqueeze(-1)


class DropPath(nn.Module):
    """Stochastic depth of a block's two residual branches; nothing of it is in a state_dict.

    The block calls `scales` once for both branches (or the ViT once for all its blocks,
    see VisionTransformer._blocks) and adds each branch as x + branch * scale.
    """

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)
        self.active = self.drop_prob > 0.0
        # Computed in double and rounded once; a tensor so that torch.compile does not guard
        # on each block's own float (past the recompile limit blocks silently ran eager).
        # Non-persistent: not in the state_dict.
        self.register_buffer("keep_prob", torch.tensor(1.0 - self.drop_prob), persistent=False)

    def scales(self, x: torch.Tensor, crop_starts: torch.Tensor | None = None) -> torch.Tensor | None:
        """The two branches' factors [2, ...] (branch_scales), or None when nothing is dropped."""
        if not (self.active and self.training):
            return None
        return branch_scales(self.keep_prob.expand(2), x.shape[0], x.device, crop_starts,
                             x.shape[1])

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


def add_branch(x: torch.Tensor, branch: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The residual x + branch, the branch scaled per sample by stochastic depth if `scale`."""
    return x + branch if scale is None else torch.addcmul(x, branch, scale)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nn.Module):
    """DINOv2's fused SwiGLU: one matrix for value and gate, a hidden width of 2/3 of the MLP's
    (same parameter count) rounded up to a multiple of 8, as DINOv2 sizes it."""

    def __init__(self, dim: int, mlp_hidden_dim: int):
        super().__init__()
        hidden_dim = swiglu_hidden_dim(mlp_hidden_dim)
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden_dim(mlp_hidden_dim: int) -> int:
    return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8


def feed_forward(dim: int, mlp_ratio: float, ffn: str) -> nn.Module:
    if ffn not in FFN_LAYERS:
        raise ValueError(f"unknown ffn {ffn!r}: pick one of {', '.join(FFN_LAYERS)}")
    hidden_dim = int(dim * mlp_ratio)
    return Mlp(dim, hidden_dim) if ffn == "mlp" else SwiGLUFFN(dim, hidden_dim)


class LayerScale(nn.Module):
    """A learned per-channel factor on a residual branch (CaiT, DINOv2): started small, each
    block begins near the identity, which steadies deep models early in training."""

    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


def layer_scale(dim: int, init_value: float) -> nn.Module:
    # Off: an identity without parameters, so the state_dict is DINO's.
    return LayerScale(dim, init_value) if init_value > 0 else nn.Identity()


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        """[B, tokens, dim] -> [3, B, heads, tokens, head_dim] (a view: q, k, v = _qkv(x))."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads)
        return qkv.permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, crop_starts: torch.Tensor | None = None) -> torch.Tensor:
        """`crop_starts` (packed rows): a token attends only to the tokens of its own crop."""
        batch, tokens, dim = x.shape
        q, k, v = self._qkv(x)
        # One [tokens, tokens] mask serves every row and head: all packed rows share a layout.
        same_crop = None if crop_starts is None else crop_starts[:, None] == crop_starts[None, :]
        # SDPA's default scale is head_dim**-0.5, the same as the official code.
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=same_crop)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, dim))

    def cls_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax attention of the CLS query (token 0) over all tokens: [B, heads, tokens].

        Written out because SDPA does not return its probabilities; training never comes here.
        Only the CLS row is formed, so memory grows with the tokens, not with their square.
        """
        q, k, _ = self._qkv(x)
        head_dim = q.shape[-1]
        logits = (q[:, :, :1] * head_dim ** -0.5) @ k.transpose(-2, -1)
        return logits.float().softmax(dim=-1)[:, :, 0]


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, layerscale_init: float = 0.0, ffn: str = "mlp"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1 = layer_scale(dim, layerscale_init)
        # One module serves both branches; each call draws a fresh mask.
        self.drop_path = DropPath(drop_path_rate)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = feed_forward(dim, mlp_ratio, ffn)
        self.ls2 = layer_scale(dim, layerscale_init)

    def forward(self, x: torch.Tensor, return_cls_attention: bool = False,
                crop_starts: torch.Tensor | None = None,
                scales: torch.Tensor | None = None) -> torch.Tensor:
        """`crop_starts` [tokens]: set when each row of `x` packs several crops (models.packing):
        attention stays within a crop and stochastic depth drops whole crops. Tensors, not a
        layout object, so FSDP2, activation checkpointing and compile pass them through as is.
        `scales` [2, ...]: the branches' stochastic-depth factors drawn by the caller
        (DropPath.scales draws them here when not given)."""
        # The attention comes out of forward (not a method of its own) so that a sharded
        # (FSDP2) block gathers its parameters for it, as the official return_attention does.
        if return_cls_attention:
            return self.attn.cls_attention(self.norm1(x))
        if scales is None:
            scales = self.drop_path.scales(x, crop_starts)
        first, second = (None, None) if scales is None else scales.unbind(0)
        x = add_branch(x, self.ls1(self.attn(self.norm1(x), crop_starts)), first)
        return add_branch(x, self.ls2(self.mlp(self.norm2(x))), second)


class PatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size != 0:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # The convolution would silently drop the pixels past the last whole patch.
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"an image of {height}x{width} px does not split into "
                             f"{self.patch_size}-px patches: use sides that are multiples of "
                             f"{self.patch_size} (e.g. local crops of 98 px for patch 14)")
        return self.proj(x).flatten(2).transpose(1, 2)


def interpolate_pos_embed(pos_embed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Resize the patch part of `pos_embed` to a rows x cols grid, as official DINO does.

    Official quirks kept on purpose so features match released checkpoints:
    the target counts get +0.1 (avoids floor() landing one short), and the
    interpolation is driven by `scale_factor`, which the bicubic kernel uses
    directly for the coordinate mapping (not the ratio of output sizes).
    """
    cls_pos = pos_embed[:, :1]
    patch_pos = pos_embed[:, 1:]
    num_patches, dim = patch_pos.shape[1], patch_pos.shape[2]
    side = math.sqrt(num_patches)
    rows_f, cols_f = rows + 0.1, cols + 0.1
    grid = patch_pos.reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(rows_f / side, cols_f / side), mode="bicubic")
    if grid.shape[-2:] != (rows, cols):
        raise RuntimeError(f"pos_embed interpolated to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
    patch_pos = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((cls_pos, patch_pos), dim=1)


class VisionTransformer(nn.Module):
    """DINO ViT backbone; `forward` returns the normalised CLS token [B, embed_dim].

    DINOv2 options, all off by default: `layerscale_init` > 0 puts LayerScale on both branches
    of every block; `num_registers` register tokens sit between the CLS token and the patches
    (tokens [CLS, registers, patches]); `ffn="swiglu"` swaps the MLP for SwiGLU;
    `drop_path_uniform` gives every block the same stochastic-depth rate; `mask_token` adds
    the learned token that `forward_tokens(images, masks)` puts in place of masked patches.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float = 0.0,
        num_registers: int = 0,
        ffn: str = "mlp",
        drop_path_uniform: bool = False,
        mask_token: bool = False,
    ):
        super().__init__()
        _check_options(layerscale_init, num_registers)  # ffn: checked by its builder
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.num_registers = num_registers
        self.num_prefix_tokens = 1 + num_registers  # tokens before the patches
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        # Absent (None) when off, so a DINO model's state_dict has no such keys.
        self.register_parameter("register_tokens", nn.Parameter(
            torch.zeros(1, num_registers, embed_dim)) if num_registers else None)
        self.register_parameter("mask_token", nn.Parameter(
            torch.zeros(1, embed_dim)) if mask_token else None)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rate, layerscale_init, ffn)
            for rate in drop_path_rates(drop_path_rate, depth, drop_path_uniform)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=LAYER_NORM_EPS)
        # The keep rate of each dropping block's two branches, in the order they run.
        keep = [block.drop_path.keep_prob for block in self.blocks if block.drop_path.active]
        self.register_buffer("branch_keep", torch.stack(keep).repeat_interleave(2) if keep else None,
                             persistent=False)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        nn.init.trunc_normal_(self.cls_token, std=INIT_STD)
        # The patch-embedding conv keeps PyTorch's default init, as upstream.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Drawn last: a model without registers draws exactly the DINO sequence of numbers.
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=REGISTER_INIT_STD)

    def parallel_units(self) -> ParallelUnits:
        """Each block alone; the embeddings and the final norm stay with the root."""
        blocks = list(self.blocks)
        return ParallelUnits(shard=blocks, compile=blocks, checkpoint=blocks)

    def pos_embed_for(self, height: int, width: int) -> torch.Tensor:
        rows, cols = height // self.patch_size, width // self.patch_size
        # Upstream skips interpolation only for the training grid itself.
        if rows * cols == self.patch_embed.num_patches and height == width:
            return self.pos_embed
        return interpolate_pos_embed(self.pos_embed, rows, cols)

    def prepare_tokens(self, images: torch.Tensor,
                       masks: torch.Tensor | None = None) -> torch.Tensor:
        """[CLS, registers, patches] with positions added: DINOv2's order, masked patches
        replaced before the positions are added, registers inserted after (they have none)."""
        height, width = images.shape[-2:]
        patches = self.patch_embed(images)
        if masks is not None:
            patches = self._masked(patches, masks)
        cls = self.cls_token.expand(images.shape[0], -1, -1)
        tokens = torch.cat((cls, patches), dim=1)
        tokens = tokens + self.pos_embed_for(height, width)
        if self.register_tokens is None:
            return tokens
        registers = self.register_tokens.expand(images.shape[0], -1, -1)
        return torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)

    def _masked(self, patches: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Patch embeddings with the mask token where `masks` [B, patches] is True."""
        if self.mask_token is None:
            raise ValueError("masks were given but this ViT has no mask token: build it with "
                             "mask_token=True")
        if masks.dtype != torch.bool or masks.shape != patches.shape[:2]:
            raise ValueError(f"masks must be bool of shape {tuple(patches.shape[:2])} (images, "
                             f"patches), not {masks.dtype} {tuple(masks.shape)}")
        return torch.where(masks.unsqueeze(-1), self.mask_token.to(patches.dtype).unsqueeze(0),
                           patches)

    def _blocks(self, tokens: torch.Tensor,
                crop_starts: torch.Tensor | None = None) -> torch.Tensor:
        scales = iter(self._stochastic_depth(tokens, crop_starts))
        for block in self.blocks:
            block_scales = next(scales, None) if block.drop_path.active else None
            tokens = block(tokens, crop_starts=crop_starts, scales=block_scales)
        return tokens

    def _stochastic_depth(self, tokens: torch.Tensor,
                          crop_starts: torch.Tensor | None) -> list[torch.Tensor]:
        """Every dropping block's two factors [2, ...], drawn in one call (branch_scales);
        the blocks draw in the same order as each drawing its own, so the numbers match."""
        if not (self.training and self.branch_keep is not None):
            return []
        scales = branch_scales(self.branch_keep, tokens.shape[0], tokens.device, crop_starts,
                               tokens.shape[1])
        return list(scales.split(2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.norm(self._blocks(self.prepare_tokens(images)))[:, 0]

    def forward_tokens(self, images: torch.Tensor,
                       masks: torch.Tensor | None = None) -> torch.Tensor:
        """All normalised output tokens [B, 1 + registers + patches, D]: CLS, registers, then
        the patches row-major. `masks` [B, patches] bool: patches replaced by the mask token."""
        return self.norm(self._blocks(self.prepare_tokens(images, masks)))

    def forward_packed(self, global_images: torch.Tensor, local_images: torch.Tensor) -> torch.Tensor:
        """`torch.cat((forward(global_images), forward(local_images)))` with one pass through
        the blocks instead of two.

        Needs a whole number of local images per global image (models.packing); patch and
        position embeddings run per resolution, the blocks once over the packed rows.
        """
        layout, tokens = self._packed_blocks(global_images, local_images)
        # The norm works per token: normalising only the CLS tokens gives the same values.
        return self.norm(layout.cls_tokens(tokens))

    def forward_packed_tokens(self, global_images: torch.Tensor, local_images: torch.Tensor,
                              global_masks: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised CLS of every crop [G + L, D], in `forward_packed`'s order; normalised
        patch tokens of the global images [G, patches, D]), in one packed pass.
        `global_masks`: the global images' masks, as `forward_tokens` takes them."""
        layout, tokens = self._packed_blocks(global_images, local_images, global_masks)
        patches = layout.global_tokens(tokens)[:, self.num_prefix_tokens:]
        return self.norm(layout.cls_tokens(tokens)), self.norm(patches)

    def _packed_blocks(self, global_images: torch.Tensor, local_images: torch.Tensor,
                       global_masks: torch.Tensor | None = None
                       ) -> tuple[PackedLayout, torch.Tensor]:
        """The packed rows after the last block (each crop: its CLS, registers, patches)."""
        global_tokens = self.prepare_tokens(global_images, global_masks)
        local_tokens = self.prepare_tokens(local_images)
        layout = PackedLayout.of(global_tokens, local_tokens)
        tokens = layout.pack(global_tokens, local_tokens)
        return layout, self._blocks(tokens, layout.crop_starts(tokens.device))

    def get_last_cls_attention(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's attention of the CLS query: [B, heads, 1 + patches], the CLS
        token's column, then the patches (row-major over the patch grid). The softmax runs
        over all tokens; the register columns are left out, so with registers a row sums to
        less than 1."""
        tokens = self.prepare_tokens(images)
        for block in self.blocks[:-1]:
            tokens = block(tokens)
        attention = self.blocks[-1](tokens, return_cls_attention=True)
        if self.register_tokens is None:
            return attention
        return torch.cat((attention[..., :1], attention[..., self.num_prefix_tokens:]), dim=-1)

    def get_intermediate_layers(self, images: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Normalised tokens of the last `n` blocks (used by linear evaluation): each
        [B, num_prefix_tokens + patches, D], the patches after the CLS token and registers."""
        tokens = self.prepare_tokens(images)
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if len(self.blocks) - index <= n:
                outputs.append(self.norm(tokens))
        return outputs


def vit_options(weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The DINOv2 options of the ViT whose state_dict `weights` is, read off its keys: the
    keywords that rebuild it for `load_state_dict(strict=True)`. The init value of LayerScale
    leaves no trace; loading overwrites it, so the stand-in is DINOv2's."""
    registers = weights.get("register_tokens")
    has_layerscale = "blocks.0.ls1.gamma" in weights
    return {"layerscale_init": DINOV2_LAYERSCALE_INIT if has_layerscale else 0.0,
            "num_registers": 0 if registers is None else registers.shape[1],
            "ffn": "swiglu" if "blocks.0.mlp.w12.weight" in weights else "mlp",
            "mask_token": "mask_token" in weights}


def drop_path_rates(drop_path_rate: float, depth: int, uniform: bool) -> list[float]:
    """Each block's stochastic-depth rate: the same for all (DINOv2's uniform), or rising
    linearly from 0 to `drop_path_rate` (official DINO: deeper blocks are dropped more)."""
    if uniform:
        return [float(drop_path_rate)] * depth
    # Computed on the CPU so the model can also be built under a meta device.
    return torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()


def _check_options(layerscale_init: float, num_registers: int) -> None:
    if layerscale_init < 0:
        raise ValueError(f"layerscale_init {layerscale_init} is negative: use 0 (off) or a "
                         f"small positive value such as 1e-5")
    if not 0 <= num_registers <= MAX_REGISTERS:
        raise ValueError(f"num_registers {num_registers} is out of range: use 0 to "
                         f"{MAX_REGISTERS}")
