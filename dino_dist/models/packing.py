"""Packing the tokens of two crop resolutions into one batch of equal rows.

Per resolution, the blocks see [crops x batch, tokens, dim] twice: small matrices for the
local crops, and two passes over every weight. Packed, each row holds one global image's
tokens followed by the tokens of `locals_per_row` local images:

    row r = [ global image r | local image r | local image R + r | local image 2R + r | ... ]

with R rows (one per global image; image rows crop-major, as `torch.cat(crops)` gives them).
With the DINO crop order, row r = crop g of image b holds local crops g, G + g, 2G + g, ... of
the same image b. Every row has the same length and the same crop boundaries, so one
[tokens, tokens] block-diagonal mask serves all rows and heads, there is no padding (each
linear layer does exactly the per-resolution arithmetic, in one matrix), and packing and
unpacking are reshapes, not gathers. The price is attention over the whole row, masked: on
a dense kernel it grows with the row length squared. (Rows of one global image, or of as many
local images as fit in that length, would cut that, but pad the local rows, need a mask per
row and a gather to unpack.)

A token's crop is named by the position of that crop's first token in the row
(`crop_starts`): equal values mean the same crop (the attention mask), and the value indexes
one random draw per crop (stochastic depth, vit.branch_scales).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def packs_evenly(global_images: int, local_images: int) -> bool:
    """Whether that many local images deal into the rows of that many global images in whole
    rounds (with equal crop batches: the local crops are a multiple of the global ones)."""
    return local_images % global_images == 0


@dataclass(frozen=True)
class PackedLayout:
    global_len: int  # tokens of one global image (CLS, registers if any, patches)
    local_len: int  # tokens of one local image
    locals_per_row: int

    @classmethod
    def of(cls, global_tokens: torch.Tensor, local_tokens: torch.Tensor) -> PackedLayout:
        """The layout of [global images, tokens, dim] and [local images, tokens, dim]."""
        rows = global_tokens.shape[0]
        if not packs_evenly(rows, local_tokens.shape[0]):
            raise ValueError(f"{local_tokens.shape[0]} local images do not deal evenly into "
                             f"{rows} rows of global images")
        return cls(global_tokens.shape[1], local_tokens.shape[1], local_tokens.shape[0] // rows)

    @property
    def row_len(self) -> int:
        return self.global_len + self.locals_per_row * self.local_len

    def pack(self, global_tokens: torch.Tensor, local_tokens: torch.Tensor) -> torch.Tensor:
        """[rows, row_len, dim]: local image i * rows + r goes to row r, slot i."""
        rows = global_tokens.shape[0]
        dealt = local_tokens.unflatten(0, (self.locals_per_row, rows)).transpose(0, 1)
        return torch.cat((global_tokens, dealt.flatten(1, 2)), dim=1)

    def cls_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """Each crop's first token, back in the unpacked order: global images, then local."""
        global_cls = packed[:, 0]
        local_cls = packed[:, self.global_len::self.local_len]  # [rows, locals_per_row, dim]
        return torch.cat((global_cls, local_cls.transpose(0, 1).flatten(0, 1)))

    def global_tokens(self, packed: torch.Tensor) -> torch.Tensor:
        """[rows, global_len, dim]: every token of each global image, in the unpacked order
        (row r holds global image r)."""
        return packed[:, :self.global_len]

    def crop_starts(self, device: torch.device) -> torch.Tensor:
        """[row_len] int64: for each token of a row, the position of its crop's first token."""
        position = torch.arange(self.row_len, device=device)
        local_start = self.global_len + (position - self.global_len).div(
            self.local_len, rounding_mode="floor") * self.local_len
        return torch.where(position < self.global_len, 0, local_start)
