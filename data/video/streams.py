"""Positions in the global pack stream: one source's packs, or a seeded mixture of several sources.

One source (`SourceStream`)
---------------------------
For epoch e the planner packs the source's samples in a seeded order (`loader.Planner`); concatenating
epochs gives the stream of packs `(epoch, pack)`. A position is `(epoch, pack)`; the `skip` set of a
loader state holds positions after `base` already consumed (only after `merge_rank_states`).

A mixture (`MixedStream`, the long-context curriculum's long:short data)
-----------------------------------------------------------------------
Mixed position g = 0, 1, 2, ... takes the next pack of source `draw(g)`, where `draw(g)` is a pure
function of (seed, g): a SplitMix64 hash of g under a key made from the seed, mapped to [0, 1) and
then to a source by the cumulative weights. So source s's k-th pack is the pack at the k-th mixed
position that drew s, and each source is read through its own epochs, in the order it would have on
its own. A position is `(g, cursors)`: g and, per source, the `(epoch, pack)` its next pack would
come from; `skip` holds mixed indices. Nothing random is stored: a state is a few integers, and any
position is reached by counting draws (vectorised, about 10 ns a draw) — never by decoding.

Rank r of W yields remaining[r], remaining[r + W], ... of either kind of stream, so every rank's packs
are disjoint and, in a mixture, so are its parts of every source. With `num_epochs` set a mixture ends
at the first position that draws a source whose `num_epochs` epochs are used up (the ratio holds to the
end; the other sources' leftovers are not drawn).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np


class Planner(Protocol):
    """What a stream needs of `loader.Planner` (stated here so this module does not import the loader)."""

    def num_packs(self, epoch: int) -> int:
        """Packed sequences of this source in `epoch`."""


_CHUNK = 1 << 16          # draws counted per numpy call when walking far
_MIX_TAG = 0x4D49585F     # "MIX_": keeps the draw stream apart from the epoch-order RNG's inputs
_M64 = (1 << 64) - 1


@dataclass(frozen=True)
class Item:
    """One pack of a stream: `key` is what a loader state's `skip` holds for it ((epoch, pack) for one
    source, the mixed index g for a mixture); `source` indexes the loader's sources."""
    key: object
    source: int
    epoch: int
    pack: int


# ---------------------------------------------------------------------------------------------
# one source: positions (epoch, pack)
# ---------------------------------------------------------------------------------------------

def iter_stream(planner: Planner, base: tuple[int, int], skip: frozenset, *, start: int, stride: int,
                stop: int | None, num_epochs: int | None):
    """Yield (epoch, pack) at remaining-indices start, start+stride, ... (< stop)."""
    e, j = base
    idx = 0
    target = start
    while stop is None or target < stop:
        while True:
            if num_epochs is not None and e >= num_epochs:
                return
            n = planner.num_packs(e)
            if j >= n:
                e, j = e + 1, 0
                continue
            if (e, j) in skip:
                j += 1
                continue
            if idx == target:
                break
            jump = target - idx
            if not any(s[0] == e and j < s[1] < j + jump + 1 for s in skip):
                jump = min(jump, n - j)
                j += jump
                idx += jump
            else:
                j += 1
                idx += 1
        yield e, j
        target += stride


def advance(planner: Planner, base: tuple[int, int], skip: frozenset, count: int,
            num_epochs: int | None) -> tuple[tuple[int, int], frozenset]:
    """The position `count` packs of `remaining` after `base`."""
    if count <= 0:
        return tuple(base), skip
    nxt = None
    for pos in iter_stream(planner, base, skip, start=count, stride=1, stop=count + 1, num_epochs=num_epochs):
        nxt = pos
    if nxt is None:                                      # ran off the end of the last epoch
        nxt = (num_epochs if num_epochs is not None else base[0] + 1, 0)
    return nxt, frozenset(s for s in skip if s >= nxt)


def remaining_count(planner: Planner, base, skip, num_epochs: int | None) -> int | None:
    if num_epochs is None:
        return None
    e, j = base
    total = 0
    for ep in range(e, num_epochs):
        total += planner.num_packs(ep) - (j if ep == e else 0)
    return total - sum(1 for s in skip if s >= tuple(base) and s[0] < num_epochs)


