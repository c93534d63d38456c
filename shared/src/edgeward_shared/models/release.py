"""Distribution metadata: a signed, versioned, expiring release document per device and model.

TUF's targets role, cut to what one device needs. The distribution service signs a
:class:`ModelRelease` for each device a model version is assigned to; it binds, in one
signature, the device, the model version and tier, the publisher's provenance manifest and
model-signing bundle, the signer's certificate and the encrypted blob's digest, size and
chunk digests. It travels as a standard envelope sealed for the fleet topic
``ew/v1/fleet/models/<name>`` (owned by the distribution service), so the envelope's
``exp`` is the document's expiry and its ``kid`` the signing certificate. The device keeps
the document and checks it again after a restart.

What a device refuses (reason ids in :class:`~.reasons.ModelReason`):

* rollback: a model version below the highest it has ever accepted for that model, or
  metadata older (``meta_version``) than the newest it has seen, both persisted. One
  exception, the explicit revert of an aborted rollout (docs/adr/0020): a document whose
  ``reverts`` names a version at or above the device's high-water may assign an older
  version, but only with metadata strictly newer than any the device has seen, so an old
  document replayed is still refused;
* freeze: a document past its ``exp`` (the service re-signs on every sync, so a device that
  stops hearing from it sees its metadata expire and alarms);
* mix-and-match: the same version with another provenance, or a document for another
  device; the pieces themselves are bound by the signature, the bundle and the AES-GCM
  associated data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Final

import msgspec

from edgeward_shared.envelope import EnvelopeVerifier, Opened, VerifyPolicy
from edgeward_shared.errors import AuthenticityError, PolicyError, Reason
from edgeward_shared.identity import Role
from edgeward_shared.messages.base import Message
from edgeward_shared.models.provenance import Hex64, ModelName, Tier, Version
from edgeward_shared.models.reasons import ModelReason
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.topics import FleetKind, fleet_topic

#: Bulk data travels in chunks of at most this many bytes (a data frame stays well under the
#: broker's 256 KiB message limit; see :mod:`.frames`).
MAX_CHUNK_BYTES: Final = 192 * 1024
MAX_CHUNKS: Final = 4096  # 768 MiB at the largest chunk size
#: A release document is re-signed on every sync; it may live at most this long.
MAX_DOCUMENT_LIFETIME_MS: Final = 7 * 24 * 3600 * 1000
DOCUMENT_POLICY: Final = VerifyPolicy(
    max_envelope_bytes=512 * 1024, max_lifetime_ms=MAX_DOCUMENT_LIFETIME_MS
)


class BlobInfo(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The stored blob (ciphertext for encrypted tiers, the ONNX bytes for ``low``)."""

    digest: Hex64
    size: Annotated[int, msgspec.Meta(ge=1)]
    chunk_size: Annotated[int, msgspec.Meta(ge=1024, le=MAX_CHUNK_BYTES)]
    chunks: Annotated[list[Hex64], msgspec.Meta(min_length=1, max_length=MAX_CHUNKS)]

    @classmethod
    def of(cls, blob: bytes, chunk_size: int) -> BlobInfo:
        chunks = [
            hashlib.sha256(blob[i : i + chunk_size]).hexdigest()
            for i in range(0, len(blob), chunk_size)
        ]
        return cls(
            digest=hashlib.sha256(blob).hexdigest(),
            size=len(blob),
            chunk_size=chunk_size,
            chunks=chunks,
        )

    def chunk_length(self, index: int) -> int:
        start = index * self.chunk_size
        return max(0, min(self.chunk_size, self.size - start))

    def consistent(self) -> bool:
        """The chunk list covers exactly ``size`` bytes."""
        return len(self.chunks) == -(-self.size // self.chunk_size)


class ModelRelease(Message, frozen=True, tag="edgeward.model.release.v1"):
    """Distribution metadata for one device and one model version (docs/protocol.md)."""

    device: Annotated[str, msgspec.Meta(max_length=64)]
    name: ModelName
    version: Version
    tier: Tier
    meta_version: Annotated[int, msgspec.Meta(ge=1)]  # the model's metadata counter
    rollout: Annotated[str, msgspec.Meta(max_length=64)]  # the rollout wave that assigned it
    provenance: Annotated[bytes, msgspec.Meta(max_length=8192)]
    signature: Annotated[bytes, msgspec.Meta(max_length=64 * 1024)]
    signer_cert: Annotated[bytes, msgspec.Meta(max_length=4096)]
    blob: BlobInfo
    #: set when this document sends the device back from an aborted rollout of a newer
    #: version (docs/adr/0020): the aborted version; the device may go below its high-water
    #: down to ``version`` if that high-water is at most ``reverts``
    reverts: Version | None = None


def release_topic(name: str) -> str:
    """The topic a release document is sealed for (documents are not published there)."""
    return fleet_topic(FleetKind.MODELS, name)


class _NoReplay:
    """Documents are meant to be read again (after a restart, on every check)."""

    def check_and_record(self, key: str, forget_after_ms: int, now_ms: int) -> None:
        del key, forget_after_ms, now_ms


def document_verifier(trust: TrustStore) -> EnvelopeVerifier:
    return EnvelopeVerifier(trust, _NoReplay(), DOCUMENT_POLICY)


def open_release(
    verifier: EnvelopeVerifier, raw: bytes, name: str, *, now_ms: int
) -> Opened[ModelRelease]:
    """Verify a release document's signature, signer and expiry (not yet the high-water)."""
    try:
        opened = verifier.open(
            raw, release_topic(name), [ModelRelease], now_ms=now_ms, roles=frozenset({Role.SERVICE})
        )
    except AuthenticityError as exc:
        if exc.reason == Reason.ENVELOPE_EXPIRED:
            raise AuthenticityError(ModelReason.METADATA_EXPIRED, exc.detail) from exc
        raise
    if opened.message.name != name or not opened.message.blob.consistent():
        raise PolicyError(ModelReason.METADATA_MISMATCH, "document names another model")
    return opened


@dataclass(frozen=True, slots=True)
class HighWater:
    """The newest release a device has accepted for one model (persisted by the device)."""

    version: int
    meta_version: int
    provenance_digest: str

    def replaced_by(self, mark: HighWater) -> bool:
        """Whether ``mark`` supersedes this one: newer metadata (the service's counter orders
        its decisions, an explicit revert included), or the same metadata and no older
        version."""
        if mark.meta_version != self.meta_version:
            return mark.meta_version > self.meta_version
        return mark.version >= self.version


def check_release(release: ModelRelease, device_id: str, high: HighWater | None) -> None:
    """The rollback and mix-and-match rules, against what this device accepted before."""
    if release.device != device_id:
        raise PolicyError(ModelReason.METADATA_WRONG_DEVICE, f"for {release.device!r}")
    if high is None:
        return
    if release.meta_version < high.meta_version:
        raise PolicyError(
            ModelReason.METADATA_ROLLBACK, f"meta {release.meta_version} < {high.meta_version}"
        )
    if release.version < high.version:
        revert = release.reverts is not None and release.version < release.reverts
        if not revert or release.reverts is None or release.reverts < high.version:
            raise PolicyError(
                ModelReason.VERSION_ROLLBACK, f"version {release.version} < {high.version}"
            )
        if release.meta_version <= high.meta_version:  # a revert is a new decision, never a replay
            raise PolicyError(
                ModelReason.METADATA_ROLLBACK,
                f"revert at meta {release.meta_version} <= {high.meta_version}",
            )
    provenance_digest = hashlib.sha256(release.provenance).hexdigest()
    if release.version == high.version and provenance_digest != high.provenance_digest:
        raise PolicyError(ModelReason.METADATA_MISMATCH, "same version, other provenance")


def newest(releases: Sequence[ModelRelease]) -> ModelRelease | None:
    return max(releases, key=lambda r: (r.version, r.meta_version), default=None)
