"""The attestation service's state: registry, pending enrollments, challenges, policies,
rebind approvals and an audit trail, through the shared storage layer (SQLite by default).

Everything another instance of the service may need lives here, not in memory: the proof
of an enrollment or the evidence for a challenge may reach any instance behind the shared
subscription. Single use is enforced by the database (``UPDATE ... WHERE used = FALSE``),
so two instances cannot both accept one nonce. Enrollment secrets are kept only until the
proof arrives or the challenge expires, and never logged.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import msgspec

from edgeward_attestation.ima import ImaProgress
from edgeward_attestation.policy import (
    ClassPolicy,
    PostureRequirements,
    decode_policy,
    encode_policy,
)
from edgeward_attestation.quote import ClockState
from edgeward_shared.storage.base import Database, Row, Transaction
from edgeward_shared.storage.migrations import Migration, migrate

COMPONENT: Final = "attestation"
MIGRATIONS: Final = (
    Migration(
        1,
        "registry, enrollments, challenges, policies, rebinds, audit",
        (
            """CREATE TABLE att_devices (
                device_id TEXT PRIMARY KEY,
                device_class TEXT NOT NULL,
                ek_fingerprint TEXT NOT NULL,
                ak_public BLOB NOT NULL,
                enrolled_at BIGINT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('enrolled', 'trusted', 'untrusted')),
                reason TEXT NOT NULL,
                policy_id TEXT,
                last_attested_at BIGINT,
                ear_expires_at BIGINT,
                reset_count BIGINT,
                restart_count BIGINT,
                clock BIGINT,
                certificate_serial TEXT
            )""",
            """CREATE TABLE att_enrollments (
                challenge_mid TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                device_class TEXT NOT NULL,
                ek_fingerprint TEXT NOT NULL,
                ak_public BLOB NOT NULL,
                csr BLOB NOT NULL,
                secret BLOB NOT NULL,
                expires_at BIGINT NOT NULL
            )""",
            """CREATE TABLE att_challenges (
                challenge_mid TEXT PRIMARY KEY,
                device_id TEXT NOT NULL,
                nonce BLOB NOT NULL,
                expires_at BIGINT NOT NULL,
                used BOOLEAN NOT NULL
            )""",
            """CREATE TABLE att_policies (
                policy_id TEXT PRIMARY KEY,
                device_class TEXT NOT NULL,
                selection TEXT NOT NULL,
                body BLOB,
                reference_device TEXT,
                recorded_by TEXT NOT NULL,
                recorded_at BIGINT NOT NULL,
                approved_by TEXT,
                approved_at BIGINT
            )""",
            """CREATE TABLE att_rebinds (
                device_id TEXT PRIMARY KEY,
                ek_fingerprint TEXT NOT NULL,
                approved_by TEXT NOT NULL,
                approved_at BIGINT NOT NULL
            )""",
            """CREATE TABLE att_audit (
                event_id TEXT PRIMARY KEY,
                at BIGINT NOT NULL,
                device_id TEXT NOT NULL,
                event TEXT NOT NULL,
                reason TEXT NOT NULL,
                actor TEXT NOT NULL
            )""",
            "CREATE INDEX IF NOT EXISTS att_audit_device ON att_audit (device_id, at)",
            # one TPM, one device id: an EK bound to an id cannot enroll another
            "CREATE UNIQUE INDEX IF NOT EXISTS att_devices_ek ON att_devices (ek_fingerprint)",
            """CREATE TABLE att_provisioned (
                device_id TEXT PRIMARY KEY,
                device_class TEXT NOT NULL,
                ek_fingerprint TEXT,
                provisioned_by TEXT NOT NULL,
                provisioned_at BIGINT NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "the findings of a device's last verdict (boot event log appraisal, docs/adr/0021)",
        (
            "ALTER TABLE att_devices ADD COLUMN findings TEXT",
            # a policy recorded to also allow another's states (a firmware rollout)
            "ALTER TABLE att_policies ADD COLUMN keep_from TEXT",
        ),
    ),
    Migration(
        3,
        "a device's last posture report, a recording policy's posture requirements (ADR 0026)",
        (
            "ALTER TABLE att_devices ADD COLUMN posture BLOB",
            "ALTER TABLE att_policies ADD COLUMN posture TEXT",
        ),
    ),
    Migration(
        4,
        "how much of a device's IMA log is verified, per boot and policy (docs/adr/0033)",
        (
            "ALTER TABLE att_devices ADD COLUMN ima_policy_id TEXT",
            "ALTER TABLE att_devices ADD COLUMN ima_reset_count BIGINT",
            "ALTER TABLE att_devices ADD COLUMN ima_entries BIGINT",
            "ALTER TABLE att_devices ADD COLUMN ima_pcr TEXT",
        ),
    ),
    Migration(
        5,
        "a version per device verdict and its last request: shared by instances (ADR 0034)",
        (
            "ALTER TABLE att_devices ADD COLUMN verdict_version BIGINT NOT NULL DEFAULT 0",
            "ALTER TABLE att_devices ADD COLUMN asked_at BIGINT",
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    device_id: str
    device_class: str
    ek_fingerprint: str
    ak_public: bytes
    enrolled_at: int
    state: str
    reason: str
    policy_id: str | None
    last_attested_at: int | None
    ear_expires_at: int | None
    clock_state: ClockState | None
    certificate_serial: str | None
    #: why the last verdict was what it was, event by event (empty unless it was refused)
    findings: tuple[str, ...] = ()
    #: the posture report (its bytes) of the last evidence whose quote bound it
    posture: bytes | None = None
    #: bumped by every verdict: an affirming one is written only over the version it read
    verdict_version: int = 0

    @classmethod
    def from_row(cls, row: Row) -> DeviceRecord:
        counters = (row["reset_count"], row["restart_count"], row["clock"])
        state = ClockState(*(int(str(v)) for v in counters)) if None not in counters else None
        return cls(
            device_id=str(row["device_id"]),
            device_class=str(row["device_class"]),
            ek_fingerprint=str(row["ek_fingerprint"]),
            ak_public=_blob(row["ak_public"]),
            enrolled_at=int(str(row["enrolled_at"])),
            state=str(row["state"]),
            reason=str(row["reason"]),
            policy_id=_opt_str(row["policy_id"]),
            last_attested_at=_opt_int(row["last_attested_at"]),
            ear_expires_at=_opt_int(row["ear_expires_at"]),
            clock_state=state,
            certificate_serial=_opt_str(row["certificate_serial"]),
            findings=_findings(row["findings"]),
            posture=None if row["posture"] is None else _blob(row["posture"]),
            verdict_version=int(str(row["verdict_version"])),
        )


@dataclass(frozen=True, slots=True)
class PolicyRow:
    policy_id: str
    device_class: str
    selection: list[int]
    policy: ClassPolicy | None  # None while waiting for the reference device's quote
    reference_device: str | None
    recorded_by: str
    approved_by: str | None
    approved_at: int | None
    keep_from: str | None = None  # merged into this one when its values arrive
    #: a recording policy's posture requirements, until its values arrive
    posture: PostureRequirements | None = None

    @classmethod
    def from_row(cls, row: Row) -> PolicyRow:
        body = row["body"]
        return cls(
            policy_id=str(row["policy_id"]),
            device_class=str(row["device_class"]),
            selection=[int(i) for i in str(row["selection"]).split(",")],
            policy=decode_policy(_blob(body)) if body is not None else None,
            reference_device=_opt_str(row["reference_device"]),
            recorded_by=str(row["recorded_by"]),
            approved_by=_opt_str(row["approved_by"]),
            approved_at=_opt_int(row["approved_at"]),
            keep_from=_opt_str(row["keep_from"]),
            posture=None
            if row["posture"] is None
            else msgspec.json.decode(str(row["posture"]), type=PostureRequirements),
        )


@dataclass(frozen=True, slots=True)
class PendingEnrollment:
    challenge_mid: str
    device_id: str
    device_class: str
    ek_fingerprint: str
    ak_public: bytes
    csr: bytes
    secret: bytes
    expires_at: int

    def __repr__(self) -> str:  # the secret never reaches a log line
        return f"PendingEnrollment({self.device_id}, challenge={self.challenge_mid})"


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from the database, got {type(value).__name__}")
    return value


def _findings(value: object) -> tuple[str, ...]:
    return () if value is None else tuple(msgspec.json.decode(str(value), type=list[str]))


def _opt_int(value: object) -> int | None:
    return None if value is None else int(str(value))


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


class AttestationStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def migrate(self) -> None:
        await migrate(self.db, component=COMPONENT, migrations=MIGRATIONS)

    # ------------------------------------------------------------------ registry
    async def device(self, device_id: str) -> DeviceRecord | None:
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT * FROM att_devices WHERE device_id = :d", {"d": device_id}
            )
        return DeviceRecord.from_row(row) if row else None

    async def devices(self) -> list[DeviceRecord]:
        async with self.db.transaction(read_only=True) as tx:
            rows = await tx.fetch_all("SELECT * FROM att_devices ORDER BY device_id", {})
        return [DeviceRecord.from_row(row) for row in rows]

    async def register(
        self, pending: PendingEnrollment, *, serial: str, now_ms: int, actor: str
    ) -> None:
        """Bind the device id to its EK and AK (replacing an approved rebind) and audit it.

        Re-enrolling with the same EK (a device back from a long absence) keeps the TPM's
        reset/restart counters and clock: they belong to the TPM, and a quote must still
        not go back in time after the re-enrollment."""
        async with self.db.transaction() as tx:
            kept = await tx.fetch_one(
                "SELECT reset_count, restart_count, clock FROM att_devices"
                " WHERE device_id = :d AND ek_fingerprint = :ek",
                {"d": pending.device_id, "ek": pending.ek_fingerprint},
            )
            await tx.execute(
                "DELETE FROM att_devices WHERE device_id = :d", {"d": pending.device_id}
            )
            await tx.execute(
                "INSERT INTO att_devices (device_id, device_class, ek_fingerprint, ak_public,"
                " enrolled_at, state, reason, certificate_serial, reset_count, restart_count,"
                " clock) VALUES (:d, :c, :ek, :ak, :at, 'enrolled', 'enroll.completed',"
                " :serial, :rc, :sc, :clk)",
                {
                    "d": pending.device_id,
                    "c": pending.device_class,
                    "ek": pending.ek_fingerprint,
                    "ak": pending.ak_public,
                    "at": now_ms,
                    "serial": serial,
                    "rc": kept["reset_count"] if kept else None,
                    "sc": kept["restart_count"] if kept else None,
                    "clk": kept["clock"] if kept else None,
                },
            )
            await tx.execute(
                "DELETE FROM att_enrollments WHERE device_id = :d", {"d": pending.device_id}
            )
            await tx.execute(
                "DELETE FROM att_rebinds WHERE device_id = :d", {"d": pending.device_id}
            )
            await _audit(tx, pending.device_id, "enrolled", "enroll.completed", actor, now_ms)

    async def record_verdict(
        self,
        device_id: str,
        *,
        trusted: bool,
        reason: str,
        policy_id: str | None,
        now_ms: int,
        ear_expires_at: int | None = None,
        clock_state: ClockState | None = None,
        findings: Sequence[str] = (),
        posture: bytes | None = None,
        read_version: int | None = None,
    ) -> bool:
        """The outcome of one attestation (counters only move on an accepted quote) and
        its findings (the events that differ; replaced by every verdict). ``posture``: the
        report the verified quote bound, kept as the device's last posture (None: the
        last one stays).

        ``read_version``: the device's ``verdict_version`` when its counters were read for
        this verdict. The verdict is then written only if no other verdict landed since
        (compare and set: another instance may have judged a newer quote meanwhile, and
        counters must never move back); False if it did not. A refusal passes ``None``:
        it always lands, because a failed attestation must never be lost to a race."""
        params: dict[str, object] = {
            "d": device_id,
            "state": "trusted" if trusted else "untrusted",
            "reason": reason,
            "p": policy_id,
            "at": now_ms,
            "exp": ear_expires_at,
            "f": msgspec.json.encode(list(findings)).decode() if findings else None,
        }
        sql = (
            "UPDATE att_devices SET state = :state, reason = :reason, policy_id = :p,"
            " last_attested_at = :at, ear_expires_at = :exp, findings = :f,"
            " verdict_version = verdict_version + 1"
        )
        if clock_state is not None:
            sql += ", reset_count = :rc, restart_count = :sc, clock = :clk"
            params |= {
                "rc": clock_state.reset_count,
                "sc": clock_state.restart_count,
                "clk": clock_state.clock,
            }
        if posture is not None:
            sql += ", posture = :posture"
            params["posture"] = posture
        where = " WHERE device_id = :d"
        if read_version is not None:
            where += " AND verdict_version = :v"
            params["v"] = read_version
        async with self.db.transaction() as tx:
            if await tx.execute(sql + where, params) == 0:
                return False
            event = "attested" if trusted else "attestation.failed"
            await _audit(tx, device_id, event, reason, "svc.attestation", now_ms)
        return True

    async def ima_progress(self, device_id: str, policy_id: str) -> ImaProgress | None:
        """What the verifier verified of the device's IMA log under ``policy_id`` (another
        policy's progress does not count: its allowlist may differ)."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "SELECT ima_reset_count, ima_entries, ima_pcr FROM att_devices"
                " WHERE device_id = :d AND ima_policy_id = :p",
                {"d": device_id, "p": policy_id},
            )
        if row is None or row["ima_pcr"] is None:
            return None
        return ImaProgress(
            int(str(row["ima_reset_count"])),
            int(str(row["ima_entries"])),
            bytes.fromhex(str(row["ima_pcr"])),
        )

    async def set_ima_progress(
        self, device_id: str, policy_id: str | None, progress: ImaProgress | None
    ) -> None:
        """Remember (or forget, with None) the device's verified IMA progress."""
        params: dict[str, object] = {
            "d": device_id,
            "p": policy_id if progress else None,
            "rc": progress.reset_count if progress else None,
            "n": progress.entries if progress else None,
            "v": progress.pcr.hex() if progress else None,
        }
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE att_devices SET ima_policy_id = :p, ima_reset_count = :rc,"
                " ima_entries = :n, ima_pcr = :v WHERE device_id = :d",
                params,
            )

    async def renew_serial(
        self, device_id: str, previous: str, serial: str, *, now_ms: int, actor: str
    ) -> bool:
        """The device now runs on ``serial`` (a renewal of ``previous``, docs/adr/0015);
        False if ``previous`` is not its current serial (a stale or foreign event)."""
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE att_devices SET certificate_serial = :s"
                " WHERE device_id = :d AND certificate_serial = :p",
                {"s": serial, "d": device_id, "p": previous},
            )
            if changed:
                await _audit(tx, device_id, "renewed", "identity.renewed", actor, now_ms)
        return changed == 1

    async def claim_request(self, device_id: str, now_ms: int, interval_ms: int) -> bool:
        """Whether the device may be challenged on its request now: not asked within
        ``interval_ms`` (compare and set, so the bound holds across every instance)."""
        async with self.db.transaction(durable=False) as tx:
            claimed = await tx.execute(
                "UPDATE att_devices SET asked_at = :now WHERE device_id = :d"
                " AND (asked_at IS NULL OR asked_at <= :cutoff)",
                {"d": device_id, "now": now_ms, "cutoff": now_ms - interval_ms},
            )
        return claimed == 1

    # ------------------------------------------------------------------ enrollments
    async def add_enrollment(self, pending: PendingEnrollment) -> None:
        """Store a pending enrollment; it replaces any older one of the same device (one
        open enrollment per device; the scheduler purges expired ones of everyone)."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "DELETE FROM att_enrollments WHERE device_id = :d", {"d": pending.device_id}
            )
            await tx.execute(
                "INSERT INTO att_enrollments (challenge_mid, device_id, device_class,"
                " ek_fingerprint, ak_public, csr, secret, expires_at) VALUES (:m, :d, :c, :ek,"
                " :ak, :csr, :s, :exp)",
                {
                    "m": pending.challenge_mid,
                    "d": pending.device_id,
                    "c": pending.device_class,
                    "ek": pending.ek_fingerprint,
                    "ak": pending.ak_public,
                    "csr": pending.csr,
                    "s": pending.secret,
                    "exp": pending.expires_at,
                },
            )

    async def take_enrollment(
        self, challenge_mid: str, device_id: str, now_ms: int
    ) -> PendingEnrollment | None:
        """Remove and return the pending enrollment of a challenge to ``device_id`` (single
        use: a wrong proof spends it too; an expired one is returned for the caller to
        refuse by name); other expired enrollments are purged on the way."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "DELETE FROM att_enrollments WHERE challenge_mid = :m AND device_id = :d"
                " RETURNING *",
                {"m": challenge_mid, "d": device_id},
            )
            await tx.execute("DELETE FROM att_enrollments WHERE expires_at < :now", {"now": now_ms})
        if row is None:
            return None
        return PendingEnrollment(
            challenge_mid=str(row["challenge_mid"]),
            device_id=str(row["device_id"]),
            device_class=str(row["device_class"]),
            ek_fingerprint=str(row["ek_fingerprint"]),
            ak_public=_blob(row["ak_public"]),
            csr=_blob(row["csr"]),
            secret=_blob(row["secret"]),
            expires_at=int(str(row["expires_at"])),
        )

    async def device_with_ek(self, ek_fingerprint: str) -> str | None:
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT device_id FROM att_devices WHERE ek_fingerprint = :ek",
                {"ek": ek_fingerprint},
            )
        return None if row is None else str(row["device_id"])

    async def provision(
        self, device_id: str, device_class: str, ek_fingerprint: str | None, actor: str, now_ms: int
    ) -> None:
        """An operator's record that ``device_id`` exists, is of ``device_class`` and
        (optionally) has the TPM with that EK: enrollment needs it (not the device's word)."""
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO att_provisioned (device_id, device_class, ek_fingerprint,"
                " provisioned_by, provisioned_at) VALUES (:d, :c, :ek, :a, :at)"
                " ON CONFLICT (device_id) DO UPDATE SET device_class = excluded.device_class,"
                " ek_fingerprint = excluded.ek_fingerprint,"
                " provisioned_by = excluded.provisioned_by,"
                " provisioned_at = excluded.provisioned_at",
                {"d": device_id, "c": device_class, "ek": ek_fingerprint, "a": actor, "at": now_ms},
            )
            await _audit(tx, device_id, "provisioned", device_class, actor, now_ms)

    async def provisioned(self, device_id: str) -> tuple[str, str | None] | None:
        """(device class, expected EK fingerprint or None) as an operator provisioned it."""
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT device_class, ek_fingerprint FROM att_provisioned WHERE device_id = :d",
                {"d": device_id},
            )
        return None if row is None else (str(row["device_class"]), _opt_str(row["ek_fingerprint"]))

    async def purge_expired(self, now_ms: int) -> int:
        """Forget spent or expired challenges and expired enrollments (the scheduler calls it)."""
        async with self.db.transaction() as tx:
            gone = await tx.execute(
                "DELETE FROM att_challenges WHERE expires_at < :t OR used = TRUE", {"t": now_ms}
            )
            gone += await tx.execute(
                "DELETE FROM att_enrollments WHERE expires_at < :t", {"t": now_ms}
            )
        return gone

    async def rebind_approved_for(self, device_id: str) -> str | None:
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT ek_fingerprint FROM att_rebinds WHERE device_id = :d", {"d": device_id}
            )
        return None if row is None else str(row["ek_fingerprint"])

    async def approve_rebind(
        self, device_id: str, ek_fingerprint: str, actor: str, now_ms: int
    ) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO att_rebinds (device_id, ek_fingerprint, approved_by, approved_at)"
                " VALUES (:d, :ek, :a, :at) ON CONFLICT (device_id) DO UPDATE SET"
                " ek_fingerprint = excluded.ek_fingerprint, approved_by = excluded.approved_by,"
                " approved_at = excluded.approved_at",
                {"d": device_id, "ek": ek_fingerprint, "a": actor, "at": now_ms},
            )
            await _audit(tx, device_id, "rebind.approved", "enroll.rebind.approved", actor, now_ms)

    # ------------------------------------------------------------------ challenges
    async def add_challenge(
        self, challenge_mid: str, device_id: str, nonce: bytes, expires_at: int
    ) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(  # one open challenge per device: older ones are spent
                "UPDATE att_challenges SET used = TRUE WHERE device_id = :d AND used = FALSE",
                {"d": device_id},
            )
            await tx.execute(
                "INSERT INTO att_challenges (challenge_mid, device_id, nonce, expires_at, used)"
                " VALUES (:m, :d, :n, :exp, FALSE)",
                {"m": challenge_mid, "d": device_id, "n": nonce, "exp": expires_at},
            )

    async def open_challenge(
        self, device_id: str, valid_until_ms: int
    ) -> tuple[str, bytes, int] | None:
        """The device's open challenge (mid, nonce, expiry) if it is still valid at
        ``valid_until_ms``; None if it has none (used, retired, or expiring before)."""
        async with self.db.transaction(durable=False) as tx:
            row = await tx.fetch_one(
                "SELECT challenge_mid, nonce, expires_at FROM att_challenges"
                " WHERE device_id = :d AND used = FALSE AND expires_at > :t"
                " ORDER BY expires_at DESC LIMIT 1",
                {"d": device_id, "t": valid_until_ms},
            )
        if row is None:
            return None
        return str(row["challenge_mid"]), _blob(row["nonce"]), int(str(row["expires_at"]))

    async def use_challenge(self, challenge_mid: str, device_id: str) -> tuple[bytes, int] | None:
        """Mark a challenge used and return (nonce, expiry), or None if unknown, another
        device's, or already used: the one place a nonce is consumed."""
        async with self.db.transaction() as tx:
            row = await tx.fetch_one(
                "UPDATE att_challenges SET used = TRUE WHERE challenge_mid = :m AND"
                " device_id = :d AND used = FALSE RETURNING nonce, expires_at",
                {"m": challenge_mid, "d": device_id},
            )
        if row is None:
            return None
        return _blob(row["nonce"]), int(str(row["expires_at"]))

    # ------------------------------------------------------------------ policies
    async def record_policy(
        self,
        policy: ClassPolicy | None,
        *,
        policy_id: str,
        device_class: str,
        selection: list[int],
        reference_device: str | None,
        actor: str,
        now_ms: int,
        keep_from: str | None = None,
        posture: PostureRequirements | None = None,
    ) -> bool:
        """Record a policy pending approval: with its values (``policy``), or to be filled
        from ``reference_device``'s next quote (then merged with ``keep_from``'s, requiring
        ``posture``). False if the id is taken."""
        async with self.db.transaction() as tx:
            added = await tx.execute(
                "INSERT INTO att_policies (policy_id, device_class, selection, body,"
                " reference_device, recorded_by, recorded_at, keep_from, posture) VALUES (:p,"
                " :c, :sel, :b, :ref, :a, :at, :keep, :posture) ON CONFLICT (policy_id) DO"
                " NOTHING",
                {
                    "p": policy_id,
                    "c": device_class,
                    "sel": ",".join(str(i) for i in sorted(selection)),
                    "b": encode_policy(policy) if policy else None,
                    "ref": reference_device,
                    "a": actor,
                    "at": now_ms,
                    "keep": keep_from,
                    "posture": msgspec.json.encode(posture).decode() if posture else None,
                },
            )
            if added:
                await _audit(
                    tx, reference_device or "-", "policy.recorded", policy_id, actor, now_ms
                )
        return added == 1

    async def recording_for(self, device: DeviceRecord) -> PolicyRow | None:
        """The policy of the device's own class waiting for its quote to supply the values:
        a reference device never defines another class's policy."""
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT * FROM att_policies WHERE reference_device = :d AND device_class = :c"
                " AND body IS NULL ORDER BY recorded_at LIMIT 1",
                {"d": device.device_id, "c": device.device_class},
            )
        return PolicyRow.from_row(row) if row else None

    async def complete_recording(self, policy: ClassPolicy, now_ms: int) -> None:
        async with self.db.transaction() as tx:
            await tx.execute(
                "UPDATE att_policies SET body = :b WHERE policy_id = :p AND body IS NULL",
                {"p": policy.policy_id, "b": encode_policy(policy)},
            )
            await _audit(
                tx, "-", "policy.values_recorded", policy.policy_id, "svc.attestation", now_ms
            )

    async def approve_policy(self, policy_id: str, actor: str, now_ms: int) -> bool:
        """Approve a recorded policy (with values, not yet approved); False otherwise."""
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                "UPDATE att_policies SET approved_by = :a, approved_at = :at"
                " WHERE policy_id = :p AND approved_by IS NULL AND body IS NOT NULL",
                {"p": policy_id, "a": actor, "at": now_ms},
            )
            if changed:
                await _audit(tx, "-", "policy.approved", policy_id, actor, now_ms)
        return changed == 1

    async def active_policy(self, device_class: str) -> ClassPolicy | None:
        """The most recently approved policy of a class."""
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT body FROM att_policies WHERE device_class = :c AND approved_by IS NOT"
                " NULL ORDER BY approved_at DESC, policy_id DESC LIMIT 1",
                {"c": device_class},
            )
        return None if row is None else decode_policy(_blob(row["body"]))

    async def policy(self, policy_id: str) -> PolicyRow | None:
        async with self.db.transaction(read_only=True) as tx:
            row = await tx.fetch_one(
                "SELECT * FROM att_policies WHERE policy_id = :p", {"p": policy_id}
            )
        return PolicyRow.from_row(row) if row else None

    async def policies(self, device_class: str | None) -> list[PolicyRow]:
        async with self.db.transaction(read_only=True) as tx:
            rows = await tx.fetch_all(
                "SELECT * FROM att_policies WHERE (CAST(:c AS TEXT) IS NULL OR device_class = :c)"
                " ORDER BY device_class, recorded_at, policy_id",
                {"c": device_class},
            )
        return [PolicyRow.from_row(row) for row in rows]

    async def audit(self, device_id: str) -> list[Row]:
        async with self.db.transaction(read_only=True) as tx:
            return await tx.fetch_all(
                "SELECT at, event, reason, actor FROM att_audit WHERE device_id = :d"
                " ORDER BY at, event_id",
                {"d": device_id},
            )


async def _audit(  # noqa: PLR0917 - one audit row: every field is required
    tx: Transaction,
    device_id: str,
    event: str,
    reason: str,
    actor: str,
    now_ms: int,
) -> None:
    await tx.execute(
        "INSERT INTO att_audit (event_id, at, device_id, event, reason, actor)"
        " VALUES (:id, :at, :d, :e, :r, :a)",
        {
            "id": secrets.token_hex(16),
            "at": now_ms,
            "d": device_id,
            "e": event,
            "r": reason,
            "a": actor,
        },
    )
