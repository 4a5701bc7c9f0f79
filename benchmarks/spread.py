"""Medians with their spread, and ratios that say whether the spread swamps them.

A CPU timing on a shared machine moves by tens of percent between runs, so one number is not a
result: `summarize` keeps every sample with the median, min and max, and `compare` reports a
ratio of medians together with the range the samples allow (worst case to best case) and
`significant` = that range excludes 1. A speedup or overhead whose range includes 1 is "not
significant" and must not be quoted as a speedup.
"""

from __future__ import annotations

import statistics
from typing import Sequence


def summarize(samples: Sequence[float]) -> dict:
    """{"median", "min", "max", "n", "samples"} of repeated measurements (at least one)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("summarize: no samples")
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values),
            "samples": values}


def compare(base: Sequence[float], new: Sequence[float]) -> dict:
    """How many times `new` is the `base` quantity (e.g. time with a switch / time without):
    "ratio" of medians, "low" and "high" the smallest and largest ratio any pair of samples gives,
    "significant" when low > 1 or high < 1 (the ranges of the two do not overlap)."""
    return compare_summaries(summarize(base), summarize(new))


def compare_summaries(base: dict, new: dict) -> dict:
    """compare() from {"median", "min", "max"} of each side, for results that stored only those."""
    if base["min"] <= 0 or new["min"] <= 0:
        raise ValueError("compare: samples must be positive")
    low, high = new["min"] / base["max"], new["max"] / base["min"]
    return {"ratio": new["median"] / base["median"], "low": low, "high": high, "significant": low > 1 or high < 1}


def format_ratio(result: dict, digits: int = 1) -> str:
    """compare() as a ratio: '4.8x (4.5x-5.1x)', or '... , not significant'."""
    text = f"{result['ratio']:.{digits}f}x ({result['low']:.{digits}f}x-{result['high']:.{digits}f}x)"
    return text if result["significant"] else text + ", not significant"


def format_overhead(result: dict) -> str:
    """compare() as an overhead: '+36% (+20% to +52%)', or '... , not significant'."""
    text = f"{result['ratio'] - 1:+.0%} ({result['low'] - 1:+.0%} to {result['high'] - 1:+.0%})"
    return text if result["significant"] else text + ", not significant"
