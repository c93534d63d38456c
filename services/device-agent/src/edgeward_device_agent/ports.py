"""The seams the agent is built on: its TPM and its connection to the broker.

:class:`AgentTpm` is what the agent needs from :class:`~edgeward_device_agent.tpm.Tpm`
(which satisfies it); a test may pass a doctored one (a TPM that shows another TPM's EK
certificate, one that is slow to quote). A :data:`Connector` opens one bus connection for
an identity; production uses mutual-TLS MQTT (:func:`mqtt_connector`), tests the in-memory
broker. Every TPM method blocks: the agent calls them in a worker thread.
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


class AgentTpm(Protocol):
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
#: Opens one bus connection as ``identity``, whose TLS material is in ``files``.
Connector = Callable[[Identity, IdentityFiles], AbstractAsyncContextManager[Bus]]


def mqtt_connector(broker: BrokerAddress, ca_bundle: Path) -> Connector:
    """Mutual-TLS MQTT v5 to ``broker``, verified against ``ca_bundle``."""

    def connect(identity: Identity, files: IdentityFiles) -> AbstractAsyncContextManager[Bus]:
        settings = MqttSettings(
            broker=broker, ca_bundle=ca_bundle, identity=files, client_id=identity.common_name
        )
        return connect_mqtt(settings)

    return connect
