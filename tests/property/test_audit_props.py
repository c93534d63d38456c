"""Merkle proofs: they verify for any tree size and index, and fail for any flipped byte."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgeward_shared.audit.merkle import (
    LeafSource,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    range_hash,
    verify_consistency,
    verify_inclusion,
)


def _tree(size: int) -> tuple[list[bytes], LeafSource]:
    leaves = [leaf_hash(i.to_bytes(4, "big")) for i in range(size)]
    return leaves, LeafSource(leaves)


def _flip(proof: list[bytes], which: int, byte: int, bit: int) -> list[bytes]:
    k = which % len(proof)
    item = bytearray(proof[k])
    item[byte % len(item)] ^= 1 << bit
    return [*proof[:k], bytes(item), *proof[k + 1 :]]


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    size=st.integers(1, 300),
    byte=st.integers(0, 31),
    bit=st.integers(0, 7),
)
def test_inclusion_proofs_verify_and_any_flip_fails(
    data: st.DataObject, size: int, byte: int, bit: int
) -> None:
    leaves, source = _tree(size)
    index = data.draw(st.integers(0, size - 1))
    root = range_hash(source, 0, size)
    proof = inclusion_proof(source, index, size)
    assert verify_inclusion(index, size, leaves[index], proof, root)
    if proof:
        which = data.draw(st.integers(0, len(proof) - 1))
        assert not verify_inclusion(
            index, size, leaves[index], _flip(proof, which, byte, bit), root
        )
    assert not verify_inclusion(index, size, _flip([leaves[index]], 0, byte, bit)[0], proof, root)
    assert not verify_inclusion(index, size, leaves[index], proof, _flip([root], 0, byte, bit)[0])


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    second=st.integers(2, 300),
    byte=st.integers(0, 31),
    bit=st.integers(0, 7),
)
def test_consistency_proofs_verify_and_any_flip_fails(
    data: st.DataObject, second: int, byte: int, bit: int
) -> None:
    _, source = _tree(second)
    first = data.draw(st.integers(1, second - 1))
    old, new = range_hash(source, 0, first), range_hash(source, 0, second)
    proof = consistency_proof(source, first, second)
    assert verify_consistency(first, second, old, new, proof)
    which = data.draw(st.integers(0, len(proof) - 1))
    assert not verify_consistency(first, second, old, new, _flip(proof, which, byte, bit))
    assert not verify_consistency(first, second, _flip([old], 0, byte, bit)[0], new, proof)
    assert not verify_consistency(first, second, old, _flip([new], 0, byte, bit)[0], proof)
