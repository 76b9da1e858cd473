"""The seed comparison of the yardstick: mean(b) - mean(a) over seeds with a Welch 95% interval."""

import math

import pytest

from farense.accuracy import seed_difference, t975


def test_welch_interval_matches_a_hand_computation() -> None:
    # Variances 1 and 1, three seeds a side: se = sqrt(2/3), Welch df = 4, t(0.975, 4) = 2.776.
    d = seed_difference([1, 2, 3], [4, 5, 6])
    assert d is not None
    assert d["diff"] == pytest.approx(3.0)
    assert d["df"] == pytest.approx(4.0)
    assert d["high"] - d["diff"] == pytest.approx(2.776 * math.sqrt(2 / 3), rel=1e-6)
    assert d["low"] > 0  # B beats A: the interval excludes 0


def test_unequal_spreads_use_welch_degrees_of_freedom() -> None:
    a, b = [60, 62, 58, 61], [50, 80, 65, 70, 55, 75]
    d = seed_difference(a, b)
    va, vb = 2.9166666666666665 / 4, 134.16666666666666 / 6  # sample variances (n - 1) over n
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 5)
    assert d["df"] == pytest.approx(df)
    assert d["high"] - d["diff"] == pytest.approx(t975(df) * math.sqrt(va + vb))
    assert d["low"] < 0 < d["high"]  # a wide spread on one side: no claim either way


def test_fewer_than_two_seeds_gives_no_interval() -> None:
    assert seed_difference([70.0], [80.0, 82.0]) is None
    assert seed_difference([70.0, 71.0], []) is None


def test_identical_seeds_give_a_zero_width_interval() -> None:
    d = seed_difference([70, 70], [75, 75])
    assert (d["low"], d["diff"], d["high"]) == (5, 5, 5)


def test_t_quantiles_fall_towards_the_normal() -> None:
    assert t975(1) == pytest.approx(12.706)
    assert t975(4.9) == pytest.approx(2.776)  # rounded down: conservative
    assert t975(0.3) == t975(1)
    assert t975(30) > t975(45) > t975(100) > t975(500) > t975(math.inf) == pytest.approx(1.96, abs=1e-3)
