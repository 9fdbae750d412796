"""`extract --keep topk:K` at ImageNet-train scale (issue 14), on generated activations.

1.28 M rows of 7,280 units (GoogLeNet's conv units) stream through the top/bottom-K state in
extraction-sized batches. Reported: peak traced memory against the state (units x K x 2 sides x
24 B: value, file row and dataset index) plus one batch (target within 1.5x), rows per second
against a plain numpy baseline over the same batches (argpartition of kept + new, no tie keys, no
rows kept; the state's time includes ranking its candidates once at the end, as extraction does at
each commit), in wall-clock and CPU seconds (the CPU ratio is the steadier one on a loaded machine), and equality of the kept rows with a brute-force top-k over all rows (every unit at a
reduced size; at full size a sample of units, whose full columns are kept aside).

    python benchmarks/topk_scale.py [--rows 1281167] [--units 7280] [--k 400] [--batch 256]
        [--baseline-every N] [--quick]
"""

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misbench.scoring.mis import tie_keys  # noqa: E402
from misbench.activations.topk import TOPK_SEED, TopK  # noqa: E402

LAYER = "inception5b.branch4.1.bn"


def batches(rows: int, units: int, batch: int, seed: int = 0, wanted=lambda b: True):
    """(first row, values) of every batch; batches not `wanted` are yielded as (first row, None) ungenerated."""
    for b, start in enumerate(range(0, rows, batch)):
        if not wanted(b):
            yield start, None
            continue
        n = min(batch, rows - start)
        values = np.random.default_rng([seed, b]).standard_normal((n, units), dtype=np.float32)
        values[:, 0] = np.round(values[:, 0])  # one unit of heavy ties: the tie keys decide
        yield start, values


def stream_topk(args, sample):
    """The state after all batches, the sampled units' full columns, and the seconds in update()."""
    state = TopK(LAYER, args.units, args.k)
    columns = np.empty((args.rows, len(sample)), np.float32)
    seconds, cpu = 0.0, 0.0
    for start, values in batches(args.rows, args.units, args.batch):
        rows = np.arange(start, start + len(values))
        t0, c0 = time.perf_counter(), time.process_time()
        state.update(values, rows, rows)  # dataset index = file row here
        seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
        columns[start:start + len(values)] = values[:, sample]
    t0, c0 = time.perf_counter(), time.process_time()
    ranked = state.state()  # the ranking extraction does at each commit (once a minute): timed once
    return ranked, columns, seconds + time.perf_counter() - t0, cpu + time.process_time() - c0


def stream_baseline(args):
    """Returns the seconds it would take over all batches (measured on every --baseline-every-th)."""
    top = np.empty((args.units, 0), np.float32)
    bottom = np.empty((args.units, 0), np.float32)
    seconds, cpu, full_from = 0.0, 0.0, None  # full_from: K values kept
    # once K values are kept only every --baseline-every-th batch is timed, so only those are generated
    timed = lambda b: full_from is None or b % args.baseline_every == 0  # noqa: E731
    for b, (_start, values) in enumerate(batches(args.rows, args.units, args.batch, wanted=timed)):
        if values is None:
            continue
        if b % args.baseline_every and top.shape[1] == args.k:
            continue
        t0, c0 = time.perf_counter(), time.process_time()
        t = np.concatenate([top, values.T], axis=1)
        low = np.concatenate([bottom, values.T], axis=1)
        k = min(args.k, t.shape[1])
        top = -np.partition(-t, k - 1, axis=1)[:, :k]
        bottom = np.partition(low, k - 1, axis=1)[:, :k]
        weight = 1 if top.shape[1] < args.k else args.baseline_every
        seconds, cpu = seconds + (time.perf_counter() - t0) * weight, cpu + (time.process_time() - c0) * weight
        if full_from is None and top.shape[1] == args.k:
            full_from = True
    return seconds, cpu


def brute_force(columns: np.ndarray, units: np.ndarray, k: int):
    """Ranks 1..K of every unit over all rows at once: (value desc|asc, tie key) as score ranks."""
    rows = np.arange(len(columns))
    out = []
    for j, unit in enumerate(units):
        keys = tie_keys(TOPK_SEED, LAYER, int(unit), rows)
        v = columns[:, j].astype(np.float64)
        out.append((np.lexsort((keys, -v))[:k], np.lexsort((keys, v))[:k]))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_281_167)
    parser.add_argument("--units", type=int, default=7280)
    parser.add_argument("--k", type=int, default=400)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sample", type=int, default=16, help="units checked against brute force at full size")
    parser.add_argument("--baseline-every", type=int, default=1, help="time the baseline on every N-th batch only")
    parser.add_argument("--quick", action="store_true", help="the test suite's size: 3,000 rows x 2,000 units")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.units = 3_000, 2_000
    every = args.rows * args.units <= 50_000_000  # small enough to check every unit
    sample = np.arange(args.units) if every else \
        np.unique(np.r_[0, np.random.default_rng(1).choice(args.units, args.sample - 1, replace=False)])

    tracemalloc.start()
    s, columns, seconds, cpu = stream_topk(args, sample)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    kept_columns = columns.nbytes  # the brute-force check's copy, not part of the state
    tracemalloc.start()  # the same overhead for both timings
    base_seconds, base_cpu = stream_baseline(args)
    tracemalloc.stop()

    state_bytes = args.units * args.k * 2 * 24
    batch_bytes = args.batch * args.units * (4 + 8)  # the batch and its float64 copy
    peak_state = peak - kept_columns
    print(f"{args.rows} rows x {args.units} units, --keep topk:{args.k}, batches of {args.batch}")
    print(f"peak traced memory {peak_state / 2**20:.0f} MiB (without the {kept_columns / 2**20:.0f} MiB of columns kept "
          f"for the check) vs state {state_bytes / 2**20:.0f} MiB + one batch {batch_bytes / 2**20:.0f} MiB: "
          f"{peak_state / (state_bytes + batch_bytes):.2f}x (target <= 1.5x)")
    sampled = "" if args.baseline_every == 1 else f", timed on 1 batch in {args.baseline_every} once full"
    print(f"top-k state: {args.rows / seconds:,.0f} rows/s ({seconds:.1f} s in updates); numpy argpartition baseline"
          f"{sampled}: {args.rows / base_seconds:,.0f} rows/s ({base_seconds:.1f} s); "
          f"top-k speed / baseline speed = {base_seconds / seconds:.2f} (target >= 1); in CPU seconds "
          f"{cpu:.1f} vs {base_cpu:.1f}: {base_cpu / cpu:.2f}")
    expected = brute_force(columns, sample, args.k)
    same = all(np.array_equal(s["top_index"][u], top) and np.array_equal(s["bottom_index"][u], bottom)
               for u, (top, bottom) in zip(sample, expected))
    print(f"kept rows equal brute-force top-k over all rows: {same} ({len(sample)} units checked"
          f"{'' if every else ', a sample incl. the tie-heavy unit 0'})")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
