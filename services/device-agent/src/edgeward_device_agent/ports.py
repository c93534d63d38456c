"""The seams the agent is built on: its TPM and its connection to the broker.

:class:`AgentTpm` is what the agent needs from :class:`~edgeward_device_agent.tpm.Tpm`
(which satisfies it); a test may pass a doctored one (a TPM that shows another TPM's EK
certificate, one that is slow to quote). :class:`KeySealer` is the part of it that seals
and unseals the device's keys (:mod:`.device_keys`). A :data:`Connector` opens one bus
connection for an identity whose TLS material is in memory (:class:`TlsIdentity`: the key
was unsealed, never read from a file); production uses mutual-TLS MQTT
(:func:`mqtt_connector`), tests the in-memory broker. Every TPM method blocks: the agent
calls them in a worker thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Protocol

from cryptography import x509

from edgeward_device_agent.tpm import PcrBank, Quote
from edgeward_shared.bus.base import Bus
from edgeward_shared.bus.mqtt import BrokerAddress, MqttSettings, connect_mqtt
from edgeward_shared.identity import Identity
from edgeward_shared.pki.store import IdentityFiles
from edgeward_shared.tls import TlsIdentity


class KeySealer(Protocol):
    """Sealing small secrets to PCR values (:meth:`~edgeward_device_agent.tpm.Tpm.seal`)."""

    def read_pcrs(
        self, indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> dict[int, bytes]: ...

    def seal(
        self,
        secret: bytes,
        pcr_indices: Iterable[int],
        bank: PcrBank = PcrBank.SHA256,
        values: Mapping[int, bytes] | None = None,
    ) -> bytes: ...

    def unseal(
        self, blob: bytes, pcr_indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> bytes: ...


class AgentTpm(KeySealer, Protocol):
    """The TPM operations of enrollment and attestation (all blocking)."""

    @property
    def ak_public(self) -> bytes: ...

    def ek_certificate(self) -> x509.Certificate: ...

    def ek_public(self) -> bytes: ...

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...

    def quote(
        self, qualifying_data: bytes, indices: Iterable[int], bank: PcrBank = PcrBank.SHA256
    ) -> Quote: ...

    def extend_pcr(self, index: int, digests: Mapping[PcrBank, bytes]) -> None: ...

    def close(self) -> None: ...


#: Opens the TPM behind a TCTI string (blocking): :class:`~edgeward_device_agent.tpm.Tpm`.
TpmFactory = Callable[[str], AgentTpm]
#: Opens one bus connection as ``identity``, presenting ``tls`` (in memory, or files).
Connector = Callable[[Identity, IdentityFiles | TlsIdentity], AbstractAsyncContextManager[Bus]]


def mqtt_connector(broker: BrokerAddress, ca_bundle: Path) -> Connector:
    """Mutual-TLS MQTT v5 to ``broker``, verified against ``ca_bundle``."""

    def connect(
        identity: Identity, tls: IdentityFiles | TlsIdentity
    ) -> AbstractAsyncContextManager[Bus]:
        settings = MqttSettings(
            broker=broker, ca_bundle=ca_bundle, identity=tls, client_id=identity.common_name
        )
        return connect_mqtt(settings)

    return connect
