"""The scale-relative comparison: rounding of reordered sums passes, a real change does not."""
from __future__ import annotations

import pytest
import torch

from tests.tolerance import assert_close_at_scale


def test_reordered_sums_pass_where_an_element_wise_check_fails():
    """The small element sums large terms: one order loses the 1 to rounding, the other keeps
    it (float32 steps by 8 near 1e8; exact IEEE arithmetic, the same on every CPU)."""
    big, one = torch.tensor([1e8]), torch.tensor([1.0])
    one_order = torch.cat((big + one, (big + one) - big))
    other_order = torch.cat((one + big, (big - big) + one))
    assert one_order[1] == 0 and other_order[1] == 1
    with pytest.raises(AssertionError):
        torch.testing.assert_close(one_order, other_order, atol=1e-5, rtol=1e-5)
    assert_close_at_scale(one_order, other_order, 1e-5)


def test_a_change_above_the_tolerance_of_the_scale_fails():
    expected = torch.linspace(-2.0, 2.0, 101)
    changed = expected.clone()
    changed[50] += 3e-5 * 2.0  # three times the allowed 1e-5 of the largest value
    with pytest.raises(AssertionError, match="w: largest difference"):
        assert_close_at_scale(changed, expected, 1e-5, name="w")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_never_pass(bad):
    expected = torch.ones(3)
    with pytest.raises(AssertionError):
        assert_close_at_scale(torch.tensor([1.0, bad, 1.0]), expected, 1e-5)


def test_shapes_and_dtypes_must_agree():
    with pytest.raises(AssertionError, match="shape"):
        assert_close_at_scale(torch.ones(2, 3), torch.ones(3, 2), 1e-5)
    with pytest.raises(AssertionError, match="dtype"):
        assert_close_at_scale(torch.ones(3, dtype=torch.float64), torch.ones(3), 1e-5)
