"""The device's private keys at rest: sealed by its TPM to the boot PCRs, in memory once
unsealed (docs/adr/0016-device-key-sealing.md).

A :class:`SealedKeyStore` is one key file, ``<name>.sealed``: JSON, 0600, replaced
atomically, and useless without this TPM booted into the same chain::

    {"v": 1, "curve": "P-256", "bank": "sha256",
     "pcrs": {"0": "<hex value>", ..., "7": "<hex value>"},
     "blob": "<base64: TPM2B_PUBLIC || TPM2B_PRIVATE of the sealed-data object>"}

The sealed secret is the key's 32-byte private scalar (a PEM key would not fit in a sealed
object). ``pcrs`` are the values the policy names, kept so that an operator can compare them
with ``tpm2_pcrread``, a refusal can say which PCR moved, and a new key (a renewal) is sealed
to the same values as the one it replaces rather than to whatever the PCRs hold at that
moment. They are checked against the blob's ``authPolicy`` before any use: editing them only
makes the file unusable.

Failing to unseal because the PCRs moved or the TPM is another one is final for this boot:
:class:`DeviceKeyError` (a :class:`~edgeward_shared.errors.ConfigError`, so the agent stops
with its reason id). Any other TPM failure is a :class:`~edgeward_device_agent.tpm.TpmError`
the caller may retry.

It owns the file format, the policy choice (:class:`SealPolicy`), and the migration of a
plain PEM key left by an older agent or a provisioning station (:meth:`SealedKeyStore.
adopt_plain`: sealed, then shredded). The TPM commands are :mod:`.tpm`'s; which keys exist
and when they are made is :mod:`.state`'s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

import msgspec

from edgeward_device_agent.ports import KeySealer
from edgeward_device_agent.tpm import PcrBank, TpmError, pcr_policy_digest, sealed_policy
from edgeward_shared.crypto.keys import PrivateKey, key_from_secret, on_p256
from edgeward_shared.errors import ConfigError
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.store import read_private_key

FORMAT_VERSION: Final = 1
#: PCRs a policy must not name: 16 (debug) and 23 (application) can be reset by any
#: software at locality 0, so a seal to them protects nothing.
RESETTABLE_PCRS: Final = frozenset({16, 23})
_SCALAR_BYTES: Final = 32


class DeviceKeyError(ConfigError):
    """A sealed key that cannot be opened on this device as it booted (final; re-enrol)."""

    default_reason = "agent.key.unusable"


class KeyReason:
    """Reason ids of the sealed key store (those of the TPM come as ``tpm.unseal.*``)."""

    POLICY_FAILED: Final = "tpm.unseal.policy_failed"
    WRONG_TPM: Final = "tpm.unseal.wrong_tpm"
    MALFORMED: Final = "agent.key.sealed_malformed"
    LOCKED: Final = "agent.key.locked"


@dataclass(frozen=True, slots=True)
class SealPolicy:
    """Which PCRs a device key is sealed to, and in which bank.

    The default is the boot chain, PCRs 0-7 of SHA-256 (firmware, its configuration, option
    ROMs, boot loader and kernel, GPT, platform state, Secure Boot state: what the verifier's
    policy covers too). Never the PCR the agent extends with models at run time (checked
    by :class:`~edgeward_device_agent.config.AgentConfig`), nor a resettable one.
    """

    pcrs: tuple[int, ...] = tuple(range(8))
    bank: PcrBank = PcrBank.SHA256

    def __post_init__(self) -> None:
        if not self.pcrs:
            raise ValueError("the device key is sealed to at least one PCR")
        if len(set(self.pcrs)) != len(self.pcrs) or list(self.pcrs) != sorted(self.pcrs):
            raise ValueError("seal PCRs are listed once each, in ascending order")
        if any(not 0 <= index < 24 for index in self.pcrs):
            raise ValueError("seal PCRs are 0 to 23")
        if resettable := RESETTABLE_PCRS.intersection(self.pcrs):
            raise ValueError(f"PCRs {sorted(resettable)} can be reset by anyone: not for a seal")

    @classmethod
    def parse(cls, pcrs: str, bank: str = "sha256") -> SealPolicy:
        """From ``"0,1,2,3,4,5,6,7"`` and ``"sha256"`` (``ValueError`` saying what is wrong)."""
        try:
            indices = sorted({int(item) for item in pcrs.split(",") if item.strip()})
            chosen = PcrBank[bank.upper()]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"seal PCRs {pcrs!r} / bank {bank!r}: {exc}") from exc
        return cls(tuple(indices), chosen)


class _SealedKey(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``*.sealed`` file (see the module docstring)."""

    v: int
    curve: Literal["P-256"]
    bank: Literal["sha1", "sha256"]
    pcrs: dict[int, str]
    blob: bytes

    def values(self) -> dict[int, bytes]:
        return {index: bytes.fromhex(value) for index, value in self.pcrs.items()}


