"""The device's trust bundle on disk: the provisioned one (``config.ca_bundle``) or the one
it adopted from the fleet trust bundle (docs/adr/0017), and the CRLs checked against it.

The root is pinned by the provisioned bundle for the life of the device; an adopted bundle
only ever brings issuing CAs that root signed. The device's CRL file is static config: it
must cover every issuing CA it was provisioned with, but an issuing CA learned from the
signed fleet bundle may have none there (its revocations reach the device on the signed
revocation list), and a CRL of an issuing CA the bundle no longer holds (retired) is
ignored, since nothing that CA issued is trusted any more.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Final

from edgeward_device_agent.reasons import AgentReason
from edgeward_shared.errors import ConfigError, PolicyError
from edgeward_shared.pki.store import read_certificates
from edgeward_shared.pki.trust import TrustStore, load_crls
from edgeward_shared.runtime.material import check_bundle

TRUST_DIR: Final = "trust"
BUNDLE_FILE: Final = "ca-bundle.pem"


def trust_dir(state_dir: Path) -> Path:
    return state_dir / TRUST_DIR


def adopted_bundle(state_dir: Path) -> Path:
    return trust_dir(state_dir) / BUNDLE_FILE


def current_bundle(state_dir: Path, provisioned: Path) -> Path:
    """The bundle to connect with: the adopted one if the device adopted one."""
    adopted = adopted_bundle(state_dir)
    return adopted if adopted.exists() else provisioned


def load_trust(state_dir: Path, provisioned: Path, crl: Path, *, now: datetime) -> TrustStore:
    """The trust store to start from: the provisioned bundle and its CRLs (every issuing CA
    covered), or the adopted bundle checked against the provisioned root."""
    adopted = adopted_bundle(state_dir)
    if not adopted.exists():
        return TrustStore.from_bundle(provisioned, crl, now=now)
    certs = read_certificates(provisioned)
    roots = [c for c in certs if c.issuer == c.subject]
    try:
        issuing = check_bundle(adopted.read_bytes(), roots, now)
    except PolicyError as exc:  # not what the follower wrote: fail closed
        raise ConfigError(AgentReason.TRUST_ADOPTED, f"{adopted}: {exc.detail}") from exc
    required = [c for c in certs if c.issuer != c.subject and c in issuing]
    return TrustStore(roots, issuing, load_crls(crl, issuing, now=now, required=required))
