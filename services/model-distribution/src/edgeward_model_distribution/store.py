"""The distribution service's metadata, through the shared storage layer (SQLite by default).

Tables (prefix ``mdl_``): published versions (provenance, signature bundle, signer
certificate, blob digest and size, the data key sealed to the KEK, revocation), uploads in
progress (resumable), rollouts and their cohorts, a per-model ``meta_version`` counter bumped
by every change to the model (publish, rollout, revoke), chunk digest lists per blob and
chunk size, devices seen, device activation reports and the key-release log (every release
and every refusal). Blobs themselves are files (:mod:`.blobs`).

Nothing assumes one instance: every change that depends on what is stored reads and writes
in one transaction (SQLite ``BEGIN IMMEDIATE``; PostgreSQL ``SERIALIZABLE``), version
numbers are primary keys, an upload's chunks are rows keyed by index (a repeat is a no-op
``ON CONFLICT``), and the rollout decision is :func:`.core.promote` on the rows read in that
same transaction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

from edgeward_model_distribution.core import Candidate, Rollout, assigned, check_monotonic, promote
from edgeward_shared.errors import PolicyError
from edgeward_shared.models.provenance import Tier
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.models.sealing import ModelRef
from edgeward_shared.storage import Database, Migration, Row, Transaction, migrate

COMPONENT: Final = "model-distribution"
MIGRATIONS: Final = (
    Migration(
        1,
        "versions, uploads, rollouts, meta versions, devices, activations, key log",
        (
            """CREATE TABLE mdl_versions (
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                tier TEXT NOT NULL CHECK (tier IN ('high', 'medium', 'low')),
                provenance BLOB NOT NULL,
                signature BLOB NOT NULL,
                signer_cert BLOB NOT NULL,
                signer TEXT NOT NULL,
                blob_digest TEXT NOT NULL,
                blob_size BIGINT NOT NULL,
                model_digest TEXT NOT NULL,
                sealed_key BLOB,
                expires_at BIGINT NOT NULL,
                published_at BIGINT NOT NULL,
                published_by TEXT NOT NULL,
                revoked BOOLEAN NOT NULL,
                revoked_reason TEXT,
                revoked_at BIGINT,
                revoked_by TEXT,
                PRIMARY KEY (name, version)
            )""",
            """CREATE TABLE mdl_uploads (
                upload_id TEXT PRIMARY KEY,
                begin_key TEXT NOT NULL UNIQUE,
                provenance BLOB NOT NULL,
                signature BLOB NOT NULL,
                signer_cert BLOB NOT NULL,
                blob_digest TEXT NOT NULL,
                blob_size BIGINT NOT NULL,
                chunk_size BIGINT NOT NULL,
                started_by TEXT NOT NULL,
                started_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
            """CREATE TABLE mdl_upload_chunks (
                upload_id TEXT NOT NULL REFERENCES mdl_uploads (upload_id) ON DELETE CASCADE,
                idx BIGINT NOT NULL,
                length BIGINT NOT NULL,
                received_at BIGINT NOT NULL,
                PRIMARY KEY (upload_id, idx)
            )""",
            """CREATE TABLE mdl_rollouts (
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                percent BIGINT NOT NULL CHECK (percent >= 0 AND percent <= 100),
                wave BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                updated_by TEXT NOT NULL,
                PRIMARY KEY (name, version),
                FOREIGN KEY (name, version) REFERENCES mdl_versions (name, version)
            )""",
            """CREATE TABLE mdl_cohorts (
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                device_id TEXT NOT NULL,
                added_at BIGINT NOT NULL,
                PRIMARY KEY (name, version, device_id)
            )""",
            "CREATE INDEX IF NOT EXISTS mdl_cohorts_device ON mdl_cohorts (device_id)",
            """CREATE TABLE mdl_meta (
                name TEXT PRIMARY KEY,
                meta_version BIGINT NOT NULL
            )""",
            """CREATE TABLE mdl_blob_chunks (
                blob_digest TEXT NOT NULL,
                chunk_size BIGINT NOT NULL,
                digests BLOB NOT NULL,
                PRIMARY KEY (blob_digest, chunk_size)
            )""",
            """CREATE TABLE mdl_devices (
                device_id TEXT PRIMARY KEY,
                first_seen BIGINT NOT NULL,
                last_seen BIGINT NOT NULL
            )""",
            """CREATE TABLE mdl_activations (
                device_id TEXT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('active', 'failed')),
                reason TEXT NOT NULL,
                at BIGINT NOT NULL,
                PRIMARY KEY (device_id, name, version)
            )""",
            """CREATE TABLE mdl_key_log (
                seq BIGINT PRIMARY KEY,
                at BIGINT NOT NULL,
                device_id TEXT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                decision TEXT NOT NULL CHECK (decision IN ('released', 'refused')),
                reason TEXT NOT NULL,
                result_id TEXT
            )""",
            "CREATE INDEX IF NOT EXISTS mdl_key_log_device ON mdl_key_log (device_id, at)",
        ),
    ),
    Migration(
        2,
        "gated rollouts, their audit history, attestation failures seen",
        (
            """CREATE TABLE mdl_plans (
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                previous BIGINT,
                waves TEXT NOT NULL,
                gates TEXT NOT NULL,
                auto BOOLEAN NOT NULL,
                phase TEXT NOT NULL,
                stage BIGINT NOT NULL,
                stage_since BIGINT NOT NULL,
                paused_from TEXT,
                reason TEXT,
                started_by TEXT NOT NULL,
                started_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,
                PRIMARY KEY (name, version),
                FOREIGN KEY (name, version) REFERENCES mdl_versions (name, version)
            )""",
            """CREATE TABLE mdl_rollout_history (
                seq BIGINT PRIMARY KEY,
                at BIGINT NOT NULL,
                name TEXT NOT NULL,
                version BIGINT NOT NULL,
                old_phase TEXT NOT NULL,
                new_phase TEXT NOT NULL,
                stage BIGINT NOT NULL,
                reason TEXT NOT NULL,
                actor TEXT NOT NULL,
                gates TEXT NOT NULL
            )""",
            (
                "CREATE INDEX IF NOT EXISTS mdl_rollout_history_v"
                " ON mdl_rollout_history (name, version)"
            ),
            """CREATE TABLE mdl_attestation_failures (
                device_id TEXT PRIMARY KEY,
                at BIGINT NOT NULL,
                reason TEXT NOT NULL
            )""",
        ),
    ),
)


