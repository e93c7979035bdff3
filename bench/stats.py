"""Merging the agents' latency histograms and percentiles."""

from __future__ import annotations

from typing import Any


def bucket_value(i: int) -> float:
    """The middle of histogram bucket ``i`` in µs (inverse of ``agent.Hist.add``)."""
    if i < 128:
        return float(i)
    s = (i - 64) // 64 - 1
    m = (i - 64) % 64 + 64
    return (m + 0.5) * (1 << s)


def merge(hists: list[dict[str, Any]]) -> dict[str, Any]:
    buckets: dict[int, int] = {}
    top = 0
    for h in hists:
        for i, c in h["buckets"].items():
            buckets[int(i)] = buckets.get(int(i), 0) + c
        top = max(top, h["max"])
    return {"buckets": buckets, "max": top}


def percentile(hist: dict[str, Any], q: float) -> float | None:
    """The q-quantile (0..1) in µs, or None for an empty histogram."""
    total = sum(hist["buckets"].values())
    if not total:
        return None
    want = q * total
    seen = 0
    for i in sorted(hist["buckets"]):
        seen += hist["buckets"][i]
        if seen >= want:
            return min(bucket_value(i), float(hist["max"]) if hist["max"] else bucket_value(i))
    return float(hist["max"])


def exact(values: list[int], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))])


def ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 2)