def shred(path: Path) -> None:
    """Overwrite ``path`` with zeros, flush it to the device, then unlink it.

    Best effort, as the ADR says: a journaling or copy-on-write file system, or an SSD's
    flash translation layer, may keep the old blocks; what it does guarantee is that the
    file is gone and its old content is no longer reachable through the file system.
    """
    size = path.stat().st_size
    with path.open("r+b", buffering=0) as handle:
        handle.write(bytes(size))
        os.fsync(handle.fileno())
    path.unlink()
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scalar(key: PrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(_SCALAR_BYTES, "big")


def _key_from_scalar(secret: bytes) -> PrivateKey:
    if len(secret) != _SCALAR_BYTES:
        raise ValueError("not a P-256 private scalar")
    return key_from_secret(secret)


@dataclass
class SealedKeyStore:
    """One sealed key file; the key, once unsealed or made, is cached in memory.

    :meth:`create` makes a new key, :meth:`load` unseals the existing one, :meth:`replace`
    seals a given key in place of the existing one, :meth:`sibling` is another file whose
    keys are sealed to the same PCR values as this one's (a renewal's pending key). Every
    method that touches the TPM blocks: call it from a worker thread.
    """

    path: Path
    sealer: KeySealer = field(repr=False)
    policy: SealPolicy = field(default_factory=SealPolicy)
    _pinned: dict[int, bytes] | None = field(default=None, repr=False)
    _key: PrivateKey | None = field(default=None, repr=False)

    def exists(self) -> bool:
        return self.path.exists()

    @property
    def cached(self) -> PrivateKey | None:
        """The key if this store has it in memory already (no TPM call)."""
        return self._key

    def sibling(self, path: Path) -> SealedKeyStore:
        """A store at ``path`` sealing to the PCR values this store's key is sealed to."""
        pinned = self._read().values() if self.exists() else self._pinned
        return SealedKeyStore(path, self.sealer, self.policy, pinned)

    # ------------------------------------------------------------------ the key
    def create(self) -> PrivateKey:
        """A new P-256 key, sealed and written before it is returned (so a certificate is
        never requested for a key that a crash would lose)."""
        key = new_key()
        self.replace(key)
        return key

    def load(self) -> PrivateKey:
        """The key: from memory, or unsealed from the file (:class:`DeviceKeyError` if this
        TPM, as it booted, cannot open it). A file sealed to another selection than the
        policy's is sealed again to the policy's, once it opened."""
        if self._key is not None:
            return self._key
        sealed = self._read()
        bank = PcrBank[sealed.bank.upper()]
        try:
            secret = self.sealer.unseal(sealed.blob, sorted(sealed.pcrs), bank)
        except TpmError as exc:
            raise self._refusal(exc, sealed, bank) from exc
        try:
            key = _key_from_scalar(secret)
        except ValueError as exc:
            raise DeviceKeyError(KeyReason.MALFORMED, f"{self.path}: {exc}") from exc
        if (tuple(sorted(sealed.pcrs)), bank) != (self.policy.pcrs, self.policy.bank):
            # the operator chose other PCRs: sealed to them (as they are now) from now on
            self._seal(key, self.sealer.read_pcrs(self.policy.pcrs, self.policy.bank))
        self._key = key
        return key

    def replace(self, key: PrivateKey) -> None:
        """Seal ``key`` and put it in place of this file's key (atomically), to the values
        the current key is sealed to (or a sibling's, or else the PCRs' current values)."""
        self._seal(key, self._seal_values())

    def _seal(self, key: PrivateKey, values: dict[int, bytes]) -> None:
        if not on_p256(key):
            raise TypeError("the device key is a P-256 key")
        blob = self.sealer.seal(_scalar(key), self.policy.pcrs, self.policy.bank, values)
        sealed = _SealedKey(
            v=FORMAT_VERSION,
            curve="P-256",
            bank="sha256" if self.policy.bank is PcrBank.SHA256 else "sha1",
            pcrs={index: value.hex() for index, value in values.items()},
            blob=blob,
        )
        self._write(msgspec.json.encode(sealed))
        self._key = key

    def adopt_plain(self, pem: Path) -> bool:
        """Seal the plain PEM key at ``pem`` (an older agent's, or as provisioned) in place
        of this file's key, then shred ``pem``. False if there is no such file."""
        if not pem.exists():
            return False
        key = read_private_key(pem)  # sealed to the boot as it is now, whatever was here
        self._seal(key, self.sealer.read_pcrs(self.policy.pcrs, self.policy.bank))
        shred(pem)
        return True

    def remove(self) -> None:
        """Delete the file and forget the key (the blob is useless to anyone else anyway)."""
        self.path.unlink(missing_ok=True)
        self._key = None

    # ------------------------------------------------------------------ the file
    def _seal_values(self) -> dict[int, bytes]:
        """The values a new seal names: pinned (a sibling's), this file's, or current."""
        if self._pinned is not None and sorted(self._pinned) == list(self.policy.pcrs):
            return dict(self._pinned)
        if self.exists():
            sealed = self._read()
            if (sorted(sealed.pcrs), sealed.bank) == (
                list(self.policy.pcrs),
                self.policy.bank.name.lower(),
            ):
                return sealed.values()
        return self.sealer.read_pcrs(self.policy.pcrs, self.policy.bank)

    def _read(self) -> _SealedKey:
        try:
            sealed = msgspec.json.decode(self.path.read_bytes(), type=_SealedKey)
        except FileNotFoundError as exc:
            raise ConfigError("config.key.missing", f"no sealed key at {self.path}") from exc
        except msgspec.DecodeError as exc:
            raise DeviceKeyError(KeyReason.MALFORMED, f"{self.path}: {exc}") from exc
        if sealed.v != FORMAT_VERSION:
            raise DeviceKeyError(KeyReason.MALFORMED, f"{self.path}: format version {sealed.v}")
        bank = PcrBank[sealed.bank.upper()]
        try:
            expected = pcr_policy_digest(bank, sealed.values())
            policy = sealed_policy(sealed.blob)
        except ValueError as exc:
            raise DeviceKeyError(KeyReason.MALFORMED, f"{self.path}: {exc}") from exc
        if expected != policy:
            raise DeviceKeyError(
                KeyReason.MALFORMED, f"{self.path}: its PCR values are not those of its seal"
            )
        return sealed

    def _write(self, data: bytes) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".sealed-tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(self.path)
        _fsync_directory(self.path.parent)

    def _refusal(self, exc: TpmError, sealed: _SealedKey, bank: PcrBank) -> Exception:
        """A readable, final :class:`DeviceKeyError` for the two refusals; else ``exc``."""
        if exc.reason == KeyReason.WRONG_TPM:
            return DeviceKeyError(
                KeyReason.WRONG_TPM,
                f"{self.path} was sealed by another TPM (a state directory copied from another"
                " device, or this TPM was cleared): this device must be enrolled again"
                " (remove device/, install a new enrollee identity, approve the rebind)",
            )
        if exc.reason == KeyReason.POLICY_FAILED:
            moved = _moved(self.sealer, sealed, bank)
            return DeviceKeyError(
                KeyReason.POLICY_FAILED,
                f"{self.path} is sealed to the boot chain it was made under and PCRs {moved}"
                f" ({bank.name}) now differ: a tampered boot, or a firmware or boot loader"
                " update (then re-enrol: remove device/, install a new enrollee identity,"
                " approve the rebind)",
            )
        return exc


def _moved(sealer: KeySealer, sealed: _SealedKey, bank: PcrBank) -> list[int] | str:
    """Which sealed PCRs differ now (for the operator; the TPM made the decision)."""
    try:
        now = sealer.read_pcrs(sorted(sealed.pcrs), bank)
    except TpmError:
        return "(unreadable)"
    return [index for index, value in sorted(sealed.values().items()) if now.get(index) != value]
