"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification (pure).

Hashing (RFC 6962 §2.1)::

    leaf hash  = SHA-256(0x00 || entry bytes)
    node hash  = SHA-256(0x01 || left || right)
    empty tree = SHA-256("")

A tree of ``n`` leaves splits at ``k``, the largest power of two below ``n``; every left
child is therefore a *perfect* subtree whose first leaf is a multiple of its width. This
module names a perfect subtree by ``(level, index)`` (leaves ``index << level`` up to
``(index + 1) << level``); a store keeps those hashes and hands them in through a
:class:`SubtreeSource`, so proofs cost O(log n) lookups.

Proof generation follows RFC 6962 §2.1.1 (``PATH``) and §2.1.2 (``SUBPROOF``); verification
follows RFC 9162 §2.1.3.2 and §2.1.4.2 exactly. Verification returns ``False`` rather than
raising: a proof is either good or not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Protocol

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    """The RFC 6962 hash of one log entry."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 6962 hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly below ``n`` (``n`` >= 2)."""
    if n < 2:
        raise ValueError("only a tree of two or more leaves splits")
    return 1 << ((n - 1).bit_length() - 1)


class SubtreeSource(Protocol):
    """Hashes of perfect subtrees: ``perfect(0, i)`` is leaf ``i``'s hash."""

    def perfect(self, level: int, index: int) -> bytes: ...


def range_hash(source: SubtreeSource, start: int, end: int) -> bytes:
    """MTH of leaves ``[start, end)``, a subtree of the RFC 6962 tree (or the whole tree)."""
    n = end - start
    if n <= 0:
        if n == 0 and start == 0:
            return EMPTY_ROOT
        raise ValueError(f"empty or negative range [{start}, {end})")
    if n & (n - 1) == 0 and start % n == 0:
        return source.perfect(n.bit_length() - 1, start // n)
    k = split_point(n)
    return node_hash(range_hash(source, start, start + k), range_hash(source, start + k, end))


def inclusion_proof(source: SubtreeSource, index: int, size: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of the first ``size`` leaves."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a tree of {size}")
    path: list[bytes] = []
    start, end, m = 0, size, index
    while end - start > 1:
        k = split_point(end - start)
        if m < k:
            path.append(range_hash(source, start + k, end))
            end = start + k
        else:
            path.append(range_hash(source, start, start + k))
            start, m = start + k, m - k
    path.reverse()  # PATH lists siblings from the leaf up
    return path


def consistency_proof(source: SubtreeSource, first: int, second: int) -> list[bytes]:
    """The proof that the tree of ``first`` leaves is a prefix of the tree of ``second``."""
    if not 0 <= first <= second:
        raise ValueError(f"no consistency proof from {first} to {second}")
    if first in (0, second):
        return []
    proof: list[bytes] = []
    start, end, m, whole = 0, second, first, True
    while True:
        n = end - start
        if m == n:
            if not whole:
                proof.append(range_hash(source, start, end))
            break
        k = split_point(n)
        if m <= k:
            proof.append(range_hash(source, start + k, end))
            end = start + k
        else:
            proof.append(range_hash(source, start, start + k))
            start, m, whole = start + k, m - k, False
    proof.reverse()
    return proof


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` place ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < size or any(len(h) != HASH_SIZE for h in (leaf, root, *proof)):
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: is the tree (``first``, ``first_root``) a prefix of the second?"""
    hashes = (first_root, second_root, *proof)
    if not 0 <= first <= second or any(len(h) != HASH_SIZE for h in hashes):
        return False
    if first == second:
        return not proof and first_root == second_root
    if first == 0 or not proof:  # a proof from the empty tree proves nothing (as RFC 9162)
        return False
    path = list(proof)
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == first_root and sr == second_root and sn == 0


class CompactRange:
    """The right edge of a growing tree: one perfect subtree per set bit of its size.

    Appending a leaf merges equal-width subtrees; each merge is a perfect subtree that a
    store keeps (``on_node(level, index, hash)``), and :meth:`root` folds the edge into the
    tree head. Memory is O(log n), so a verifier streams a log of any length through it.
    """

    __slots__ = ("_size", "_stack")

    def __init__(self, size: int = 0, edge: Iterable[bytes] = ()) -> None:
        """Resume at ``size`` leaves from its edge hashes, widest (leftmost) first."""
        self._stack = list(edge)
        if len(self._stack) != size.bit_count():
            raise ValueError(f"a tree of {size} leaves has {size.bit_count()} edge subtrees")
        self._size = size

    @staticmethod
    def edge_keys(size: int) -> list[tuple[int, int]]:
        """``(level, index)`` of the perfect subtrees making up a tree of ``size``, left first."""
        keys: list[tuple[int, int]] = []
        start = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                keys.append((level, start >> level))
                start += 1 << level
        return keys

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf: bytes, on_node: Callable[[int, int, bytes], None] | None = None) -> None:
        """Add one leaf hash; report every perfect subtree it completes (level >= 1)."""
        self._stack.append(leaf)
        index, level, h = self._size, 0, leaf
        while index & 1:
            h = node_hash(self._stack[-2], self._stack[-1])
            del self._stack[-2:]
            self._stack.append(h)
            index >>= 1
            level += 1
            if on_node is not None:
                on_node(level, index, h)
        self._size += 1

    def root(self) -> bytes:
        """The tree head of the leaves appended so far."""
        if not self._stack:
            return EMPTY_ROOT
        r = self._stack[-1]
        for h in reversed(self._stack[:-1]):
            r = node_hash(h, r)
        return r


class KeyRecorder:
    """A :class:`SubtreeSource` that records which subtrees a computation asks for.

    Which subtrees a proof needs depends on sizes and indices only, never on hash values, so
    a store runs the computation once against this recorder, fetches the keys in one query,
    and runs it again against a :class:`MappingSource`.
    """

    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []

    def perfect(self, level: int, index: int) -> bytes:
        self.keys.append((level, index))
        return bytes(HASH_SIZE)


class MappingSource:
    """A :class:`SubtreeSource` over hashes already fetched."""

    def __init__(self, hashes: dict[tuple[int, int], bytes]) -> None:
        self._hashes = hashes

    def perfect(self, level: int, index: int) -> bytes:
        try:
            return self._hashes[(level, index)]
        except KeyError:
            raise LookupError(f"subtree ({level}, {index}) is not stored") from None


class LeafSource:
    """A :class:`SubtreeSource` over a list of leaf hashes (tests and small trees)."""

    def __init__(self, leaves: Sequence[bytes]) -> None:
        self._leaves = leaves

    def perfect(self, level: int, index: int) -> bytes:
        start, end = index << level, (index + 1) << level
        if end > len(self._leaves):
            raise LookupError(f"subtree ({level}, {index}) is beyond {len(self._leaves)} leaves")
        if level == 0:
            return self._leaves[start]
        half = 1 << (level - 1)
        return node_hash(
            self.perfect(level - 1, start // half), self.perfect(level - 1, start // half + 1)
        )
