"""Issue 10, keys held by the TPM (seed 000, the disk thief), all parts real: mosquitto with
the repository's config, the identity and attestation services, device agents on swtpm.

An enrolled device whose key is sealed to its TPM and boot PCRs connects over mTLS and is
attested. Its whole state directory copied to another TPM (another swtpm booted into the
same golden chain) is worth nothing: no file in it is a private key, the agent on the copy
stops with ``tpm.unseal.wrong_tpm`` before connecting, the stolen certificate with any other
key neither connects to the broker nor signs an envelope the fleet accepts, and the real
device carries on.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tests.e2e.fabric import (
    WAIT,
    World,
    agent_running,
    approve_golden_policy,
    make_world,
    services,
    until,
)

from edgeward_device_agent.agent import DeviceAgent
from edgeward_device_sim.swtpm import GOLDEN_BOOT_CHAIN
from edgeward_shared.bus.mqtt import MqttSettings, connect_mqtt
from edgeward_shared.clock import SystemClock
from edgeward_shared.envelope import EnvelopeVerifier, SigningKey, kid_of, seal
from edgeward_shared.errors import AuthenticityError, ConfigError, EdgewardError, TransportError
from edgeward_shared.identity import Identity
from edgeward_shared.messages.health import Pong
from edgeward_shared.pki.certs import new_key
from edgeward_shared.pki.store import read_certificate
from edgeward_shared.pki.trust import TrustStore
from edgeward_shared.replay import MemoryReplayGuard
from edgeward_shared.testing import MemoryPki
from edgeward_shared.tls import TlsIdentity
from edgeward_shared.topics import Channel, Direction, device_topic

pytestmark = [pytest.mark.tpm, pytest.mark.broker]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    with make_world(tmp_path_factory.mktemp("sealing-e2e")) as built:
        yield built


def _usable_private_keys(root: Path) -> list[Path]:
    """Every file under ``root`` that parses as a PEM or DER private key."""
    found = []
    for path in (p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for load in (serialization.load_pem_private_key, serialization.load_der_private_key):
            try:
                load(data, None)
            except (ValueError, TypeError):
                continue
            found.append(path)
    return found


async def _connects(world: World, identity: Identity, tls: TlsIdentity) -> None:
    settings = MqttSettings(
        broker=world.address,
        ca_bundle=world.pki.bundle_path,
        identity=tls,
        client_id=identity.common_name,
        timeout_s=5,
    )
    async with connect_mqtt(settings) as bus:
        await bus.subscribe(device_topic(identity.name, Direction.DOWN, Channel.HEALTH))


@pytest.mark.asyncio
async def test_a_copied_state_directory_cannot_connect_or_sign(world: World) -> None:
    device = Identity.device("dev-stolen")
    tpm = world.fleet.start("tpm-owner", GOLDEN_BOOT_CHAIN)
    thief_tpm = world.fleet.start("tpm-thief", GOLDEN_BOOT_CHAIN)  # same boot, other TPM
    async with services(world) as store:
        await approve_golden_policy(store, "gw-seal")
        owner = await world.new_agent(store, device.name, tpm.tcti)
        async with agent_running(owner):
            assert await until(lambda: owner.trust_state().attested), owner.trust_state()
            assert owner.trust_state().connected  # mTLS to mosquitto with the unsealed key

        # the thief copies the whole state directory (the agent is stopped: a cold disk)
        stolen = world.root / "stolen"
        shutil.copytree(owner.config.state_dir, stolen)
        assert _usable_private_keys(stolen) == []
        assert sorted(p.relative_to(stolen).as_posix() for p in stolen.rglob("*.sealed")) == [
            "device/key.sealed",
            "enrollee/key.sealed",
        ]

        # 1. the agent itself, on the thief's TPM: stops before it connects, and says why
        clone = DeviceAgent(replace(owner.config, state_dir=stolen, tcti=thief_tpm.tcti))
        with pytest.raises(EdgewardError) as refused:
            await asyncio.wait_for(clone.run(asyncio.Event()), WAIT)
        assert refused.value.reason == "tpm.unseal.wrong_tpm"
        assert "another TPM" in refused.value.detail
        state = clone.trust_state()
        assert (state.connected, state.last_error) == (False, "tpm.unseal.wrong_tpm")

        # 2. the stolen certificate chain with a key of the thief's: no TLS, no envelope
        chain = (stolen / "device" / "chain.pem").read_bytes()
        certificate = read_certificate(stolen / "device" / "cert.pem")
        thief_key = new_key()
        with pytest.raises(ConfigError) as mismatch:
            await _connects(world, device, TlsIdentity(chain, thief_key))
        assert mismatch.value.reason == "config.tls.unusable"  # TLS cannot even offer it
        mallory = MemoryPki(org="Mallory")  # a look-alike certificate from the thief's CA
        look_alike = mallory.signing_key(device)
        pem = x509.load_der_x509_certificate(look_alike.cert_der).public_bytes(
            serialization.Encoding.PEM
        ) + mallory.issuing.cert.public_bytes(serialization.Encoding.PEM)
        with pytest.raises(TransportError):
            await _connects(world, device, TlsIdentity(pem, look_alike.key))  # broker refuses

        der = certificate.public_bytes(serialization.Encoding.DER)
        forged = SigningKey(device, thief_key, der, kid_of(der))
        topic = device_topic(device.name, Direction.UP, Channel.HEALTH)
        now = SystemClock().now_ms()
        raw = seal(
            forged, topic, Pong(in_reply_to="00" * 16, nonce="00" * 16, uptime_ms=1), now_ms=now
        )
        trust = TrustStore.from_bundle(
            world.pki.bundle_path, world.pki.crl_path, now=datetime.now(UTC)
        )
        with pytest.raises(AuthenticityError) as forged_envelope:
            EnvelopeVerifier(trust, MemoryReplayGuard()).open(raw, topic, [Pong], now_ms=now)
        assert forged_envelope.value.reason == "envelope.signature.invalid"

        # 3. the device itself carries on with its own TPM
        again = DeviceAgent(owner.config)
        async with agent_running(again):
            assert await until(lambda: again.trust_state().attested), again.trust_state()
