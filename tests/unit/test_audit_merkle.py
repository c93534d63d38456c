"""RFC 6962 hashing and proofs: published vectors, and every proof of small trees."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from edgeward_shared.audit.merkle import (
    EMPTY_ROOT,
    CompactRange,
    KeyRecorder,
    LeafSource,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    node_hash,
    range_hash,
    split_point,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parents[1] / "vectors" / "audit"
PROBES = VECTORS / "transparency-dev-merkle"


def _mth(data: list[bytes]) -> bytes:
    """RFC 6962 §2.1 MTH, written out as the RFC states it (the reference for the tests)."""
    if not data:
        return EMPTY_ROOT
    if len(data) == 1:
        return leaf_hash(data[0])
    k = split_point(len(data))
    return node_hash(_mth(data[:k]), _mth(data[k:]))


def test_reference_roots_of_every_prefix() -> None:
    vectors = json.loads((VECTORS / "rfc6962-roots.json").read_text())
    leaves = [bytes.fromhex(h) for h in vectors["leaves_hex"]]
    for size, root in enumerate(vectors["roots_hex"]):
        edge = CompactRange()
        for leaf in leaves[:size]:
            edge.append(leaf_hash(leaf))
        assert edge.root().hex() == root
        assert _mth(leaves[:size]).hex() == root


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _probes(kind: str) -> list[tuple[str, dict[str, object]]]:
    files = sorted((PROBES / kind).rglob("*.json"))
    assert len(files) > 50  # the vectors are present, not silently missing
    return [(str(f.relative_to(PROBES)), json.loads(f.read_text())) for f in files]


def test_inclusion_probes() -> None:
    wrong = []
    for name, probe in _probes("inclusion"):
        ok = verify_inclusion(
            int(probe["leafIdx"]),  # type: ignore[call-overload]
            int(probe["treeSize"]),  # type: ignore[call-overload]
            _b64(probe["leafHash"]),  # type: ignore[arg-type]
            [_b64(p) for p in probe["proof"] or []],  # type: ignore[attr-defined]
            _b64(probe["root"]),  # type: ignore[arg-type]
        )
        if ok is probe["wantErr"]:
            wrong.append(name)
    assert wrong == []


def test_consistency_probes() -> None:
    wrong = []
    for name, probe in _probes("consistency"):
        ok = verify_consistency(
            int(probe["size1"]),  # type: ignore[call-overload]
            int(probe["size2"]),  # type: ignore[call-overload]
            _b64(probe["root1"]),  # type: ignore[arg-type]
            _b64(probe["root2"]),  # type: ignore[arg-type]
            [_b64(p) for p in probe["proof"] or []],  # type: ignore[attr-defined]
        )
        if ok is probe["wantErr"]:
            wrong.append(name)
    # One deliberate difference: equal sizes with equal roots that are not 32-byte hashes.
    # Go's verifier compares the bytes only; ours refuses anything that is not a SHA-256.
    assert wrong == ["consistency/additional/sizes-are-equal-one-and-proof-is-empty.json"]


def test_every_proof_of_small_trees_verifies_and_a_wrong_one_does_not() -> None:
    for n in range(1, 34):
        data = [n.to_bytes(2, "big") + i.to_bytes(2, "big") for i in range(n)]
        leaves = [leaf_hash(d) for d in data]
        source = LeafSource(leaves)
        root = _mth(data)
        assert range_hash(source, 0, n) == root
        for i in range(n):
            proof = inclusion_proof(source, i, n)
            assert verify_inclusion(i, n, leaves[i], proof, root)
            assert not verify_inclusion(i, n, leaf_hash(b"other"), proof, root)
            if n > 1:
                assert not verify_inclusion((i + 1) % n, n, leaves[i], proof, root)
        for m in range(1, n + 1):
            proof = consistency_proof(source, m, n)
            assert verify_consistency(m, n, _mth(data[:m]), root, proof)
            if 0 < m < n:
                assert not verify_consistency(m, n, _mth(data[:m]), root, proof[:-1])
                assert not verify_consistency(m, n, root, root, proof)


def test_compact_range_reports_each_completed_subtree_once() -> None:
    nodes: list[tuple[int, int, bytes]] = []
    edge = CompactRange()
    leaves = [leaf_hash(bytes([i])) for i in range(13)]
    for leaf in leaves:
        edge.append(leaf, lambda level, idx, h: nodes.append((level, idx, h)))
    source = LeafSource(leaves)
    assert {(lv, ix) for lv, ix, _ in nodes} == {(1, i) for i in range(6)} | {
        (2, 0),
        (2, 1),
        (2, 2),
        (3, 0),
    }
    assert all(source.perfect(lv, ix) == h for lv, ix, h in nodes)
    resumed = CompactRange(13, [source.perfect(lv, ix) for lv, ix in CompactRange.edge_keys(13)])
    assert resumed.root() == edge.root()


def test_a_proof_needs_logarithmically_many_subtrees() -> None:
    recorder = KeyRecorder()
    inclusion_proof(recorder, 123_456, 1_000_000)
    assert len(recorder.keys) <= 2 * 20
    recorder = KeyRecorder()
    consistency_proof(recorder, 333_333, 1_000_000)
    assert len(recorder.keys) <= 2 * 20


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="not in a tree"):
        inclusion_proof(LeafSource([]), 0, 0)
    with pytest.raises(ValueError, match="no consistency proof"):
        consistency_proof(LeafSource([]), 3, 2)
    assert not verify_inclusion(5, 5, bytes(32), [], bytes(32))
    assert not verify_consistency(3, 2, bytes(32), bytes(32), [])
