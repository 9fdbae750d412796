"""Per-unit mis_confidence intervals: the closed form over all units at once (summaries.confidence_intervals)
against the per-unit percentile bootstrap misbench used before (scipy.stats.bootstrap, 1000 resamples), on
the same generated task values, in this process. Prints seconds per 1,000 units and the speed-up.

    .venv/bin/python benchmarks/conf_intervals.py [--units 8280] [--baseline-units 300]
"""

import argparse

import numpy as np

from _common import Timer
from misbench.scoring.summaries import bootstrap_mean_ci, confidence_intervals


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--units", type=int, default=8280, help="units (GoogLeNet: 8,280)")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--baseline-units", type=int, default=300, help="units timed with the per-unit bootstrap")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    z = rng.normal(rng.normal(1.5, 1.0, (args.units, 1)), 1.0, (args.units, args.tasks))
    conf = 1 / (1 + np.exp(-z))
    with Timer() as closed:
        lo, hi = confidence_intervals(conf)
    with Timer() as boot:
        for row in conf[:args.baseline_units]:
            bootstrap_mean_ci(row, np.random.default_rng(1), 1000)
    per_closed = closed.seconds / args.units * 1000
    per_boot = boot.seconds / args.baseline_units * 1000
    again = confidence_intervals(conf)
    assert np.array_equal(again[0], lo) and np.array_equal(again[1], hi)  # no random draws: identical
    print(f"closed form, {args.units} units at once: {per_closed:.4f} s per 1,000 units")
    print(f"per-unit bootstrap (1000 resamples), {args.baseline_units} units: {per_boot:.3f} s per 1,000 units")
    print(f"speed-up: {per_boot / per_closed:.0f}x; repeated call identical: yes")


if __name__ == "__main__":
    main()
