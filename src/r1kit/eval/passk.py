"""pass@k: the unbiased estimator of Chen et al. 2021 (§2.1, eq. 1) and pass@1 as the mean over k
samples (DeepSeek-R1 §3.1).

For one problem with ``n`` samples of which ``c`` are correct, the chance that at least one of
``k`` samples drawn without replacement is correct is ``1 - C(n-c, k) / C(n, k)``. It is computed
as ``1 - prod_{i=n-c+1..n} (1 - k/i)``, the numerically stable product of the paper's Figure 3,
which never forms the (huge) binomial coefficients.
"""

from __future__ import annotations

from typing import Sequence

from r1kit.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from ``n`` samples with ``c`` correct.

    Raises ConfigError unless ``0 <= c <= n`` and ``1 <= k <= n``."""
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n correct samples, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ConfigError(f"pass@{k} needs 1 <= k <= n={n} samples per problem; sample more or lower k")
    if n - c < k:
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """pass@k averaged over problems; ``correct[p][j]``: sample ``j`` of problem ``p`` is correct.

    Raises ConfigError for no problems or a problem with fewer than ``k`` samples."""
    if not correct:
        raise ConfigError("pass@k over zero problems is undefined")
    return sum(pass_at_k(len(samples), sum(map(bool, samples)), k) for samples in correct) / len(correct)


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """pass@1 as the mean over the k samples of each problem, averaged over problems (R1's
    evaluation with k samples at temperature > 0); equals ``mean_pass_at_k(correct, 1)``."""
    return mean_pass_at_k(correct, 1)
