"""Statistics for comparisons over seeds: Student-t intervals, paired and Welch tests.

    mean_interval(values)        mean with its 95% t-interval over seeds
    paired_difference(a, b)      mean of a_i - b_i (same seed, same data order and init),
                                 its 95% t-interval and the paired t-test's p-value
    welch_difference(a, b)       the same for unpaired samples (Welch's t-test)
    verdict(difference)          "better", "worse" or "not distinguishable at these seeds"
    seeds_needed(sd, delta)      seeds per config for a paired test to see delta

Lower is better (the metrics are losses). The t-distribution comes from the
regularized incomplete beta function (a continued fraction, Numerical Recipes'
betacf), so that comparisons need no scipy; tests/test_stats.py checks it
against scipy.stats.
"""

import math

LEVEL = 0.95  # every interval's confidence level
ALPHA = 1 - LEVEL  # the tests' significance level


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), for x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                     + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (q in (0.5, 1)), by bisection on the CDF."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > 2 * (1 - q):
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_two_sided_p(mid, df) > 2 * (1 - q):
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _mean_sd(values) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else math.nan


def mean_interval(values) -> dict:
    """{"mean", "lo", "hi", "n", "sd"}: the 95% t-interval over the values (seeds);
    with one value no interval exists (lo and hi are None)."""
    values = [float(v) for v in values]
    mean, sd = _mean_sd(values)
    n = len(values)
    if n < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": n, "sd": None}
    half = t_quantile(1 - ALPHA / 2, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "sd": sd}


def _test(diff: float, se: float, df: float, kind: str, n: int) -> dict:
    if not se > 0:  # identical differences: no spread to test against
        p = 1.0 if diff == 0 else 0.0
        return {"diff": diff, "lo": diff, "hi": diff, "p": p, "df": df, "test": kind, "n": n}
    half = t_quantile(1 - ALPHA / 2, df) * se
    return {"diff": diff, "lo": diff - half, "hi": diff + half,
            "p": t_two_sided_p(diff / se, df), "df": df, "test": kind, "n": n}


def paired_difference(a, b) -> dict:
    """a - b seed by seed (a[i] and b[i] share their seed): the mean difference, its 95%
    t-interval and the paired t-test's two-sided p-value; None values for one pair."""
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    mean, sd = _mean_sd(diffs)
    if len(diffs) < 2:
        return {"diff": mean, "lo": None, "hi": None, "p": None, "df": None,
                "test": "paired t", "n": len(diffs)}
    return _test(mean, sd / math.sqrt(len(diffs)), len(diffs) - 1, "paired t", len(diffs))


def welch_difference(a, b) -> dict:
    """mean(a) - mean(b) of unpaired samples: Welch's t-interval and two-sided p-value
    (Welch-Satterthwaite degrees of freedom); None values if a side has one value."""
    a, b = [float(x) for x in a], [float(x) for x in b]
    (ma, sa), (mb, sb) = _mean_sd(a), _mean_sd(b)
    if len(a) < 2 or len(b) < 2:
        return {"diff": ma - mb, "lo": None, "hi": None, "p": None, "df": None,
                "test": "Welch t", "n": min(len(a), len(b))}
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1)) if se else 1.0
    return _test(ma - mb, se, df, "Welch t", min(len(a), len(b)))


def verdict(difference: dict) -> str:
    """For a difference a - b of losses: "better" (a lower, p < 0.05), "worse" (a
    higher, p < 0.05), else "not distinguishable at these seeds"."""
    p = difference["p"]
    if p is None or p >= ALPHA:
        return "not distinguishable at these seeds"
    return "better" if difference["diff"] < 0 else "worse"


def seeds_needed(sd: float, delta: float, power: float = 0.8) -> int:
    """Seeds per config for a two-sided paired t-test at 5% to detect a true difference
    delta with the given power, when seed-to-seed differences have standard deviation
    sd: the smallest n with n >= ((t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / delta)^2."""
    for n in range(2, 100_000):
        need = ((t_quantile(1 - ALPHA / 2, n - 1) + t_quantile(power, n - 1)) * sd / delta) ** 2
        if n >= need:
            return n
    return 100_000
