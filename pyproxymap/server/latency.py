"""Fixed-bucket latency histograms, cheap enough for every request.

A histogram is a plain list of ints: one count per bucket of ``BOUNDS`` (a
request counts in the first bucket whose bound is at least its time, as
Prometheus' ``le``), one for slower than the last bound, then the sum of all
times in nanoseconds. The service adds to it with one ``bisect``; status and
metrics read it when asked.
"""

from __future__ import annotations

#: Upper bounds of the buckets, in seconds (Prometheus ``le`` values).
BOUNDS = (
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
BOUNDS_NS = tuple(round(b * 1e9) for b in BOUNDS)

Histogram = list[int]


def new_histogram() -> Histogram:
    return [0] * (len(BOUNDS) + 2)


def count(histogram: Histogram) -> int:
    return sum(histogram[:-1])


def total_seconds(histogram: Histogram) -> float:
    return histogram[-1] / 1e9


def quantile(histogram: Histogram, q: float) -> float:
    """The ``q`` quantile in seconds, interpolated within its bucket as Prometheus'
    ``histogram_quantile`` does (the last bound when it falls above it); 0 when empty."""
    total = count(histogram)
    if not total:
        return 0.0
    rank = q * total
    seen = 0
    for i, bound in enumerate(BOUNDS):
        n = histogram[i]
        if n and seen + n >= rank:
            lower = BOUNDS[i - 1] if i else 0.0
            return lower + (bound - lower) * (rank - seen) / n
        seen += n
    return BOUNDS[-1]
