"""Comparing float results that were summed in a different order.

Two correct computations that add the same terms in another order (a packed batch, a fused
kernel, another CPU's vector width) differ by rounding that scales with the size of the terms,
not with the element: a gradient entry near zero carries the rounding of its large
neighbours' sums. An element-wise rtol/atol therefore fails on small elements for no fault,
and differently on each machine; the honest yardstick is the tensor's own largest value.
"""
from __future__ import annotations

import torch


def difference_at_scale(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest |actual - expected| over largest |expected|: NaN or inf where one is not finite."""
    if expected.numel() == 0:
        return 0.0
    expected = expected.detach().double()
    diff = (actual.detach().double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    if diff == 0:
        return 0.0
    return diff / scale if scale > 0 else float("inf")


def assert_close_at_scale(actual: torch.Tensor, expected: torch.Tensor, tol: float,
                          name: str = "") -> None:
    """Every element within `tol` times the largest |expected| element (NaN never passes)."""
    label = f"{name}: " if name else ""
    assert actual.shape == expected.shape, f"{label}shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{label}dtype {actual.dtype} != {expected.dtype}"
    difference = difference_at_scale(actual, expected)
    assert difference <= tol, (f"{label}largest difference is {difference:.3g} of the largest "
                               f"value, more than {tol:g}")
