"""Per-device sequence numbers: each accepted at most once, in any order within a window.

A device numbers its results 1, 2, 3, ... Several gateway instances behind one shared
subscription receive consecutive results of one device and decide them concurrently, so
result 7 may be committed before result 6. "Strictly above the last accepted one" would
then throw away honest results; instead the gateway keeps an anti-replay window as IPsec
does (RFC 4303, section 3.4.3): the highest accepted number (the mark) and a bitmap of
which of the :data:`WINDOW` numbers below it were accepted. A number is new if it is above
the mark, or inside the window and not yet seen; everything else is a replay
(``infer.seq.replayed``), including anything older than the window. Pure: the state is
persisted by :mod:`.store` inside the transaction that stores the result.
"""

from __future__ import annotations

from typing import Final

WINDOW: Final = 63  # bits of the bitmap: it fits a signed 64-bit column
_MASK: Final = (1 << WINDOW) - 1


def advance(mark: int, seen: int, seq: int) -> tuple[int, int] | None:
    """The state after accepting ``seq``, or None if ``seq`` is a replay.

    ``mark`` is the highest accepted number (0: none yet); bit ``i`` of ``seen`` says
    whether ``mark - 1 - i`` was accepted."""
    if seq > mark:
        shift = seq - mark
        if mark == 0 or shift > WINDOW:
            return seq, 0
        return seq, ((seen << shift) | (1 << (shift - 1))) & _MASK
    if seq == mark:
        return None
    index = mark - 1 - seq
    if index >= WINDOW or seen >> index & 1:
        return None
    return mark, seen | 1 << index
