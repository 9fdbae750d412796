"""Streaming exact top/bottom-k per unit: all that `fair` selection needs, in O(units x K) memory."""

__all__ = ["TopK", "parse_keep", "merge_topk", "check_tie_order", "TOPK_SEED"]

import numpy as np

from .errors import MisbenchError
from .mis import tie_keys

TOPK_SEED = 0  # the tie-break keys of a top-k file are those of `score --seed 0`


def parse_keep(text: str | None) -> int | None:
    if not text:
        return None
    kind, _, k = text.partition(":")
    if kind != "topk" or not k.isdigit() or int(k) < 1:
        raise MisbenchError(f"--keep {text!r}: expected topk:K with K a positive integer, e.g. topk:400")
    return int(k)


def _select(values, rows, items, keys, k, descending):
    order = np.lexsort((keys, -values if descending else values), axis=1)[:, :k]
    take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
    return take(values), take(rows), take(items)


class TopK:
    """The K highest and K lowest (value, file row, dataset index) of every unit seen so far.

    Order is (value, tie key of the image): exactly the order `score` ranks by, so the kept rows
    are the ranks 1..K of the full file on each side.
    """

    def __init__(self, layer: str, units: int, k: int, state: dict | None = None):
        self.layer, self.units, self.k = layer, units, k
        state = state or {}
        empty = {"value": np.empty((units, 0)), "index": np.empty((units, 0), np.int64),
                 "item": np.empty((units, 0), np.int64)}
        self.top, self.bottom = (tuple(state.get(f"{side}_{n}", e) for n, e in empty.items()) for side in ("top", "bottom"))
        self.sum = state.get("sum", np.zeros(units))

    def update(self, values: np.ndarray, rows: np.ndarray, items: np.ndarray) -> None:
        """values [B, U] (already in the stored dtype), their file rows and dataset indices [B]."""
        values = np.asarray(values, np.float64).T
        new_rows = np.broadcast_to(rows, values.shape)
        new_items = np.broadcast_to(items, values.shape)
        self.sum = self.sum + values.sum(axis=1)
        for side, descending in (("top", True), ("bottom", False)):
            v, r, i = getattr(self, side)
            cand_v = np.concatenate([v, values], axis=1)
            cand_r = np.concatenate([r, new_rows], axis=1)
            cand_i = np.concatenate([i, new_items], axis=1)
            keys = tie_keys(TOPK_SEED, self.layer, np.arange(self.units), cand_i)
            setattr(self, side, _select(cand_v, cand_r, cand_i, keys, self.k, descending))

    def state(self) -> dict:
        out = {"sum": self.sum}
        for side in ("top", "bottom"):
            for name, array in zip(("value", "index", "item"), getattr(self, side)):
                out[f"{side}_{name}"] = array
        return out


def merge_topk(layer: str, parts: list[dict], k: int) -> dict:
    """Exact top/bottom-k of the union of several parts' states (their rows already global)."""
    units = parts[0]["top_value"].shape[0]
    merged = TopK(layer, units, k)
    for side, descending in (("top", True), ("bottom", False)):
        cand = [np.concatenate([p[f"{side}_{n}"] for p in parts], axis=1) for n in ("value", "index", "item")]
        keys = tie_keys(TOPK_SEED, layer, np.arange(units), cand[2])
        setattr(merged, side, _select(*cand, keys, k, descending))
    merged.sum = sum(p["sum"] for p in parts)
    return merged.state()


def check_tie_order(top: np.ndarray, bottom: np.ndarray, needed: int, n_rows: int, tie_seed: int, seed: int,
                    layer: str, path) -> None:
    """Refuse to score a top/bottom-k layer with another seed than its tie seed when that could rank
    differently from the full file.

    The kept rows are the first K under `tie_seed`'s tie keys. Another seed orders tied activations
    otherwise; its first `needed` ranks are still among the kept rows (so scoring is identical to the full
    file) unless the activation at rank `needed` equals the last kept one: then rows outside the file may
    tie with it. top/bottom: kept values [U, K] in rank order."""
    k = top.shape[1]
    if seed == tie_seed or k >= n_rows or needed > k:
        return
    for side, values in (("top", top), ("bottom", bottom)):
        tied = np.flatnonzero(values[:, needed - 1] == values[:, k - 1])
        if len(tied):
            raise MisbenchError(
                f"{path}: layer {layer!r} unit {int(tied[0])} keeps its {side} {k} rows chosen with tie seed "
                f"{tie_seed}, and its activation at rank {needed} ties with the last kept row, so --seed {seed} "
                f"could rank rows outside the file: score with --seed {tie_seed}, or extract with a larger "
                f"--keep topk:K (or the full activations)")
