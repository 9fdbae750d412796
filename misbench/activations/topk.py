"""Streaming exact top/bottom-k per unit: all that `fair` selection needs, in O(units x K) memory."""

__all__ = ["TopK", "parse_keep", "merge_topk", "check_tie_order", "TOPK_SEED"]

import numpy as np

from ..errors import MisbenchError
from .order import tie_keys

TOPK_SEED = 0  # the tie-break keys of a top-k file are those of `score --seed 0`
BLOCK_UNITS = 128  # units ranked or compacted at a time: bounds the memory beyond the state
SCAN_ENTRIES = 1 << 16  # new values placed at a time (bounds the memory of their positions)
ROOM = 4  # each unit's pool holds K + K / ROOM values (at least 16 more): entries between compactions


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


def _keep(signed, items, layer, units, k):
    """Positions of the first k of each row of `signed` (higher first, ties by tie key), in no order:
    a partition by value; only rows where values equal to the k-th fall on both sides of it pay for
    the tie keys (and a sort of their row). Rows with fewer than k finite values keep those first."""
    if signed.shape[1] <= k:
        return np.broadcast_to(np.arange(signed.shape[1]), signed.shape)
    pos = np.argpartition(-signed, k - 1, axis=1)[:, :k]
    kept = np.take_along_axis(signed, pos, axis=1)
    kth = kept.min(axis=1)
    tied = np.flatnonzero(((signed == kth[:, None]).sum(1) > (kept == kth[:, None]).sum(1)) & np.isfinite(kth))
    if len(tied):
        keys = tie_keys(TOPK_SEED, layer, np.asarray(units)[tied], items[tied])
        pos[tied] = np.lexsort((keys, -signed[tied]), axis=1)[:, :k]
    short = np.flatnonzero(~np.isfinite(kth))  # fewer than k values so far: the empty slots go last
    if len(short):
        pos[short] = np.take_along_axis(pos[short], np.argsort(~np.isfinite(
            np.take_along_axis(signed[short], pos[short], axis=1)), axis=1, kind="stable"), axis=1)
    return pos