# ------------------------------------------------------------------ records
@dataclass(frozen=True, slots=True)
class VersionRecord:
    name: str
    version: int
    tier: Tier
    provenance: bytes
    signature: bytes
    signer_cert: bytes
    signer: str
    blob_digest: str
    blob_size: int
    model_digest: str
    sealed_key: bytes | None  # HPKE-sealed to the KEK; None for tier low
    expires_at: int
    published_at: int
    published_by: str
    revoked: bool = False
    revoked_reason: str | None = None

    @property
    def ref(self) -> ModelRef:
        return ModelRef(self.name, self.version, self.model_digest)

    @classmethod
    def from_row(cls, row: Row) -> VersionRecord:
        sealed = row["sealed_key"]
        return cls(
            name=_str(row["name"]),
            version=_int(row["version"]),
            tier=Tier(_str(row["tier"])),
            provenance=_bytes(row["provenance"]),
            signature=_bytes(row["signature"]),
            signer_cert=_bytes(row["signer_cert"]),
            signer=_str(row["signer"]),
            blob_digest=_str(row["blob_digest"]),
            blob_size=_int(row["blob_size"]),
            model_digest=_str(row["model_digest"]),
            sealed_key=None if sealed is None else _bytes(sealed),
            expires_at=_int(row["expires_at"]),
            published_at=_int(row["published_at"]),
            published_by=_str(row["published_by"]),
            revoked=bool(row["revoked"]),
            revoked_reason=None if row["revoked_reason"] is None else _str(row["revoked_reason"]),
        )


