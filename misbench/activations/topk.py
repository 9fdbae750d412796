"""Streaming exact top/bottom-k per unit: all that `fair` selection needs, in O(units x K) memory."""

__all__ = ["TopK", "parse_keep", "merge_topk", "check_tie_order", "TOPK_SEED"]

import numpy as np

from ..errors import MisbenchError
from .order import tie_keys

TOPK_SEED = 0  # the tie-break keys of a top-k file are those of `score --seed 0`
BLOCK_UNITS = 128  # units ranked at a time: bounds the memory beyond the state
MERGE_MAX = 16  # up to this many new values per unit are merged into the kept order, more are sorted with it


def parse_keep(text: str | None) -> int | None:
    if not text:
        return None
    kind, _, k = text.partition(":")
    if kind != "topk" or not k.isdigit() or int(k) < 1:
        raise MisbenchError(f"--keep {text!r}: expected topk:K with K a positive integer, e.g. topk:400")
    return int(k)


def _select(values, rows, items, layer, units, k, descending):
    """The first k of each unit's (row of) candidates in (value, tie key) order. Sorting by value alone is
    that order wherever the first k + 1 values are all distinct; only units with a tie there (or a NaN)
    pay for the tie keys and the two-key sort (several times slower)."""
    signed = -values if descending else values
    order = np.argsort(signed, axis=1)
    head = np.take_along_axis(signed, order[:, :k + 1], axis=1)
    tied = np.flatnonzero(~(np.diff(head, axis=1) != 0).all(axis=1))  # equal neighbours, or NaN
    if len(tied):
        keys = tie_keys(TOPK_SEED, layer, np.asarray(units)[tied], items[tied])
        order[tied] = np.lexsort((keys, signed[tied]), axis=1)
    order = order[:, :k]
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
        values = np.asarray(values)
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        rows, items = np.asarray(rows, np.int64), np.asarray(items, np.int64)
        self.sum = self.sum + values.sum(axis=0, dtype=np.float64)
        for side, descending in (("top", True), ("bottom", False)):
            if getattr(self, side)[0].shape[1] < self.k:
                self._grow(side, descending, np.asarray(values, np.float64).T, rows, items)
            else:
                self._replace(side, descending, values, rows, items)

    def _grow(self, side, descending, values, rows, items) -> None:
        """Fewer than K kept yet: rank everything kept and new, block by block of units."""
        v, r, i = getattr(self, side)
        width = min(self.k, v.shape[1] + values.shape[1])
        out = (np.empty((self.units, width)), np.empty((self.units, width), np.int64),
               np.empty((self.units, width), np.int64))
        for start in range(0, self.units, BLOCK_UNITS):
            u = slice(start, start + BLOCK_UNITS)
            n = len(range(self.units)[u])
            cand_v = np.concatenate([v[u], values[u]], axis=1)
            cand_r = np.concatenate([r[u], np.broadcast_to(rows, (n, len(rows)))], axis=1)
            cand_i = np.concatenate([i[u], np.broadcast_to(items, (n, len(items)))], axis=1)
            out[0][u], out[1][u], out[2][u] = _select(cand_v, cand_r, cand_i, self.layer, np.arange(self.units)[u],
                                                      self.k, descending)
        setattr(self, side, out)

    def _replace(self, side, descending, values, rows, items) -> None:
        """K kept: only new values at least as extreme as the K-th kept can enter (equal ones by tie
        key), usually a handful; the kept arrays are updated in place, block by block of units, so
        memory stays at the state plus one batch."""
        kept = getattr(self, side)
        if not all(a.flags.writeable for a in kept):
            kept = tuple(np.array(a) for a in kept)
            setattr(self, side, kept)
        v, r, i = kept
        # which new values may enter, compared in the batch's own dtype and layout (no float64 copy of the
        # batch): exact, since the kept values came from that dtype (else in float64)
        bound = v[:, -1].astype(values.dtype)
        if not np.array_equal(bound, v[:, -1], equal_nan=True):
            values, bound = values.astype(np.float64), v[:, -1]
        enter = values >= bound if descending else values <= bound  # [B, U]; NaN never enters
        counts = enter.sum(axis=0)
        units = np.flatnonzero(counts)
        if not len(units):
            return
        counts = counts[units]
        entering = np.asarray(values[:, units], np.float64).T  # [units with entries, B]
        signed = entering if descending else -entering
        # units grouped by how many values may enter (ties can make a few units need many): each group
        # takes the c most extreme new values of its units, which include every one that can enter
        width = np.ceil(np.log2(counts)).astype(np.int64)
        for w in np.unique(width):
            at = np.flatnonzero(width == w)  # positions in `units`
            group = units[at]
            c = min(int(counts[at].max()), entering.shape[1])
            cols = np.argpartition(-signed[at], c - 1, axis=1)[:, :c] if c < entering.shape[1] else \
                np.broadcast_to(np.arange(c), (len(group), c))
            for start in range(0, len(group), BLOCK_UNITS):
                u, col = group[start:start + BLOCK_UNITS], cols[start:start + BLOCK_UNITS]
                new = np.take_along_axis(entering[at[start:start + BLOCK_UNITS]], col, axis=1), rows[col], items[col]
                if c <= MERGE_MAX:
                    v[u], r[u], i[u] = self._merge((v[u], r[u], i[u]), new, u, descending)
                    continue
                cand_v, cand_r, cand_i = (np.concatenate([old, add], axis=1) for old, add in zip((v[u], r[u], i[u]), new))
                v[u], r[u], i[u] = _select(cand_v, cand_r, cand_i, self.layer, u, self.k, descending)

    def _merge(self, kept, new, units, descending):
        """Merge a few new (value, row, item) per unit into the K kept, which are in rank order: each
        element's new position is the number of elements ranked before it (no sort of K)."""
        (kv, kr, ki), (nv, nr, ni) = kept, new
        kkey, nkey = (tie_keys(TOPK_SEED, self.layer, units, items) for items in (ki, ni))
        sk, sn = (kv, nv) if descending else (-kv, -nv)
        # before[u, j, k]: kept k ranks before new j (higher signed value, or equal and a smaller key)
        before = (sk[:, None, :] > sn[:, :, None]) | ((sk[:, None, :] == sn[:, :, None]) & (kkey[:, None, :] < nkey[:, :, None]))
        among = (sn[:, None, :] > sn[:, :, None]) | ((sn[:, None, :] == sn[:, :, None]) & (nkey[:, None, :] < nkey[:, :, None]))
        c, k = nv.shape[1], kv.shape[1]
        pos = np.concatenate([np.arange(k) + (c - before.sum(axis=1)), before.sum(axis=2) + among.sum(axis=2)], axis=1)
        out = []
        for old, add in ((kv, nv), (kr, nr), (ki, ni)):
            merged = np.empty((len(units), k + c), old.dtype)
            np.put_along_axis(merged, pos, np.concatenate([old, add], axis=1), axis=1)
            out.append(merged[:, :k])
        return out

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
        setattr(merged, side, _select(*cand, layer, np.arange(units), k, descending))
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
