"""pass@k against the binomial definition of Chen et al. 2021 eq. 1 and hand-computed values."""

from math import comb

import pytest

from r1kit.errors import ConfigError
from r1kit.eval.passk import mean_pass_at_k, pass_at_1, pass_at_k


def test_matches_binomial_definition_on_a_grid():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_hand_computed_values():
    assert pass_at_k(2, 1, 1) == pytest.approx(0.5)
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # C(7,5)=21, C(10,5)=252
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(3, 3, 2) == 1.0
    assert pass_at_k(4, 2, 3) == 1.0  # only 2 wrong samples: any 3 contain a correct one


def test_large_n_is_stable():
    # C(1000, 500) overflows a float; the product form stays finite and matches 1 - (1 - c/n)^k roughly.
    value = pass_at_k(1000, 10, 500)
    assert 0.999 < value <= 1.0
    assert pass_at_k(1000, 1, 1) == pytest.approx(1 / 1000)


def test_pass_at_1_is_mean_over_samples_then_problems():
    correct = [[True, False, False, True], [False] * 4, [True] * 4]
    assert pass_at_1(correct) == pytest.approx((0.5 + 0.0 + 1.0) / 3)
    assert mean_pass_at_k(correct, 2) == pytest.approx((1 - comb(2, 2) / comb(4, 2) + 0.0 + 1.0) / 3)


@pytest.mark.parametrize("n,c,k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_bad_counts_raise(n, c, k):
    with pytest.raises(ConfigError):
        pass_at_k(n, c, k)


def test_no_problems_raise():
    with pytest.raises(ConfigError, match="zero problems"):
        pass_at_1([])