def first_position(planner: Planner, pos, num_epochs: int | None) -> tuple[int, int] | None:
    """The first pack at or after `pos` (epoch rollovers resolved), or None past the last epoch."""
    for p in iter_stream(planner, pos, frozenset(), start=0, stride=1, stop=1, num_epochs=num_epochs):
        return p
    return None


class SourceStream:
    """The pack stream of one source; positions are (epoch, pack)."""

    def __init__(self, planner: Planner, num_epochs: int | None) -> None:
        self.planner, self.num_epochs = planner, num_epochs

    def start(self) -> tuple[int, int]:
        return (0, 0)

    def iter(self, base, skip: frozenset, *, start: int, stride: int, stop: int | None) -> Iterator[Item]:
        for e, j in iter_stream(self.planner, base, skip, start=start, stride=stride, stop=stop,
                                num_epochs=self.num_epochs):
            yield Item((e, j), 0, e, j)

    def advance(self, base, skip: frozenset, count: int):
        return advance(self.planner, base, skip, count, self.num_epochs)

    def remaining(self, base, skip: frozenset) -> int | None:
        return remaining_count(self.planner, base, skip, self.num_epochs)

    def first(self, pos) -> tuple[int, int] | None:
        return first_position(self.planner, pos, self.num_epochs)

    def restart(self, base):
        """The beginning of `base`'s epoch."""
        return (int(base[0]), 0)

    def encode(self, base, skip: frozenset) -> tuple[list, list]:
        return [int(base[0]), int(base[1])], sorted([int(e), int(j)] for e, j in skip)

    def decode(self, base, skip) -> tuple[tuple[int, int], frozenset]:
        if isinstance(base, dict) or len(base) != 2:
            raise ValueError(f"saved position {base!r} is a mixture's (data.video.long_shards was set), "
                             f"this loader reads one source")
        return (int(base[0]), int(base[1])), frozenset((int(e), int(j)) for e, j in skip)


# ---------------------------------------------------------------------------------------------
# a mixture of sources: positions (g, cursors)
# ---------------------------------------------------------------------------------------------