class _Side:
    """One side's kept candidates per unit, unordered: a pool of K + room slots per unit holding every
    value seen that is at least as extreme as the unit's bound (the K-th kept when last compacted,
    ties included: they may rank ahead by tie key). Empty slots hold -inf (top) or +inf (bottom)."""

    def __init__(self, layer, units, k, descending, kept=None):
        self.layer, self.k, self.descending = layer, k, descending
        self.width = k + max(16, k // ROOM)
        self.empty = -np.inf if descending else np.inf
        self.value = np.full((units, self.width), self.empty)
        self.row = np.zeros((units, self.width), np.int64)
        self.item = np.zeros((units, self.width), np.int64)
        self.fill = np.zeros(units, np.int64)
        self.bound = np.full(units, self.empty)  # values beyond it cannot enter
        if kept is not None and kept[0].shape[1]:
            w = kept[0].shape[1]
            self.value[:, :w], self.row[:, :w], self.item[:, :w] = kept
            self.fill[:] = w
            if w >= k:
                self.bound[:] = self.value[:, k - 1]

    def signed(self, values):
        return values if self.descending else -values

    def add(self, values, rows, items) -> None:
        """values [B, U] (the batch's dtype): those at least as extreme as each unit's bound enter its pool;
        a unit whose pool would overflow is compacted to its K first with the new ones."""
        cast = self.bound.astype(values.dtype)  # compared in the batch's own dtype (exact: the bounds came from it)
        if not np.array_equal(cast, self.bound):
            values, cast = values.astype(np.float64), self.bound
        enter = (values >= cast) if self.descending else (values <= cast)  # [B, U]; NaN never enters
        total = np.count_nonzero(enter)
        if total <= SCAN_ENTRIES:  # the usual case once K are kept: a few new values per unit at most
            at, unit = np.divmod(np.flatnonzero(enter), enter.shape[1])
            order = np.argsort(unit, kind="stable")  # by unit, then batch position
            if total:
                self._insert(unit[order], np.asarray(values[at[order], unit[order]], np.float64), rows[at[order]],
                             items[at[order]])
            return
        # units in blocks of about SCAN_ENTRIES new values (bounds the positions' memory while many enter)
        ends = np.cumsum(np.count_nonzero(enter, axis=0))
        cuts = np.unique(np.r_[0, np.searchsorted(ends, np.arange(SCAN_ENTRIES, ends[-1], SCAN_ENTRIES)), len(ends)])
        for start, stop in zip(cuts[:-1], cuts[1:]):
            unit, at = np.nonzero(enter[:, start:stop].T)  # by unit, then batch position
            if len(unit):
                self._insert(unit + start, np.asarray(values[at, unit + start], np.float64), rows[at], items[at])

    def _insert(self, unit, value, row, item) -> None:
        counts = np.bincount(unit, minlength=len(self.fill))
        first = np.cumsum(counts) - counts
        rank = np.arange(len(unit)) - first[unit]  # position among the unit's new values
        over = self.fill + counts > self.width
        fits = ~over[unit]
        u, slot = unit[fits], self.fill[unit[fits]] + rank[fits]
        self.value[u, slot], self.row[u, slot], self.item[u, slot] = value[fits], row[fits], item[fits]
        self.fill += np.where(over, 0, counts)
        full = np.flatnonzero(over)
        for start in range(0, len(full), BLOCK_UNITS):
            block = full[start:start + BLOCK_UNITS]
            mine = np.flatnonzero(np.isin(unit, block))  # their new values, grouped by unit
            local = np.searchsorted(block, unit[mine])
            new = np.full((len(block), int(counts[block].max())), self.empty)
            new_row, new_item = np.zeros(new.shape, np.int64), np.zeros(new.shape, np.int64)
            new[local, rank[mine]], new_row[local, rank[mine]], new_item[local, rank[mine]] = value[mine], row[mine], \
                item[mine]
            self._compact(block, np.concatenate([self.value[block], new], axis=1),
                          np.concatenate([self.row[block], new_row], axis=1),
                          np.concatenate([self.item[block], new_item], axis=1), self.fill[block] + counts[block])

    def _compact(self, units, value, row, item, valid) -> None:
        """Keep the K first of each unit's candidates in its pool's first slots; the K-th becomes its bound."""
        k = min(self.k, value.shape[1])
        pos = _keep(self.signed(value), item, self.layer, units, k)
        take = lambda a: np.take_along_axis(a, pos, axis=1)  # noqa: E731
        self.value[units, :k], self.row[units, :k], self.item[units, :k] = take(value), take(row), take(item)
        self.value[units, k:] = self.empty
        self.fill[units] = np.minimum(valid, self.k)
        if k == self.k:  # the bound: the least extreme kept value
            least = self.signed(self.signed(self.value[units, :k]).min(axis=1))
            self.bound[units] = np.where(valid >= self.k, least, self.empty)

    def ranked(self, units_total: int):
        """Compacts every pool to its K and ranks it in place, block by block; returns views of the pools."""
        w = min(int(self.fill.max()) if len(self.fill) else 0, self.k)
        for start in range(0, units_total, BLOCK_UNITS):
            units = np.arange(start, min(units_total, start + BLOCK_UNITS))
            if (self.fill[units] > self.k).any():
                self._compact(units, self.value[units], self.row[units], self.item[units], self.fill[units])
            if not w:
                break
            v, r, i = _select(self.value[units, :w], self.row[units, :w], self.item[units, :w], self.layer, units, w,
                              self.descending)
            self.value[units, :w], self.row[units, :w], self.item[units, :w] = v, r, i
        return self.value[:, :w], self.row[:, :w], self.item[:, :w]


class TopK:
    """The K highest and K lowest (value, file row, dataset index) of every unit seen so far.

    Order is (value, tie key of the image): exactly the order `score` ranks by, so the kept rows
    are the ranks 1..K of the full file on each side. Values must be finite (extraction refuses
    others first). Updates only collect candidates; `state()` ranks them (at each commit).
    """

    def __init__(self, layer: str, units: int, k: int, state: dict | None = None):
        self.layer, self.units, self.k = layer, units, k
        state = state or {}
        self.sides = {side: _Side(layer, units, k, side == "top",
                                  tuple(state[f"{side}_{n}"] for n in ("value", "index", "item"))
                                  if f"{side}_value" in state else None) for side in ("top", "bottom")}
        self.sum = state.get("sum", np.zeros(units))

    def update(self, values: np.ndarray, rows: np.ndarray, items: np.ndarray) -> None:
        """values [B, U] (already in the stored dtype), their file rows and dataset indices [B]."""
        values = np.asarray(values)
        if values.dtype.kind != "f":
            values = values.astype(np.float64)
        rows, items = np.asarray(rows, np.int64), np.asarray(items, np.int64)
        self.sum = self.sum + values.sum(axis=0, dtype=np.float64)
        for side in self.sides.values():
            side.add(values, rows, items)

    def state(self) -> dict:
        """sum, and per side value/index/item [U, K] in rank order: views of the live state (copy to keep
        them past the next update)."""
        out = {"sum": self.sum}
        for name, side in self.sides.items():
            for field, array in zip(("value", "index", "item"), side.ranked(self.units)):
                out[f"{name}_{field}"] = array
        return out


def merge_topk(layer: str, parts: list[dict], k: int) -> dict:
    """Exact top/bottom-k of the union of several parts' states (their rows already global)."""
    units = parts[0]["top_value"].shape[0]
    out = {"sum": sum(p["sum"] for p in parts)}
    for side, descending in (("top", True), ("bottom", False)):
        cand = [np.concatenate([p[f"{side}_{n}"] for p in parts], axis=1) for n in ("value", "index", "item")]
        for name, array in zip(("value", "index", "item"), _select(*cand, layer, np.arange(units), k, descending)):
            out[f"{side}_{name}"] = array
    return out


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
