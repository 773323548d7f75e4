"""Statistics for tests: a chi-square goodness-of-fit p-value without scipy.

Bins whose expected count is below 5 are pooled (smallest first) until every bin has at least 5; a
sample in a bin of probability 0 fails outright. The p-value is the regularized upper incomplete
gamma function, computed with a series / continued fraction (checked against closed forms in
tests/spec/test_rejection_sampler.py).
"""

from __future__ import annotations

import math


def chi2_sf(stat: float, dof: int) -> float:
    """P(X >= stat) for X ~ chi-square(dof): the regularized upper gamma Q(dof / 2, stat / 2)."""
    a, x = dof / 2.0, stat / 2.0
    if x <= 0.0:
        return 1.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)  # log(e^-x x^a / Gamma(a))
    if x < a + 1.0:  # series: P(a, x) = e^-x x^a / Gamma(a + 1) * sum_n x^n / ((a + 1)..(a + n))
        term = total = 1.0 / a
        n = 0
        while abs(term) > 1e-16 * abs(total):
            n += 1
            term *= x / (a + n)
            total += term
        return max(0.0, 1.0 - math.exp(log_prefix) * total)
    # Continued fraction for Gamma(a, x) e^x x^-a = 1 / (b0 - 1(1-a) / (b1 - 2(2-a) / (b2 - ...))),
    # b_n = x + 2n + 1 - a, evaluated with the modified Lentz method.
    tiny = 1e-300
    f = x + 1.0 - a
    c, d = f, 0.0
    for n in range(1, 10_000):
        an, bn = -n * (n - a), x + 2.0 * n + 1.0 - a
        d = bn + an * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = bn + an / (c if abs(c) > tiny else tiny)
        f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_prefix) / f


def chi_square_pvalue(groups: list[tuple[list[int], list[float]]]) -> float:
    """Goodness of fit of observed counts to probabilities, summed over independent groups (each
    with its own total): returns the p-value. Pools small bins as described in the module docstring."""
    stat, dof = 0.0, 0
    for observed, probs in groups:
        total = sum(observed)
        bins = []
        for o, p in zip(observed, probs):
            if p <= 0.0:
                assert o == 0, f"{o} samples in a bin of probability 0"
            else:
                bins.append((total * p, o))
        bins.sort()
        while len(bins) > 1 and bins[0][0] < 5.0:  # pool the smallest bins until every one has >= 5
            (e0, o0), (e1, o1) = bins[0], bins[1]
            bins = sorted([(e0 + e1, o0 + o1)] + bins[2:])
        stat += sum((o - e) ** 2 / e for e, o in bins)
        dof += len(bins) - 1
    return chi2_sf(stat, dof) if dof > 0 else 1.0
