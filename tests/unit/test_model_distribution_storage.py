"""The distribution service's state: the content-addressed blob store, the KEK file and the
metadata store (real SQLite files; concurrency as two instances would see it)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ec
from tests.conftest import OpenDatabase

from edgeward_model_distribution.blobs import BlobStore
from edgeward_model_distribution.kek import KEK_FILE, load_or_create_kek, public_der
from edgeward_model_distribution.store import ChunkList, ModelStore, VersionRecord
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason


# ------------------------------------------------------------------ blobs
def test_blobs_are_content_addressed_private_and_idempotent(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "state")
    data = os.urandom(5000)
    digest = blobs.put(data)
    assert digest == hashlib.sha256(data).hexdigest()
    path = tmp_path / "state" / "blobs" / "sha256" / digest[:2] / digest
    assert blobs.path(digest) == path
    assert path.read_bytes() == data
    assert path.stat().st_mode & 0o777 == 0o600
    for directory in (path.parent, tmp_path / "state" / "blobs", tmp_path / "state" / "uploads"):
        assert directory.stat().st_mode & 0o777 == 0o700
    assert blobs.put(data) == digest  # again: same file, no temporary left behind
    assert sorted(p.name for p in path.parent.iterdir()) == [digest]
    assert blobs.read_range(digest, 4096, 904) == data[4096:]
    with pytest.raises(OSError, match="short read"):
        blobs.read_range(digest, 4096, 905)
    with pytest.raises(ValueError, match="SHA-256"):
        blobs.path("../../etc/passwd")


def test_upload_chunks_land_at_their_offsets_in_any_order(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "state")
    upload_id = "ab" * 16
    blobs.write_upload(upload_id, 4, b"5678")
    blobs.write_upload(upload_id, 0, b"1234")
    assert blobs.read_upload(upload_id) == b"12345678"
    assert blobs.read_upload(upload_id, 2, 4) == b"3456"
    assert blobs.upload_path(upload_id).stat().st_mode & 0o777 == 0o600
    blobs.discard_upload(upload_id)
    blobs.discard_upload(upload_id)
    with pytest.raises(ValueError, match="upload id"):
        blobs.upload_path("../x")


def test_a_state_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    with pytest.raises(ConfigError) as caught:
        BlobStore(state)
    assert caught.value.reason == "storage.path.insecure"


# ------------------------------------------------------------------ the KEK
def test_the_kek_is_created_once_0600_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    first = load_or_create_kek(state)
    assert (state / KEK_FILE).stat().st_mode & 0o777 == 0o600
    assert isinstance(first.curve, ec.SECP256R1)
    again = load_or_create_kek(state)
    assert public_der(again) == public_der(first)
    assert [p.name for p in state.iterdir()] == [KEK_FILE]  # no temporary file left


def test_a_kek_readable_by_others_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    load_or_create_kek(state)
    (state / KEK_FILE).chmod(0o640)
    with pytest.raises(ConfigError) as caught:
        load_or_create_kek(state)
    assert caught.value.reason == "config.key.permissions"


@pytest.mark.asyncio
async def test_instances_starting_together_agree_on_one_kek(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    keys = await asyncio.gather(*(asyncio.to_thread(load_or_create_kek, state) for _ in range(8)))
    assert len({public_der(k) for k in keys}) == 1


# ------------------------------------------------------------------ metadata
@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "models.db"


@pytest_asyncio.fixture
async def store(open_db: OpenDatabase) -> ModelStore:
    """On SQLite and on a real PostgreSQL (tests/conftest.py)."""
    store = ModelStore(await open_db())
    await store.migrate()
    await store.migrate()  # idempotent
    return store


def _record(version: int, name: str = "demo") -> VersionRecord:
    return VersionRecord(
        name=name,
        version=version,
        tier=Tier.HIGH,
        provenance=b"{}",
        signature=b"{}",
        signer_cert=b"cert",
        signer="signer.ci",
        blob_digest=f"{version:064x}",
        blob_size=64,
        model_digest=f"{version + 100:064x}",
        sealed_key=b"sealed",
        expires_at=10**13,
        published_at=1,
        published_by="op.alice",
    )


def _chunks(record: VersionRecord) -> ChunkList:
    return ChunkList(record.blob_digest, 32, ("a" * 64, "b" * 64))


@pytest.mark.asyncio
async def test_every_change_to_a_model_bumps_its_meta_version(store: ModelStore) -> None:
    assert await store.meta_version("demo") == 0
    assert await store.publish(_record(1), "u" * 32, _chunks(_record(1))) == 1
    rollout, changed = await store.roll_out("demo", 1, ["dev-a"], 0, "op.alice", 2)
    assert changed
    assert rollout.wave == 1
    _, changed = await store.roll_out("demo", 1, ["dev-a"], 0, "op.alice", 3)
    assert not changed  # a repeat changes nothing, not even the counter
    assert await store.meta_version("demo") == 2
    assert await store.revoke("demo", 1, "drift", "op.alice", 4)
    assert not await store.revoke("demo", 1, "drift", "op.alice", 5)
    assert await store.meta_version("demo") == 3
    assert await store.meta_version("other") == 0
    assert await store.chunk_list(_record(1).blob_digest, 32) == ["a" * 64, "b" * 64]
    with pytest.raises(PolicyError) as caught:
        await store.revoke("demo", 2, "?", "op.alice", 6)
    assert caught.value.reason == ModelReason.UNKNOWN


@pytest.mark.asyncio
async def test_two_instances_cannot_both_publish_one_version(open_db: OpenDatabase) -> None:
    databases = [await open_db() for _ in range(2)]
    stores = [ModelStore(db) for db in databases]
    await stores[0].migrate()
    await stores[1].migrate()
    results = await asyncio.gather(
        *(s.publish(_record(3), "u" * 32, _chunks(_record(3))) for s in stores),
        return_exceptions=True,
    )
    refusals = [r for r in results if isinstance(r, PolicyError)]
    assert len(refusals) == 1
    assert refusals[0].reason == ModelReason.VERSION_NOT_MONOTONIC
    assert [v.version for v in await stores[1].versions("demo")] == [3]


@pytest.mark.asyncio
async def test_assignments_follow_cohorts_percentages_and_revocations(store: ModelStore) -> None:
    for version in (1, 2):
        await store.publish(_record(version), f"{version}" * 32, _chunks(_record(version)))
    await store.roll_out("demo", 1, [], 100, "op.alice", 1)
    await store.roll_out("demo", 2, ["dev-a"], 0, "op.alice", 2)
    assert [(a.record.version, a.rollout.label) for a in await store.assignments("dev-a")] == [
        (2, "wave-1")
    ]
    assert [a.record.version for a in await store.assignments("dev-b")] == [1]
    await store.revoke("demo", 2, "drift", "op.alice", 3)
    (fallback,) = await store.assignments("dev-a")
    assert (fallback.record.version, fallback.meta_version) == (1, 5)
    assert await store.assignments("dev-a", "other") == []