_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, elementwise on uint64 (array arithmetic wraps, as it must)."""
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def mix_key(seed: int) -> int:
    return int(_splitmix64(np.array([(int(seed) & 0xFFFFFFFF) | (_MIX_TAG << 32)], np.uint64))[0])


def mix_uniforms(key: int, start: int, n: int) -> np.ndarray:
    """u(g) in [0, 1) for g in [start, start + n): the g-th output of SplitMix64 started at `key`."""
    g = np.arange(start + 1, start + n + 1, dtype=np.uint64)
    z = _splitmix64(np.uint64(key) + g * _GAMMA)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class MixedStream:
    """Packs drawn from several `SourceStream`s by seeded per-position draws (module docstring)."""

    def __init__(self, sources: list[SourceStream], weights: list[float], seed: int) -> None:
        w = np.asarray(weights, np.float64)
        if (len(sources) < 2 or w.shape != (len(sources),) or not np.isfinite(w).all() or (w < 0).any()
                or w.sum() <= 0):
            raise ValueError(f"mixture weights {list(weights)}: need one finite weight >= 0 for each of the "
                             f"{len(sources)} (>= 2) sources, not all 0")
        self.sources, self.seed = sources, int(seed)
        self.weights = (w / w.sum()).tolist()
        cum = np.cumsum(w) / w.sum()
        cum[-1] = 1.0
        self._cum = cum
        self._key = mix_key(seed)

    def with_weights(self, weights: list[float]) -> "MixedStream":
        return MixedStream(self.sources, weights, self.seed)

    def draws(self, start: int, n: int) -> np.ndarray:
        """Source index of mixed positions start .. start + n - 1."""
        u = mix_uniforms(self._key, start, n)
        return np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.sources) - 1)

    def start(self):
        return (0, tuple((0, 0) for _ in self.sources))

    @staticmethod
    def _g_of(g_base: int, skips: list[int], i: int) -> int:
        """The mixed index of remaining[i] (skips sorted, all >= g_base)."""
        g = g_base + i
        for x in skips:
            if x > g:
                break
            g += 1
        return g

    def _step(self, s: int, cursor, count: int):
        """Source s's cursor after `count` more of its packs; None if fewer than `count` are left."""
        src = self.sources[s]
        if count > 1:
            cursor = src.advance(cursor, frozenset(), count - 1)[0]
        p = src.first(cursor)
        if p is None:
            return None
        return src.advance(p, frozenset(), 1)[0]

    def _apply(self, cursors, drawn: np.ndarray):
        """Cursors after the positions whose sources are `drawn`; None if one drew a used-up source."""
        cur = list(cursors)
        for s, c in enumerate(np.bincount(drawn, minlength=len(cur)).tolist()):
            if c:
                cur[s] = self._step(s, cur[s], c)
                if cur[s] is None:
                    return None
        return tuple(cur)

    def _walk(self, cursors, g0: int, g1: int):
        """Cursors at g1 from cursors at g0 <= g1; None if a position in [g0, g1) drew a used-up source."""
        for a in range(g0, g1, _CHUNK):
            cursors = self._apply(cursors, self.draws(a, min(g1, a + _CHUNK) - a))
            if cursors is None:
                return None
        return tuple(cursors)

    def iter(self, base, skip: frozenset, *, start: int, stride: int, stop: int | None) -> Iterator[Item]:
        g_base, cur = base
        if cur is None:                                   # a position past the end
            return
        skips = sorted(skip)
        g_prev, target = g_base, start
        while stop is None or target < stop:
            g = self._g_of(g_base, skips, target)
            if g - g_prev < _CHUNK:                       # the usual step: one numpy call for all draws
                drawn = self.draws(g_prev, g - g_prev + 1)
                cur, s = self._apply(cur, drawn[:-1]), int(drawn[-1])
            else:
                cur, s = self._walk(cur, g_prev, g), int(self.draws(g, 1)[0])
            if cur is None:
                return
            p = self.sources[s].first(cur[s])
            if p is None:
                return
            cur = cur[:s] + (p,) + cur[s + 1:]
            yield Item(g, s, p[0], p[1])
            g_prev, target = g, target + stride

    def advance(self, base, skip: frozenset, count: int):
        if count <= 0 or base[1] is None:
            return base, skip
        g = self._g_of(base[0], sorted(skip), count)
        return (g, self._walk(base[1], base[0], g)), frozenset(x for x in skip if x >= g)

    def remaining(self, base, skip: frozenset) -> int | None:
        """Packs left before the end (None for an endless stream)."""
        if any(s.num_epochs is None for s in self.sources):
            return None
        g_base, cur = base
        if cur is None:
            return 0
        left = [src.remaining(c, frozenset()) for src, c in zip(self.sources, cur)]
        live = [s for s, w in enumerate(self.weights) if w > 0]
        a, g_end = g_base, None
        while g_end is None:                  # ends within ~max(left) / max(weight) draws
            d = self.draws(a, _CHUNK)
            for s in live:
                hits = np.flatnonzero(d == s)
                if len(hits) > left[s]:
                    end = a + int(hits[left[s]])
                    g_end = end if g_end is None else min(g_end, end)
                else:
                    left[s] -= len(hits)
            a += _CHUNK
        return (g_end - g_base) - sum(1 for x in skip if g_base <= x < g_end)

    def restart(self, base):
        """Every source at the beginning of its current epoch; the draws continue at base's index."""
        g, cur = base
        return self.start() if cur is None else (int(g), tuple((int(e), 0) for e, _ in cur))

    def encode(self, base, skip: frozenset) -> tuple[dict, list]:
        g, cur = base
        return ({"index": int(g), "sources": None if cur is None else [[int(e), int(j)] for e, j in cur]},
                sorted(int(x) for x in skip))

    def decode(self, base, skip):
        if not isinstance(base, dict) or set(base) != {"index", "sources"}:
            raise ValueError(f"saved position {base!r} is a one-source loader's, this loader mixes "
                             f"{len(self.sources)} sources")
        cur = base["sources"]
        if cur is not None and len(cur) != len(self.sources):
            raise ValueError(f"saved position {base!r} has {len(cur)} sources, this loader mixes {len(self.sources)}")
        cur = None if cur is None else tuple((int(e), int(j)) for e, j in cur)
        return (int(base["index"]), cur), frozenset(int(x) for x in skip)
