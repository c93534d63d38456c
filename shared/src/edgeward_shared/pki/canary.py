"""The revocation canary: an identity revoked when the PKI is made, kept only to prove that
the broker enforces its CRL.

After every reload, :mod:`edgeward_shared.broker.reload` opens a real TLS handshake with
the canary's certificate; the broker must refuse it with the ``certificate revoked`` alert.
If it does not, the broker is running without our CRL (mosquitto 2.0.11 does that when the
file is unreadable) and revocation is off for everyone.

The canary is a device (the role with the least rights: its own ``dev/<id>`` subtree) with
the reserved id :data:`CANARY_DEVICE_ID`. Its key and certificate live under the PKI
directory like any identity's; its certificate lives as long as the issuing CA, so it is
refused for being revoked and never for being expired. Whoever holds the PKI directory
holds the issuing CA's key anyway, so the canary's key adds no power.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final

from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import IdentityFiles, PkiStore, read_certificate

#: Reserved: no real device may be enrolled under this id.
CANARY_DEVICE_ID: Final = "ew-canary-revoked"
CANARY: Final = Identity.device(CANARY_DEVICE_ID)
CANARY_REASON: Final = "revocation canary"
_LIFETIME: Final = timedelta(days=3650)  # clamped to the issuing CA's own lifetime
#: A canary certificate this close to its end is replaced (it must be refused as revoked).
_RENEW_BEFORE: Final = timedelta(days=30)


def canary_files(store: PkiStore) -> IdentityFiles:
    return store.identity_files(CANARY)


def canary_serial(store: PkiStore) -> int | None:
    """The serial of the canary's certificate on disk, if there is one and it is revoked."""
    files = canary_files(store)
    if not files.cert.exists():
        return None
    serial = read_certificate(files.cert).serial_number
    return serial if serial in store.revoked_serials() else None


def ensure_canary(store: PkiStore, now: datetime) -> int:
    """Issue and revoke the canary unless a revoked, unexpired one exists; its serial.

    Writes the CRL (through :meth:`PkiStore.revoke`) only when it makes a new canary.
    """
    serial = canary_serial(store)
    files = canary_files(store)
    if serial is not None:
        not_after = read_certificate(files.cert).not_valid_after_utc
        if not_after > now + _RENEW_BEFORE:
            return serial
    files = store.issue(CANARY, now, _LIFETIME, replace=True)
    serial = read_certificate(files.cert).serial_number
    store.revoke(serial, now, CANARY_REASON)
    return serial


def reissue_canary(store: PkiStore, now: datetime) -> int | None:
    """After an issuing-CA rotation: the canary again, issued by the CA issuing now and
    revoked (a canary of a CA later retired would be refused as unknown, not as revoked,
    and prove nothing). None if the PKI has no canary yet (the broker makes one)."""
    if not canary_files(store).cert.exists():
        return None
    files = store.issue(CANARY, now, _LIFETIME, replace=True)
    serial = read_certificate(files.cert).serial_number
    store.revoke(serial, now, CANARY_REASON)
    return serial