@dataclass(frozen=True, slots=True)
class UploadRecord:
    upload_id: str
    begin_key: str
    provenance: bytes
    signature: bytes
    signer_cert: bytes
    blob_digest: str
    blob_size: int
    chunk_size: int
    started_by: str
    started_at: int

    @classmethod
    def from_row(cls, row: Row) -> UploadRecord:
        return cls(
            upload_id=_str(row["upload_id"]),
            begin_key=_str(row["begin_key"]),
            provenance=_bytes(row["provenance"]),
            signature=_bytes(row["signature"]),
            signer_cert=_bytes(row["signer_cert"]),
            blob_digest=_str(row["blob_digest"]),
            blob_size=_int(row["blob_size"]),
            chunk_size=_int(row["chunk_size"]),
            started_by=_str(row["started_by"]),
            started_at=_int(row["started_at"]),
        )


def begin_key(  # noqa: PLR0917 - every field of the announcement is part of the key
    operator: str,
    provenance: bytes,
    signature: bytes,
    signer_cert: bytes,
    blob_digest: str,
    blob_size: int,
) -> str:
    """What makes a ``PublishBegin`` the same upload again (to resume it)."""
    h = hashlib.sha256()
    for part in (operator.encode(), provenance, signature, signer_cert, blob_digest.encode()):
        h.update(len(part).to_bytes(8, "big") + part)
    h.update(blob_size.to_bytes(8, "big"))
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Activation:
    device_id: str
    version: int
    state: Literal["active", "failed"]
    reason: str
    at: int


@dataclass(frozen=True, slots=True)
class KeyDecision:
    at: int
    device_id: str
    name: str
    version: int
    released: bool
    reason: str
    result_id: str | None


@dataclass(frozen=True, slots=True)
class Assignment:
    """A version assigned to a device, with the model's metadata counter and the rollout."""

    record: VersionRecord
    rollout: Rollout
    meta_version: int
    #: an aborted rollout of a newer version this assignment sends the device back from
    reverts: int | None = None


class ModelStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await migrate(self.db, component=COMPONENT, migrations=MIGRATIONS)

    # ------------------------------------------------------------------ uploads
    async def begin_upload(self, upload: UploadRecord) -> UploadRecord:
        """Start ``upload``, or return the upload already started with the same key."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO mdl_uploads (upload_id, begin_key, provenance, signature,"
                " signer_cert, blob_digest, blob_size, chunk_size, started_by, started_at,"
                " updated_at) VALUES (:id, :key, :prov, :sig, :cert, :digest, :size, :chunk, :by,"
                " :at, :at) ON CONFLICT (begin_key) DO NOTHING",
                {
                    "id": upload.upload_id,
                    "key": upload.begin_key,
                    "prov": upload.provenance,
                    "sig": upload.signature,
                    "cert": upload.signer_cert,
                    "digest": upload.blob_digest,
                    "size": upload.blob_size,
                    "chunk": upload.chunk_size,
                    "by": upload.started_by,
                    "at": upload.started_at,
                },
            )
            row = await tx.fetch_one(
                "SELECT * FROM mdl_uploads WHERE begin_key = :key", {"key": upload.begin_key}
            )
        if row is None:  # pragma: no cover - inserted or present in the same transaction
            raise RuntimeError("upload vanished")
        return UploadRecord.from_row(row)

    async def upload(self, upload_id: str) -> UploadRecord | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT * FROM mdl_uploads WHERE upload_id = :id", {"id": upload_id}
            )
        return None if row is None else UploadRecord.from_row(row)

    async def record_chunk(self, upload_id: str, index: int, length: int, now_ms: int) -> bool:
        """Count chunk ``index`` as received; False if it was already (a repeat)."""
        async with self.db.transaction() as tx:
            added = await tx.execute(
                "INSERT INTO mdl_upload_chunks (upload_id, idx, length, received_at)"
                " VALUES (:id, :i, :n, :at) ON CONFLICT (upload_id, idx) DO NOTHING",
                {"id": upload_id, "i": index, "n": length, "at": now_ms},
            )
            if added:
                await tx.execute(
                    "UPDATE mdl_uploads SET updated_at = :at WHERE upload_id = :id",
                    {"id": upload_id, "at": now_ms},
                )
        return added == 1

    async def received_chunks(self, upload_id: str) -> set[int]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT idx FROM mdl_upload_chunks WHERE upload_id = :id", {"id": upload_id}
            )
        return {_int(row["idx"]) for row in rows}

    async def stale_uploads(self, before_ms: int) -> list[str]:
        """Uploads not touched since ``before_ms`` (to purge)."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT upload_id FROM mdl_uploads WHERE updated_at < :before ORDER BY upload_id",
                {"before": before_ms},
            )
        return [_str(row["upload_id"]) for row in rows]

    async def current_tier(self, name: str) -> Tier | None:
        """The tier of the model's highest version not revoked, if any."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT tier FROM mdl_versions WHERE name = :n AND revoked = FALSE"
                " ORDER BY version DESC LIMIT 1",
                {"n": name},
            )
        return None if row is None else Tier(_str(row["tier"]))

    async def drop_upload(self, upload_id: str) -> None:
        """Forget an upload whose bytes turned out wrong (the next begin starts afresh)."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "DELETE FROM mdl_upload_chunks WHERE upload_id = :id", {"id": upload_id}
            )
            await tx.execute("DELETE FROM mdl_uploads WHERE upload_id = :id", {"id": upload_id})

    # ------------------------------------------------------------------ versions
    async def publish(self, record: VersionRecord, upload_id: str, chunks: ChunkList) -> int:
        """Store a verified version, end its upload and bump the model's metadata counter
        (returned). Refuses a version not above every stored one of the model."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT max(version) AS v FROM mdl_versions WHERE name = :n", {"n": record.name}
            )
            highest = None if row is None or row["v"] is None else _int(row["v"])
            check_monotonic(record.version, [] if highest is None else [highest])
            await tx.execute(
                "INSERT INTO mdl_versions (name, version, tier, provenance, signature,"
                " signer_cert, signer, blob_digest, blob_size, model_digest, sealed_key,"
                " expires_at, published_at, published_by, revoked) VALUES (:n, :v, :tier, :prov,"
                " :sig, :cert, :signer, :digest, :size, :model, :sealed, :exp, :at, :by, FALSE)",
                {
                    "n": record.name,
                    "v": record.version,
                    "tier": str(record.tier),
                    "prov": record.provenance,
                    "sig": record.signature,
                    "cert": record.signer_cert,
                    "signer": record.signer,
                    "digest": record.blob_digest,
                    "size": record.blob_size,
                    "model": record.model_digest,
                    "sealed": record.sealed_key,
                    "exp": record.expires_at,
                    "at": record.published_at,
                    "by": record.published_by,
                },
            )
            await _save_chunks(tx, chunks)
            await tx.execute(
                "DELETE FROM mdl_upload_chunks WHERE upload_id = :id", {"id": upload_id}
            )
            await tx.execute("DELETE FROM mdl_uploads WHERE upload_id = :id", {"id": upload_id})
            return await bump_meta(tx, record.name)

    async def version(self, name: str, version: int) -> VersionRecord | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT * FROM mdl_versions WHERE name = :n AND version = :v",
                {"n": name, "v": version},
            )
        return None if row is None else VersionRecord.from_row(row)

    async def versions(self, name: str | None = None) -> list[VersionRecord]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM mdl_versions WHERE (CAST(:n AS TEXT) IS NULL OR name = :n)"
                " ORDER BY name, version",
                {"n": name},
            )
        return [VersionRecord.from_row(row) for row in rows]

    async def highest_version(self, name: str) -> int | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT max(version) AS v FROM mdl_versions WHERE name = :n", {"n": name}
            )
        return None if row is None or row["v"] is None else _int(row["v"])

    async def revoke(self, name: str, version: int, reason: str, actor: str, now_ms: int) -> bool:
        """Mark a version revoked (False if it already was); ``model.unknown`` if absent."""
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE mdl_versions SET revoked = TRUE, revoked_reason = :r, revoked_at = :at,"
                " revoked_by = :by WHERE name = :n AND version = :v AND revoked = FALSE",
                {"n": name, "v": version, "r": reason, "at": now_ms, "by": actor},
            )
            if changed == 0:
                exists = await tx.fetch_one(
                    "SELECT version FROM mdl_versions WHERE name = :n AND version = :v",
                    {"n": name, "v": version},
                )
                if exists is None:
                    raise PolicyError(ModelReason.UNKNOWN, f"{name} v{version}")
                return False
            await bump_meta(tx, name)
        return True

    async def meta_version(self, name: str) -> int:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT meta_version FROM mdl_meta WHERE name = :n", {"n": name}
            )
        return 0 if row is None else _int(row["meta_version"])

    # ------------------------------------------------------------------ rollouts
    async def roll_out(  # noqa: PLR0917 - the request's fields and who made it when
        self,
        name: str,
        version: int,
        devices: Sequence[str],
        percent: int,
        actor: str,
        now_ms: int,
    ) -> tuple[Rollout, bool]:
        """Apply a rollout request; returns the rollout and whether it changed."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT revoked FROM mdl_versions WHERE name = :n AND version = :v",
                {"n": name, "v": version},
            )
            if row is None:
                raise PolicyError(ModelReason.UNKNOWN, f"{name} v{version} is not published")
            if bool(row["revoked"]):
                raise PolicyError(ModelReason.VERSION_REVOKED, f"{name} v{version}")
            gated = await tx.fetch_one(
                "SELECT phase FROM mdl_plans WHERE name = :n AND version = :v",
                {"n": name, "v": version},
            )
            if gated is not None:
                raise PolicyError(
                    ModelReason.ROLLOUT_STATE, "a gated rollout moves by promote, not by hand"
                )
            current = await read_rollout(tx, name, version)
            new = promote(current, name, version, devices, percent)
            if new is None:
                if current is None:  # pragma: no cover - promote never returns None then
                    raise RuntimeError("no rollout")
                return current, False
            await tx.execute(
                "INSERT INTO mdl_rollouts (name, version, percent, wave, updated_at, updated_by)"
                " VALUES (:n, :v, :p, :w, :at, :by) ON CONFLICT (name, version) DO UPDATE SET"
                " percent = excluded.percent, wave = excluded.wave,"
                " updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                {
                    "n": name,
                    "v": version,
                    "p": new.percent,
                    "w": new.wave,
                    "at": now_ms,
                    "by": actor,
                },
            )
            added = new.cohort - (current.cohort if current else frozenset())
            for device_id in sorted(added):
                await tx.execute(
                    "INSERT INTO mdl_cohorts (name, version, device_id, added_at)"
                    " VALUES (:n, :v, :d, :at) ON CONFLICT (name, version, device_id) DO NOTHING",
                    {"n": name, "v": version, "d": device_id, "at": now_ms},
                )
            await bump_meta(tx, name)
        return new, True

    async def rollout(self, name: str, version: int) -> Rollout | None:
        async with self.db.transaction() as tx:
            return await read_rollout(tx, name, version)

    async def assignments(self, device_id: str, name: str | None = None) -> list[Assignment]:
        """The version of each model (or of ``name``) assigned to ``device_id`` now."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT v.name AS name, v.version AS version, v.revoked AS revoked,"
                " r.percent AS percent, r.wave AS wave FROM mdl_versions v JOIN mdl_rollouts r"
                " ON r.name = v.name AND r.version = v.version"
                " WHERE (CAST(:n AS TEXT) IS NULL OR v.name = :n)",
                {"n": name},
            )
            member_rows = await tx.fetch_all(
                "SELECT name, version FROM mdl_cohorts WHERE device_id = :d"
                " AND (CAST(:n AS TEXT) IS NULL OR name = :n)",
                {"d": device_id, "n": name},
            )
            members = {(_str(r["name"]), _int(r["version"])) for r in member_rows}
            by_model: dict[str, list[Candidate]] = {}
            for row in rows:
                model, version = _str(row["name"]), _int(row["version"])
                # the cohort as far as this device is concerned: itself, or nobody
                cohort = frozenset({device_id}) if (model, version) in members else frozenset()
                rollout = Rollout(model, version, cohort, _int(row["percent"]), _int(row["wave"]))
                candidate = Candidate(version, bool(row["revoked"]), rollout)
                by_model.setdefault(model, []).append(candidate)
            result = []
            for model, candidates in sorted(by_model.items()):
                chosen = assigned(device_id, candidates)
                if chosen is None or chosen.rollout is None:
                    continue
                record_row = await tx.fetch_one(
                    "SELECT * FROM mdl_versions WHERE name = :n AND version = :v",
                    {"n": model, "v": chosen.version},
                )
                meta_row = await tx.fetch_one(
                    "SELECT meta_version FROM mdl_meta WHERE name = :n", {"n": model}
                )
                if record_row is None or meta_row is None:  # pragma: no cover - same tx
                    raise RuntimeError("assignment vanished")
                reverted = await tx.fetch_one(
                    "SELECT max(version) AS v FROM mdl_plans WHERE name = :n AND version > :v"
                    " AND phase IN ('aborted', 'rolled-back')",
                    {"n": model, "v": chosen.version},
                )
                result.append(
                    Assignment(
                        VersionRecord.from_row(record_row),
                        chosen.rollout,
                        _int(meta_row["meta_version"]),
                        None if reverted is None or reverted["v"] is None else _int(reverted["v"]),
                    )
                )
        return result

    # ------------------------------------------------------------------ chunk lists
    async def chunk_list(self, blob_digest: str, chunk_size: int) -> list[str] | None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT digests FROM mdl_blob_chunks WHERE blob_digest = :d AND chunk_size = :c",
                {"d": blob_digest, "c": chunk_size},
            )
        return None if row is None else ChunkList.unpack(_bytes(row["digests"]))

    async def save_chunk_list(self, chunks: ChunkList) -> None:
        async with self.db.transaction() as tx:
            await _save_chunks(tx, chunks)

    # ------------------------------------------------------------------ devices
    async def see_device(self, device_id: str, now_ms: int) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO mdl_devices (device_id, first_seen, last_seen) VALUES (:d, :at, :at)"
                " ON CONFLICT (device_id) DO UPDATE SET last_seen = excluded.last_seen",
                {"d": device_id, "at": now_ms},
            )

    async def seen_devices(self) -> list[str]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all("SELECT device_id FROM mdl_devices ORDER BY device_id")
        return [_str(row["device_id"]) for row in rows]

    async def record_activation(self, name: str, activation: Activation) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO mdl_activations (device_id, name, version, state, reason, at)"
                " VALUES (:d, :n, :v, :s, :r, :at) ON CONFLICT (device_id, name, version)"
                " DO UPDATE SET state = excluded.state, reason = excluded.reason,"
                " at = excluded.at",
                {
                    "d": activation.device_id,
                    "n": name,
                    "v": activation.version,
                    "s": activation.state,
                    "r": activation.reason,
                    "at": activation.at,
                },
            )

    async def activations(self, name: str, version: int) -> list[Activation]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM mdl_activations WHERE name = :n AND version = :v ORDER BY device_id",
                {"n": name, "v": version},
            )
        return [
            Activation(
                device_id=_str(row["device_id"]),
                version=_int(row["version"]),
                state="active" if row["state"] == "active" else "failed",
                reason=_str(row["reason"]),
                at=_int(row["at"]),
            )
            for row in rows
        ]

    # ------------------------------------------------------------------ key log
    async def log_key_decision(self, decision: KeyDecision) -> None:
        async with self.db.transaction() as tx:
            row = await tx.fetch_one("SELECT coalesce(max(seq), 0) + 1 AS n FROM mdl_key_log")
            seq = 1 if row is None else _int(row["n"])
            await tx.execute(
                "INSERT INTO mdl_key_log (seq, at, device_id, name, version, decision,"
                " reason, result_id) VALUES (:seq, :at, :d, :n, :v, :dec, :r, :res)",
                {
                    "seq": seq,
                    "at": decision.at,
                    "d": decision.device_id,
                    "n": decision.name,
                    "v": decision.version,
                    "dec": "released" if decision.released else "refused",
                    "r": decision.reason,
                    "res": decision.result_id,
                },
            )

    async def key_log(self, device_id: str | None = None) -> list[KeyDecision]:
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM mdl_key_log WHERE (CAST(:d AS TEXT) IS NULL OR device_id = :d)"
                " ORDER BY seq",
                {"d": device_id},
            )
        return _decisions(rows)

    async def key_log_of(self, name: str, version: int) -> list[KeyDecision]:
        """Every key decision about one version, oldest first."""
        async with self.db.transaction() as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM mdl_key_log WHERE name = :n AND version = :v ORDER BY seq",
                {"n": name, "v": version},
            )
        return _decisions(rows)


def _decisions(rows: Sequence[Row]) -> list[KeyDecision]:
    return [
        KeyDecision(
            at=_int(row["at"]),
            device_id=_str(row["device_id"]),
            name=_str(row["name"]),
            version=_int(row["version"]),
            released=row["decision"] == "released",
            reason=_str(row["reason"]),
            result_id=None if row["result_id"] is None else _str(row["result_id"]),
        )
        for row in rows
    ]


@dataclass(frozen=True, slots=True)
class ChunkList:
    """The SHA-256 of every chunk of a blob at one chunk size (stored packed, 32 B each)."""

    blob_digest: str
    chunk_size: int
    digests: tuple[str, ...]

    def pack(self) -> bytes:
        return b"".join(bytes.fromhex(d) for d in self.digests)

    @staticmethod
    def unpack(packed: bytes) -> list[str]:
        return [packed[i : i + 32].hex() for i in range(0, len(packed), 32)]


async def _save_chunks(tx: Transaction, chunks: ChunkList) -> None:
    await tx.execute(
        "INSERT INTO mdl_blob_chunks (blob_digest, chunk_size, digests) VALUES (:d, :c, :p)"
        " ON CONFLICT (blob_digest, chunk_size) DO NOTHING",
        {"d": chunks.blob_digest, "c": chunks.chunk_size, "p": chunks.pack()},
    )


async def bump_meta(tx: Transaction, name: str) -> int:
    row = await tx.fetch_one(
        "INSERT INTO mdl_meta (name, meta_version) VALUES (:n, 1) ON CONFLICT (name)"
        " DO UPDATE SET meta_version = mdl_meta.meta_version + 1 RETURNING meta_version",
        {"n": name},
    )
    if row is None:  # pragma: no cover - RETURNING always yields the row
        raise RuntimeError("meta version not returned")
    return _int(row["meta_version"])


async def read_rollout(tx: Transaction, name: str, version: int) -> Rollout | None:
    row = await tx.fetch_one(
        "SELECT percent, wave FROM mdl_rollouts WHERE name = :n AND version = :v",
        {"n": name, "v": version},
    )
    if row is None:
        return None
    members = await tx.fetch_all(
        "SELECT device_id FROM mdl_cohorts WHERE name = :n AND version = :v",
        {"n": name, "v": version},
    )
    cohort = frozenset(_str(m["device_id"]) for m in members)
    return Rollout(name, version, cohort, _int(row["percent"]), _int(row["wave"]))


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected text from the database, got {type(value).__name__}")
    return value


def _int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer from the database, got {type(value).__name__}")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from the database, got {type(value).__name__}")
    return value
