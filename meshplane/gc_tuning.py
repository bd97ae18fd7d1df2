"""The garbage collector's settings for a long-lived meshplane process (`serve`, the policy worker)."""

from __future__ import annotations

import gc

GC_THRESHOLDS = (50_000, 50, 100)
"""The collector's thresholds once serving (Python's are 700, 10, 10): see tune_gc."""


def tune_gc() -> None:
    """Once started: what start-up built (the catalog, the policy, imported modules) is moved out of
    the collector's sight (gc.freeze), and collections run less often. A full collection walked
    every object of every stream and view, 120 ms at 1,000 proxies, stalling every push under way:
    it was most of the slowest pushes' time (docs/benchmarks.md). In the policy worker, validating
    5,000 routes took 4.6 s so, 6.4 s with Python's thresholds."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
